"""``rocm-ray tune``, finished: an interrupted search resumes (Tuner.restore), the best trial becomes a train
recipe that validates, trial outputs honour ROCM_RAY_OUTPUT_ROOT, and a Ray Train trial really runs."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rocm_ray.config import load_recipe

pytestmark = pytest.mark.slow

RECIPE = "recipes/tune_tiny_debug.yaml"
ROOT = Path(__file__).resolve().parents[1]


def _wait_for(pred, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


def _finished_trials(out: Path) -> set[str]:
    """Trial ids whose Tune result.json holds their final (done) result."""
    ids = set()
    for f in out.glob("tune/tune_tiny_debug/*/result.json"):
        m = re.search(r"([0-9a-f]{5}_\d{5})", f.parent.name)
        if m and any(json.loads(line).get("done") for line in f.read_text().splitlines() if line.strip()):
            ids.add(m.group(1))
    return ids


def test_interrupted_search_resumes_and_writes_the_best_recipe(tmp_path, monkeypatch):
    from rocm_ray.tune import tune_recipe

    root = tmp_path / "root"
    overrides = ["train.output_dir=sweep", "train.steps=3", "tune.scheduler=fifo", "tune.max_concurrent_trials=1",
                 "tune.search_space={algorithm.regularizer: [kl], algorithm.beta: [0.01, 0.1, 1.0]}"]
    env = {**os.environ, "ROCM_RAY_OUTPUT_ROOT": str(root), "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "rocm_ray.cli", "tune", RECIPE, *overrides], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = root / "sweep"  # the relative output_dir, under $ROCM_RAY_OUTPUT_ROOT
    try:
        # a trial is finished for Tune once its last result (done) is in its result.json, not before
        _wait_for(lambda: _finished_trials(out) or proc.poll() is not None, 600, "the first trial to finish")
        proc.send_signal(signal.SIGINT)  # Ctrl-C: Tune saves the experiment state and stops
        log = proc.communicate(timeout=180)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    done = _finished_trials(out)
    finished_first = {t: (out / "trials" / t / "summary.json").stat().st_mtime for t in done}
    assert finished_first, log[-3000:]
    assert (out / "tune" / "tune_tiny_debug").is_dir()
    assert not (ROOT / "sweep").exists()  # nothing written relative to the working directory

    monkeypatch.setenv("ROCM_RAY_OUTPUT_ROOT", str(root))
    res = tune_recipe(load_recipe(RECIPE, overrides), resume=True)
    assert res.output_dir == out.resolve()
    assert len(res.rows) == 3 and not res.errors
    assert all(r["status"] == "done" and r["steps"] == 3 for r in res.rows)
    for trial, mtime in finished_first.items():  # trials finished before the interruption were not rerun
        assert (out / "trials" / trial / "summary.json").stat().st_mtime == mtime
    if len(finished_first) < 3:  # the others ran after the resume
        assert len(list(out.glob("trials/*/summary.json"))) == 3

    best = load_recipe(res.best_recipe)  # a ready-to-run train recipe that validates
    assert best.name == "tune_tiny_debug_best" and best.tune.search_space == {}
    assert best.algorithm.beta == res.best["algorithm.beta"] and best.algorithm.regularizer == "kl"
    assert best.train.steps == 3 and best.train.num_workers == 0


def test_a_ray_train_trial_really_runs(tmp_path):
    from rocm_ray.tune import tune_recipe

    recipe = load_recipe(RECIPE, [f"train.output_dir={tmp_path}", "train.steps=2", "train.num_workers=1",
                                  "tune.scheduler=fifo", "ray.reward_num_cpus=0.5",
                                  "tune.search_space={algorithm.beta: [0.01]}"])
    res = tune_recipe(recipe)
    assert len(res.rows) == 1 and not res.errors, res.errors
    row = res.rows[0]
    assert row["status"] == "done" and row["steps"] == 2 and row["kl_to_ref"] >= 0
    run = tmp_path / row["run_dir"]
    # the trial's TorchTrainer wrote its Ray Train checkpoints and the run's outputs
    assert list(run.glob("ray/*/checkpoint_*/state.json")), sorted(str(p) for p in run.rglob("*"))[:20]
    assert (run / "summary.json").is_file() and (run / "weights").is_dir()
