"""A short real training run pinned by numbers (torchtune-style regression test)."""

from __future__ import annotations

import csv

import pytest
import torch
from safetensors.torch import load_file

from rocm_ray.config import load_recipe
from rocm_ray.models.policy import make_policy
from rocm_ray.train.inprocess import train_inprocess

# recipes/tiny_debug.yaml, seed 0, 8 steps: the per-step ROCM loss (-10 * brightness + 0.01 * KL)
EXPECTED_LOSSES = [-4.514935, -4.516113, -4.527827, -4.540398, -4.543386, -4.537966, -4.546116, -4.5318]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    recipe = load_recipe("recipes/tiny_debug.yaml", [f"train.output_dir={out}"])
    return recipe, train_inprocess(recipe)


def test_losses_are_pinned(tiny_run):
    _, res = tiny_run
    losses = [row["loss"] for row in res.metrics]
    assert losses == pytest.approx(EXPECTED_LOSSES, abs=1e-5)


def test_reward_rises_and_divergence_grows(tiny_run):
    _, res = tiny_run
    assert res.summary["reward_after"] > res.summary["reward_before"]
    first, last = res.metrics[0], res.metrics[-1]
    assert first["divergence"] == 0.0  # the policy starts at the reference (LoRA B = 0)
    assert last["divergence"] > 0.0
    assert all(row["grad_norm"] > 0 and row["images_per_s"] > 0 for row in res.metrics)


def test_trainable_parameters_changed(tiny_run, tiny_pipe):
    recipe, res = tiny_run
    trained = load_file(res.output_dir / "weights/lora/pytorch_lora_weights.safetensors")
    import copy

    from peft.utils import get_peft_model_state_dict

    start = make_policy(copy.deepcopy(tiny_pipe), recipe.model.lora_rank, recipe.model.lora_alpha, seed=0)
    init = get_peft_model_state_dict(start.unet)
    assert len(trained) == len(init) > 0
    changed = sum(not torch.allclose(a, b) for a, b in zip(sorted(trained.values(), key=lambda t: t.numel()),
                                                             sorted(init.values(), key=lambda t: t.numel()),
                                                             strict=True))
    assert changed > len(init) // 2
    assert all(torch.isfinite(v).all() for v in trained.values())


def test_run_outputs(tiny_run):
    _, res = tiny_run
    out = res.output_dir
    for name in ("metrics.csv", "curves.png", "grid.png", "samples.parquet", "summary.json", "summary.md",
                 "recipe.json"):
        assert (out / name).is_file(), name
    with (out / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 8
    assert {"step", "loss", "reward", "divergence", "grad_norm", "images_per_s", "div_step_1", "div_step_4"} <= set(
        rows[0])
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_full_finetuning_runs(tmp_path):
    recipe = load_recipe("recipes/tiny_debug.yaml", [f"train.output_dir={tmp_path}", "model.lora_rank=0",
                                                     "train.steps=2", "train.lr=0.001", "algorithm.regularizer=js"])
    res = train_inprocess(recipe)
    assert (res.output_dir / "weights/unet/config.json").is_file()
    assert res.metrics[-1]["divergence"] > 0
