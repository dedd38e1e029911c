"""The run log: quiet libraries unless --verbose, a live bar on a terminal, periodic lines otherwise, the
summary table."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rocm_ray.train.progress import Progress, format_line, summary_table

REPO = Path(__file__).resolve().parents[1]


def _row(step: int, it_per_s: float = 2.0) -> dict:
    return {"step": step, "loss": -1.0 * step, "reward": 0.5 + step / 100, "divergence": 0.01 * step,
            "grad_norm": 0.1, "images_per_s": 8.0, "it_per_s": it_per_s, "lr": 0.01, "div_step_1": 0.01 * step}


def test_lines_when_not_a_terminal():
    buf = io.StringIO()  # not a tty: the periodic lines, every log_every steps and the last
    p = Progress(5, log_every=2, stream=buf)
    assert not p.live
    for s in range(1, 6):
        p.update(_row(s))
    p.close()
    lines = buf.getvalue().splitlines()
    assert [ln.split("|")[0].strip() for ln in lines] == ["step    2/5", "step    4/5", "step    5/5"]
    assert lines[-1] == format_line(_row(5), 5) and "\r" not in buf.getvalue()


def test_live_bar_on_a_terminal():
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    buf = Tty()
    p = Progress(4, log_every=1, stream=buf)
    assert p.live
    for s, rate in zip(range(1, 5), (2.0, 4.0, 4.0, 4.0), strict=True):
        p.update(_row(s, rate))
    out = buf.getvalue()
    frames = out.split("\r")[1:]
    assert len(frames) == 4 and out.endswith("\n") and out.count("\n") == 1  # one line, redrawn in place
    last = frames[-1]
    assert "4/4" in last and "reward 0.5400" in last and "div 0.04" in last
    # it/s from the steps' own durations (0.5 + 3 x 0.25 s): 4 / 1.25 s = 3.2; ETA of the last frame 0
    assert "3.20 it/s" in last and "00:01<00:00" in last
    assert "1/4" in frames[0] and "2.00 it/s" in frames[0] and "<00:02" in frames[0]  # 3 steps at 2 it/s left


def test_forced_modes(monkeypatch):
    monkeypatch.setenv("ROCM_RAY_PROGRESS", "lines")

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    assert not Progress(3, stream=Tty()).live
    monkeypatch.setenv("ROCM_RAY_PROGRESS", "bar")
    assert Progress(3, stream=io.StringIO()).live


def test_summary_table():
    t = summary_table({"name": "r", "reward_before": 5.6410, "reward_after": 9.5213, "judge_accuracy_before": 1.0,
                       "judge_accuracy_after": 0.5, "steps": 2, "regularizer": "kl", "beta": 1.0,
                       "wall_time_s": 1.7})
    lines = t.splitlines()
    assert lines[0] == "r: summary"
    rows = {ln.split("|")[1].strip(): [c.strip() for c in ln.split("|")[2:5]] for ln in lines if ln.startswith("| ")}
    assert rows["reward"] == ["5.6410", "9.5213", "+3.8803"]
    assert rows["judge_accuracy"] == ["1.0000", "0.5000", "-0.5000"]
    assert lines[-1] == "steps 2, regularizer kl, beta 1.0, wall_time_s 1.7"
    assert len({len(ln) for ln in lines[1:-1]}) == 1  # aligned


QUIET_PROBE = """
import warnings
from rocm_ray.train.progress import quiet_libraries
quiet_libraries()
from rocm_ray.models.policy import load_pipeline
load_pipeline("embedded:tiny/lcm")
warnings.warn("rocm_ray's own warnings stay visible", UserWarning)
"""


@pytest.mark.slow
def test_quiet_unless_verbose():
    """Loading the embedded pipeline (diffusers' torch_dtype FutureWarning and 'Loading pipeline components'
    bars): nothing of it after quiet_libraries(); all of it back with ROCM_RAY_VERBOSE=1 (the --verbose flag)."""
    base = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    for k in ("ROCM_RAY_VERBOSE", "HF_HUB_DISABLE_PROGRESS_BARS", "DIFFUSERS_VERBOSITY", "TRANSFORMERS_VERBOSITY"):
        base.pop(k, None)
    outs = {}
    for verbose in ("0", "1"):
        p = subprocess.run([sys.executable, "-c", QUIET_PROBE], env={**base, "ROCM_RAY_VERBOSE": verbose},
                           cwd=REPO, capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stderr[-3000:]
        outs[verbose] = p.stdout + p.stderr
    noise = ("FutureWarning", "Loading pipeline components")
    assert all(n in outs["1"] for n in noise), outs["1"][-2000:]  # the probe does trigger them
    assert not any(n in outs["0"] for n in noise), outs["0"][-2000:]
    assert "rocm_ray's own warnings stay visible" in outs["0"]


def test_cli_verbose_flag_reaches_the_environment(monkeypatch, capsys):
    """`rocm-ray train ... --verbose` records the choice where Ray workers inherit it, before anything runs;
    without the flag the environment is left as it was."""
    from rocm_ray.cli import main

    # setenv, not delenv: monkeypatch then removes what main() sets, so later tests (and the Ray clusters
    # they start) do not inherit ROCM_RAY_VERBOSE=1
    monkeypatch.setenv("ROCM_RAY_VERBOSE", "0")
    assert main(["train", "recipes/does_not_exist.yaml"]) == 2
    assert os.environ["ROCM_RAY_VERBOSE"] == "0"
    assert main(["train", "recipes/does_not_exist.yaml", "--verbose"]) == 2
    assert os.environ["ROCM_RAY_VERBOSE"] == "1"
    assert "recipe file not found" in capsys.readouterr().err
