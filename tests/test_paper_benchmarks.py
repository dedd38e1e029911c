"""The paper-claim benchmark scripts run end to end at a tiny size (the measured sizes are in docs/)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def bench_modules():
    sys.path.insert(0, str(BENCH))
    import efficiency
    import reward_hacking
    import sensitivity

    yield efficiency, sensitivity, reward_hacking
    sys.path.remove(str(BENCH))


def test_efficiency_and_sensitivity_end_to_end(bench_modules, tmp_path):
    efficiency, sensitivity, _ = bench_modules
    docs, cache = tmp_path / "docs", tmp_path / "cache"
    tiny = ["--steps", "2", "--batch", "4", "--eval-every", "1", "--eval-seeds", "1", "--cache", str(cache),
            "--docs", str(docs)]
    assert efficiency.main([*tiny, "--seeds", "1", "--rocm-lrs", "0.001", "--ppo-lrs", "0.001", "--timing-reps", "1",
                            "--regularizers", "", "--out", str(tmp_path / "eff")]) == 0
    text = (docs / "benchmarks.md").read_text()
    assert "<!-- BEGIN efficiency -->" in text and "| ROCM + kl | 0.001 | 1 |" in text and "| PPO (RLCM) |" in text
    assert (docs / "img" / "efficiency.png").read_bytes()[:4] == b"\x89PNG"
    runs = json.loads((docs / "efficiency.json").read_text())["runs"]
    curve = runs["PPO (RLCM)"][0]["curve"]
    assert [p["step"] for p in curve] == [0, 1, 2] and [p["reward_queries"] for p in curve] == [0, 4, 8]
    assert curve[0]["train_s"] == 0 < curve[1]["train_s"] < curve[2]["train_s"]
    assert curve[-1]["eval_reward"] != curve[0]["eval_reward"]  # the policy moved
    by_target = json.loads((docs / "efficiency.json").read_text())["rows"]
    assert set(by_target) == {"8", "9"}  # the default targets
    secs = [r["seconds_to_target"] for rs in by_target.values() for r in rs]
    assert all(math.isnan(x) or x > 0 for x in secs)
    n_cached = len(list(cache.glob("*.json")))
    assert sensitivity.main([*tiny, "--lrs", "0.001", "--out", str(tmp_path / "sens")]) == 0
    assert len(list(cache.glob("*.json"))) == n_cached  # the same runs, reused from the cache
    text = (docs / "results.md").read_text()
    assert "<!-- BEGIN sensitivity -->" in text and "| ROCM + KL |" in text and "| PPO (RLCM) |" in text
    assert (docs / "img" / "sensitivity.png").is_file()


def test_reward_hacking_end_to_end(bench_modules, tmp_path, monkeypatch):
    _, _, reward_hacking = bench_modules
    docs = tmp_path / "docs"
    monkeypatch.setattr(sys, "argv", ["reward_hacking.py", "--steps", "1", "--runs", "1", "--out",
                                      str(tmp_path / "out"), "--docs", str(docs)])
    reward_hacking.main()
    text = (docs / "results.md").read_text()
    assert "| no regularizer, same lr |" in text and "ROCM + KL" not in text.split("| run |")[1]
    assert (docs / "img" / "tiny_none_same_lr_grid.png").is_file()


def test_the_regularizer_sweep_recipe_checks():
    from rocm_ray.config import load_recipe
    from rocm_ray.tune import check_search_space, parse_search_space

    recipe = load_recipe("recipes/tune_regularizers.yaml")
    keys = parse_search_space(recipe)
    assert {k.key for k in keys} == {"algorithm.regularizer", "algorithm.beta", "algorithm.reduction"}
    assert check_search_space(recipe, keys) == 9 * 3 * 2  # every regularizer x 3 betas x 2 reductions
