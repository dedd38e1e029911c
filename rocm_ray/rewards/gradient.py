"""Reward and its gradient w.r.t. the images: what a reward service returns to the policy."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def score_with_grad(scorer, images: Tensor, prompts: Sequence[str]) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """(r [B], dr/dimages [B,3,H,W], per-component rewards) for detached ``images``.

    The gradient is of the (weighted) reward itself; the reward scale is applied by the loss. The reward
    model's graph is freed here, before the policy's backward, so the two never hold memory together.
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be [B, 3, H, W], got {tuple(images.shape)}")
    if len(prompts) != images.shape[0]:
        raise ValueError(f"{len(prompts)} prompts for {images.shape[0]} images")
    x = images.detach().clone().requires_grad_(True)  # [B, 3, H, W]
    with torch.enable_grad():
        if hasattr(scorer, "score_components"):  # a mixture: log every part, backprop the weighted sum
            parts = scorer.score_components(x, list(prompts))  # name -> [B]
            reward = scorer.combine(parts)  # [B]
        else:
            reward = scorer.score(x, list(prompts))  # [B]
            parts = {scorer.name: reward}
        (grad,) = torch.autograd.grad(reward.sum(), x)  # [B, 3, H, W]
    return reward.detach(), grad.detach(), {k: v.detach() for k, v in parts.items()}


@torch.no_grad()
def score_without_grad(scorer, images: Tensor, prompts: Sequence[str]) -> tuple[Tensor, None, dict[str, Tensor]]:
    """(r [B], None, per-component rewards): the reward alone, for policy-gradient training (PPO), which
    needs no dr/dimages and so also takes non-differentiable rewards (JPEG size)."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be [B, 3, H, W], got {tuple(images.shape)}")
    if len(prompts) != images.shape[0]:
        raise ValueError(f"{len(prompts)} prompts for {images.shape[0]} images")
    if hasattr(scorer, "score_components"):
        parts = scorer.score_components(images.detach(), list(prompts))  # name -> [B]
        reward = scorer.combine(parts)  # [B]
    else:
        reward = scorer.score(images.detach(), list(prompts))  # [B]
        parts = {scorer.name: reward}
    return reward.detach(), None, {k: v.detach() for k, v in parts.items()}
