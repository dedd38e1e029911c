"""GPU checks (skipped without CUDA): parity on the device and a bf16 autocast ROCM step."""

from __future__ import annotations

import copy

import pytest
import torch

from rocm_ray.models.policy import make_policy
from rocm_ray.rewards.gradient import score_with_grad
from rocm_ray.rewards.toy import BrightnessReward
from rocm_ray.sampling import sample
from rocm_ray.train.step import rocm_step

pytestmark = pytest.mark.gpu


def test_parity_on_cuda(tiny_pipe):
    pipe = copy.deepcopy(tiny_pipe).to("cuda")
    ours = sample(pipe, ["a handwritten digit 7"], num_inference_steps=4, guidance_scale=8.0, seed=0)
    theirs = pipe(["a handwritten digit 7"], num_inference_steps=4, guidance_scale=8.0,
                  generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert (ours.cpu() - theirs.cpu()).abs().max() < 1e-3


def test_bf16_autocast_step(tiny_pipe):
    policy = make_policy(copy.deepcopy(tiny_pipe).to("cuda"), lora_rank=4)
    scorer = BrightnessReward()
    res = rocm_step(policy, ["a digit 1", "a digit 2"], [0, 1], lambda x, p: score_with_grad(scorer, x, p),
                    num_inference_steps=4, guidance_scale=8.0, regularizer="kl", beta=0.1,
                    autocast_dtype=torch.bfloat16)
    grads = [p.grad for p in policy.trainable_parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert res.images.shape == (2, 3, 16, 16)
