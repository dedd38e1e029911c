"""Run storage, live metrics and checkpoints without Ray: local folders and a real S3 server (moto).

The in-process trainer on ``recipes/tiny_debug.yaml`` (a few steps, seconds each) checkpoints, resumes,
applies a changed lr (asserted on the optimizer), refuses incompatible changes, never picks a torn
checkpoint, never replaces a run without ``--force``, and does all of it on ``s3://`` as well.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from rocm_ray.config import load_recipe

RECIPE = "recipes/tiny_debug.yaml"
TOL_RESUME = 1e-6  # resume vs uninterrupted, in-process (measured: 0, bit-identical)


def _recipe(out, *overrides):
    return load_recipe(RECIPE, [f"train.output_dir={out}", "data.eval_seeds=1", *overrides])


def _losses(res, steps) -> np.ndarray:
    by_step = {int(r["step"]): r["loss"] for r in res.metrics}
    return np.array([by_step[s] for s in steps])


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    from rocm_ray.train.inprocess import train_inprocess

    return train_inprocess(_recipe(tmp_path_factory.mktemp("full"), "train.steps=6"))


@pytest.fixture(scope="module")
def first_four(tmp_path_factory):
    """4 steps with a checkpoint every 2: the folder later tests resume from (each copies it)."""
    from rocm_ray.train.inprocess import train_inprocess

    out = tmp_path_factory.mktemp("first4")
    train_inprocess(_recipe(out, "train.steps=4", "train.checkpoint_every=2"))
    return out


def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


class RecordingAdamW(torch.optim.AdamW):
    """torch AdamW that records its param groups' hyperparameters at every step."""

    seen: list[dict] = []

    def step(self, closure=None):
        g = self.param_groups[0]
        RecordingAdamW.seen.append({"lr": g["lr"], "weight_decay": g["weight_decay"], "betas": tuple(g["betas"])})
        return super().step(closure)


def test_inprocess_resume_continues_like_uninterrupted(first_four, uninterrupted, tmp_path):
    from rocm_ray.train.inprocess import train_inprocess

    out = _copy(first_four, tmp_path / "run")
    res = train_inprocess(_recipe(out, "train.steps=6", "train.checkpoint_every=2"), resume=True)
    assert [int(r["step"]) for r in res.metrics] == [1, 2, 3, 4, 5, 6]
    rows = (out / "metrics.csv").read_text().splitlines()
    assert [int(line.split(",")[0]) for line in rows[1:]] == [1, 2, 3, 4, 5, 6]  # no duplicate, no gap
    err = np.abs(_losses(res, range(1, 7)) - _losses(uninterrupted, range(1, 7))).max()
    print(f"in-process resume at step 4 vs uninterrupted: max |loss diff| = {err:.3g}")
    assert err <= TOL_RESUME


def test_resume_applies_changed_optimizer_values(first_four, uninterrupted, tmp_path, monkeypatch, capsys):
    from rocm_ray.train.inprocess import train_inprocess

    out = _copy(first_four, tmp_path / "run")
    RecordingAdamW.seen = []
    monkeypatch.setattr(torch.optim, "AdamW", RecordingAdamW)
    res = train_inprocess(_recipe(out, "train.steps=6", "train.lr=0.01", "train.weight_decay=0.1",
                                  "train.adam_betas=[0.8,0.99]", "algorithm.beta=0.02"), resume=True)
    assert RecordingAdamW.seen == [{"lr": 0.01, "weight_decay": 0.1, "betas": (0.8, 0.99)}] * 2  # steps 5, 6
    log = capsys.readouterr().out
    assert "train.lr: 0.05 -> 0.01" in log and "train.weight_decay: 0.0 -> 0.1" in log
    assert "algorithm.beta: 0.01 -> 0.02" in log
    assert [r["lr"] for r in res.metrics] == [0.05] * 4 + [0.01] * 2
    # step 5 starts from the same weights (only its loss's beta differs); step 6 used the new lr
    assert abs(res.metrics[5]["loss"] - uninterrupted.metrics[5]["loss"]) > 1e-4


@pytest.mark.parametrize("override,key", [("model.lora_rank=4", "model.lora_rank"),
                                          ("algorithm.num_inference_steps=2", "algorithm.num_inference_steps"),
                                          ("algorithm.regularizer=js", "algorithm.regularizer")])
def test_resume_refuses_incompatible_changes(first_four, tmp_path, override, key, capsys):
    from rocm_ray.cli import main

    out = _copy(first_four, tmp_path / "run")
    before = sorted(p.name for p in out.rglob("*"))
    assert main(["train", RECIPE, f"train.output_dir={out}", "train.steps=6", override, "--resume"]) == 2
    err = capsys.readouterr().err
    assert f"{RECIPE}: {key}: cannot resume" in err  # names the file and the key
    assert "Traceback" not in err
    assert sorted(p.name for p in out.rglob("*")) == before  # nothing written


def test_torn_checkpoint_is_never_picked(first_four, tmp_path):
    from rocm_ray.train.checkpoint import latest_inprocess
    from rocm_ray.train.storage import RunStorage

    out = _copy(first_four, tmp_path / "run")
    storage = RunStorage(str(out))
    assert latest_inprocess(storage)[1]["step"] == 4
    (out / "checkpoints/checkpoint_000004/optimizer.safetensors").unlink()  # a file the manifest lists
    assert latest_inprocess(storage)[1]["step"] == 2
    (out / "checkpoints/checkpoint_000002/manifest_rank0.json").unlink()  # interrupted before the manifest
    assert latest_inprocess(storage) is None


def test_fresh_run_never_replaces_a_run_without_force(first_four, tmp_path, capsys):
    from rocm_ray.cli import main

    out = _copy(first_four, tmp_path / "run")
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert main(["train", RECIPE, f"train.output_dir={out}", "train.steps=2", "train.checkpoint_every=2"]) == 2
    err = capsys.readouterr().err
    assert "already exists" in err and "--resume" in err and "--force" in err
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ckpts
    assert main(["train", RECIPE, f"train.output_dir={out}", "train.steps=2", "train.checkpoint_every=2",
                 "data.eval_seeds=1", "--force"]) == 0
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint_000002"]


# ------------------------------------------------------------------------------------------------ S3


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    for k, v in s3_server["env"].items():
        monkeypatch.setenv(k, v)
    return s3_server


def test_live_metrics_on_s3_resume_trims_and_appends(s3_env):
    from rocm_ray.train.storage import LiveMetrics, RunStorage, read_metrics

    storage = RunStorage(f"s3://{s3_env['bucket']}/live")
    log = LiveMetrics(storage, tensorboard=True)
    for step in (1, 2, 3):
        log.log({"step": step, "loss": float(step)})
        assert [r["step"] for r in read_metrics(storage)] == list(range(1, step + 1))  # there after each step
    # a crash after step 3, resumed from a step-2 checkpoint: row 3 is written again, once
    log = LiveMetrics(storage, resume_step=2, tensorboard=True)
    assert [r["step"] for r in read_metrics(storage)] == [1, 2]
    log.log({"step": 3, "loss": 30.0})
    log.close()
    assert [(r["step"], r["loss"]) for r in read_metrics(storage)] == [(1, 1.0), (2, 2.0), (3, 30.0)]
    assert any(n.startswith("events.out.tfevents") for n in storage.files("tensorboard"))


def test_inprocess_run_on_s3_checkpoints_and_resumes(s3_env, uninterrupted):
    from rocm_ray.train.checkpoint import latest_inprocess
    from rocm_ray.train.inprocess import train_inprocess
    from rocm_ray.train.storage import RunStorage, read_metrics

    loc = f"s3://{s3_env['bucket']}/inproc"
    train_inprocess(_recipe(loc, "train.steps=4", "train.checkpoint_every=2"))
    storage = RunStorage(loc)
    assert latest_inprocess(storage)[1]["step"] == 4
    res = train_inprocess(_recipe(loc, "train.steps=6", "train.checkpoint_every=2"), resume=True)
    files = storage.files()
    for name in ("metrics.csv", "recipe.json", "summary.json", "summary.md", "samples.parquet", "curves.png",
                 "grid.png", "weights/lora/pytorch_lora_weights.safetensors",
                 "checkpoints/checkpoint_000006/state.json"):
        assert name in files, f"{name} missing on S3: {sorted(files)}"
    assert [r["step"] for r in read_metrics(storage)] == [1, 2, 3, 4, 5, 6]
    assert json.loads(storage.read_text("summary.json"))["steps"] == 6
    err = np.abs(_losses(res, range(1, 7)) - _losses(uninterrupted, range(1, 7))).max()
    assert err <= TOL_RESUME


ELASTIC = """
import os, sys, torch
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1], RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
import torch.distributed as dist
dist.init_process_group("gloo")
from rocm_ray.train.checkpoint import full_optimizer_state, optimizer_step_count, set_full_state
from rocm_ray.train.ds_engine import build_engine, deepspeed_config

def make(stage):
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    return build_engine(m, 0.1, (0.9, 0.999), 0.01, deepspeed_config(2, stage, 1.0))

def train(e, n):
    for i in range(n):
        x = torch.linspace(-1, 1, 8).reshape(2, 4) * (i + 1)  # [2, 4]
        e.backward(e(x).pow(2).sum())
        e.step()

for src, dst in [(2, 2), (0, 2), (2, 0), (1, 0), (0, 1)]:
    a = make(src)
    train(a, 3)
    named = list(a.module.named_parameters())
    moments = full_optimizer_state(named, a.optimizer, src)
    b = make(dst)
    set_full_state(list(b.module.named_parameters()), b.optimizer, dst, {n: p.detach().clone() for n, p in named},
                   moments, optimizer_step_count(a.optimizer))
    train(a, 2)
    train(b, 2)
    diff = max((p - q).abs().max().item() for p, q in zip(a.module.parameters(), b.module.parameters()))
    print(f"ZeRO {src} -> {dst}: {len(moments)} moments, step {optimizer_step_count(a.optimizer) - 2}, "
          f"max |weight diff| after 2 more steps {diff:.3g}")
"""


def test_elastic_optimizer_state_moves_between_zero_stages(tmp_path):
    """The whole-state format (weights + AdamW moments by name) restores any ZeRO 0-2 engine from any other:
    two more steps agree with the original engine's (gloo, one process; the per-rank partitioning itself is
    exercised by the 2 -> 1 worker resume in tests/test_ray_storage.py)."""
    import socket
    import subprocess
    import sys

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    p = subprocess.run([sys.executable, "-c", ELASTIC, str(port)], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("ZeRO")]
    print("\n".join(lines))
    assert len(lines) == 5
    for ln in lines:
        assert "8 moments, step 3" in ln  # 4 tensors x (exp_avg, exp_avg_sq), AdamW step count carried over
        assert float(ln.rsplit(" ", 1)[1]) <= 1e-6, ln


def test_live_metrics_wandb_offline_and_tensorboard_local(tmp_path, monkeypatch):
    """W&B offline (no key, no network): one run id per location, files under <location>/wandb; TensorBoard
    events under <location>/tensorboard; metrics.csv appended line by line."""
    pytest.importorskip("wandb")
    from rocm_ray.train.storage import LiveMetrics, RunStorage, read_metrics

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    storage = RunStorage(str(tmp_path / "run"))
    log = LiveMetrics(storage, tensorboard=True, wandb_project="rocm_ray_test", run_name="t")
    assert log._wandb is not None, "W&B offline must start without a key or network"
    for step in (1, 2):
        log.log({"step": step, "loss": -float(step), "lr": 0.05})
    log.close()
    assert [r["step"] for r in read_metrics(storage)] == [1, 2]
    assert (tmp_path / "run/metrics.csv").read_text().count("\n") == 3  # header + 2 rows
    assert list((tmp_path / "run/tensorboard").glob("events.out.tfevents.*"))
    assert list((tmp_path / "run/wandb").glob("offline-run-*"))
