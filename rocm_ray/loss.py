"""The regularized ROCM objective (Shekhar & Zhang, "ROCM: RLHF on consistency models", arXiv 2503.06171,
the regularized objective of Sec. 4):

    L(theta) = E_{c, z} [ -s * r(x_0, c) + beta * sum_n D(pi_theta(. | x_n) || pi_ref(. | x_n)) ]

with s the reward scale, x_0 the image at the end of the reparameterized trajectory, and D one of the
divergences of :mod:`rocm_ray.divergences` between the Gaussian step kernels. Which steps are
regularized: every stochastic step n < N, plus the noise-free last step when ``algorithm.terminal`` is
"auto" (see docs/math.md). Expectations are batch means.

The reward enters through its gradient g = dr/dx_0, which may come from a remote reward service:
``x_0 . g`` has the same gradient as r(x_0) w.r.t. theta, so the policy backpropagates
``-s * sum(x_0 * g) / B`` and never needs the reward model's weights.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from rocm_ray.divergences import gaussian_divergence
from rocm_ray.sampling import StepKernel


def step_divergences(kernels: Sequence[StepKernel], regularizer: str, reduction: str = "mean") -> Tensor:
    """Per-sample, per-step divergences [B, K] between the policy's and the reference's step kernels."""
    if not kernels:
        raise ValueError("no step kernels to regularize (N = 1 with algorithm.terminal = 'none'?)")
    cols = []
    for k in kernels:
        if k.mean_ref is None:
            cols.append(torch.zeros(k.mean_policy.shape[0], device=k.mean_policy.device))
        else:
            cols.append(gaussian_divergence(regularizer, k.mean_policy.float(), k.mean_ref.float(), k.var,
                                            reduction=reduction))  # [B]
    return torch.stack(cols, dim=1)  # [B, K]


def reward_surrogate(images: Tensor, reward_grad: Tensor) -> Tensor:
    """sum over pixels of images * dr/dimages, per sample [B]: same gradient as r w.r.t. the policy."""
    if images.shape != reward_grad.shape:
        raise ValueError(f"reward gradient shape {tuple(reward_grad.shape)} != images {tuple(images.shape)}")
    return (images * reward_grad.to(images.dtype)).flatten(1).sum(1)  # [B]


@dataclass
class RocmLoss:
    surrogate: Tensor  # scalar to backpropagate (its gradient is the objective's)
    loss: float  # the objective's value: mean(-s r) + beta * mean(sum_n D_n)
    reward: float  # mean reward (unscaled)
    divergence: float  # mean over the batch of sum_n D_n
    step_divergences: list[float]  # mean over the batch, per step


def rocm_loss(images: Tensor, reward: Tensor, reward_grad: Tensor, divergences: Tensor, beta: float,
              reward_scale: float = 1.0) -> RocmLoss:
    """Assemble the ROCM objective from the reward (r, dr/dx) and the per-step divergences [B, K].

    On a data-parallel shard this is the shard's mean; averaging gradients over equal shards (DDP,
    DeepSpeed) gives the gradient of the global-batch mean.
    """
    reg = divergences.sum(1)  # [B]
    surrogate = (-reward_scale * reward_surrogate(images, reward_grad) + beta * reg).mean()
    value = (-reward_scale * reward.float() + beta * reg.detach()).mean()
    per_step = divergences.detach().mean(0)  # [K]
    return RocmLoss(
        surrogate=surrogate,
        loss=float(value),
        reward=float(reward.float().mean()),
        divergence=float(reg.detach().mean()),
        step_divergences=[float(v) for v in per_step],
    )
