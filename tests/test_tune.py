"""``rocm-ray tune``: a real grid search on a local Ray, and search-space errors caught before launching."""

from __future__ import annotations

import csv
import math
import sys
import types

import pytest

from rocm_ray.config import RecipeError, load_recipe
from rocm_ray.tune import (
    check_search_space,
    pareto_front,
    parse_search_space,
    pick_best,
    tune_callbacks,
    tune_recipe,
)

RECIPE = "recipes/tune_tiny_debug.yaml"
GRID = {("kl", 0.01), ("kl", 1.0), ("hellinger", 0.01), ("hellinger", 1.0)}


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray for the module, on loopback; stopped only if this module started it."""
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=2, _node_ip_address="127.0.0.1", include_dashboard=False,
                 log_to_driver=False)
    yield
    if started:
        ray.shutdown()


@pytest.fixture(scope="module")
def search(local_ray, tmp_path_factory):
    out = tmp_path_factory.mktemp("tune")
    recipe = load_recipe(RECIPE, [f"train.output_dir={out}", "train.steps=3", "tune.scheduler=fifo",
                                  "tune.max_concurrent_trials=2"])
    return recipe, tune_recipe(recipe)


def _csv_rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_every_trial_runs_and_reports_every_step(search):
    recipe, res = search
    assert len(res.rows) == 4 and not res.errors
    assert {(r["algorithm.regularizer"], r["algorithm.beta"]) for r in res.rows} == GRID
    for r in res.rows:
        assert r["status"] == "done" and r["steps"] == 3
        assert math.isfinite(r["reward"]) and r["kl_to_ref"] >= 0 and "eval_reward" in r
        run = res.output_dir / r["run_dir"]
        assert (run / "metrics.csv").is_file() and (run / "summary.json").is_file()
    # Tune saw one result per step of every trial (progress.csv: one line per tune.report)
    progress = sorted(res.tune_dir.glob(f"{recipe.name}/*/progress.csv"))
    assert len(progress) == 4
    for p in progress:
        assert [int(row["step"]) for row in _csv_rows(p)] == [1, 2, 3]
    assert list(res.tune_dir.glob(f"{recipe.name}/*/events.out.tfevents.*"))  # TensorBoard


def test_results_table_pareto_png_and_best(search):
    recipe, res = search
    rows = _csv_rows(res.results_csv)
    assert len(rows) == 4
    assert {"trial_id", "algorithm.regularizer", "algorithm.beta", "reward", "divergence", "kl_to_ref",
            "pareto"} <= set(rows[0])
    assert {(r["algorithm.regularizer"], float(r["algorithm.beta"])) for r in rows} == GRID
    assert res.results_md.read_text().count("\n| ") == 5  # header + 4 trials
    assert res.pareto_png is not None and res.pareto_png.read_bytes()[:4] == b"\x89PNG"
    front = [r for r in rows if r["pareto"] == "True"]
    assert front
    for f in front:  # no trial is at least as good on both axes and strictly better on one
        fr, fd = float(f["eval_reward"]), float(f["kl_to_ref"])
        assert not any(float(o["eval_reward"]) >= fr and float(o["kl_to_ref"]) <= fd
                       and (float(o["eval_reward"]) > fr or float(o["kl_to_ref"]) < fd) for o in rows)
    best_value = max(float(r[recipe.tune.metric]) for r in rows)
    assert res.best is not None and res.best[recipe.tune.metric] == pytest.approx(best_value)
    best_row = next(r for r in rows if r["trial_id"] == res.best["trial_id"])
    assert float(best_row[recipe.tune.metric]) == pytest.approx(best_value)


@pytest.mark.parametrize("space, key", [
    ("{algorithm.betta: [0.1, 1.0]}", "tune.search_space.algorithm.betta"),
    ("{algorithm.regularizer: [kl, kll]}", "tune.search_space.algorithm.regularizer"),
    ("{algorithm.beta: [0.1, -1.0]}", "tune.search_space.algorithm.beta"),
    ("{train.lr: {loguniform: [0.0, 1.0]}}", "tune.search_space.train.lr"),
    ("{train.lr: {normal: [0.0, 1.0]}}", "tune.search_space.train.lr"),
    ("{train.output_dir: [a, b]}", "tune.search_space.train.output_dir"),
])
def test_bad_search_space_names_the_key(space, key):
    recipe = load_recipe(RECIPE, [f"tune.search_space={space}"])
    with pytest.raises(RecipeError) as e:
        tune_recipe(recipe)  # fails before Ray starts
    assert e.value.key == key


def test_yaml_exponent_floats_are_numbers():
    recipe = load_recipe(RECIPE, ["tune.search_space={algorithm.beta: [1e-3]}"])  # YAML 1.1 would say "1e-3"
    (k,) = parse_search_space(recipe)
    assert k.values == (1e-3,) and k.numeric and check_search_space(recipe, [k]) == 1
    ranged = load_recipe(RECIPE, ["tune.search_space={algorithm.beta: {loguniform: [1e-3, 1]}}"])
    (k,) = parse_search_space(ranged)  # range ends are numbers by definition: accepted
    assert k.values == (1e-3, 1.0) and check_search_space(ranged, [k]) == 2


def test_shipped_recipes_and_nested_keys():
    kl = load_recipe("recipes/tune_tiny_kl.yaml")  # parses without the embedded assets
    keys = parse_search_space(kl)
    assert kl.tune.scheduler == "asha" and check_search_space(kl, keys) == 12
    nested = load_recipe(RECIPE, ["tune.search_space.train.lr=[0.01, 0.05]"])  # = {train: {lr: [...]}}
    assert "train.lr" in [k.key for k in parse_search_space(nested)]


def test_cli_bad_key_exits_2_with_one_error_line(capsys):
    from rocm_ray.cli import main

    code = main(["tune", RECIPE, "tune.search_space={algorithm.betta: [0.1]}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert err[0].startswith("error:") and "tune.search_space.algorithm.betta" in err[0]


def test_pbt_needs_a_numeric_key():
    recipe = load_recipe(RECIPE, ["tune.scheduler=pbt",
                                  "tune.search_space={algorithm.regularizer: [kl, js]}"])
    with pytest.raises(RecipeError) as e:
        tune_recipe(recipe)
    assert e.value.key == "tune.scheduler"


def test_ray_train_trials_need_train_ray_to_take_callbacks(monkeypatch):
    recipe = load_recipe(RECIPE, ["train.num_workers=1"])
    keys = parse_search_space(recipe)
    fake = types.ModuleType("rocm_ray.train.ray_trainer")
    fake.train_ray = lambda recipe, resume=False: None
    monkeypatch.setitem(sys.modules, "rocm_ray.train.ray_trainer", fake)
    with pytest.raises(RecipeError) as e:
        check_search_space(recipe, keys)
    assert e.value.key == "train.num_workers" and "callbacks" in str(e.value)
    fake.train_ray = lambda recipe, resume=False, *, callbacks=None: None
    assert check_search_space(recipe, keys) == 4


def test_pareto_front_and_best():
    rows = [{"trial_id": "a", "status": "done", "reward": 1.0, "divergence": 1.0},
            {"trial_id": "b", "status": "done", "reward": 2.0, "divergence": 2.0},
            {"trial_id": "c", "status": "done", "reward": 1.5, "divergence": 3.0},  # dominated by b
            {"trial_id": "d", "status": "stopped early", "reward": 0.5, "divergence": 0.5},
            {"trial_id": "e", "status": "error"}]
    assert pareto_front(rows) == [0, 1, 3]
    assert pick_best(rows, "reward", "max")["trial_id"] == "b"  # finished trials first
    assert pick_best(rows, "divergence", "min")["trial_id"] == "a"


def test_wandb_callback_when_asked():
    from ray.air.integrations.wandb import WandbLoggerCallback
    from ray.tune.logger import TBXLoggerCallback

    plain = tune_callbacks(load_recipe(RECIPE))
    assert [type(c) for c in plain] == [TBXLoggerCallback]
    with_wandb = tune_callbacks(load_recipe(RECIPE, ["logging.wandb=true"]))
    assert any(isinstance(c, WandbLoggerCallback) for c in with_wandb)
