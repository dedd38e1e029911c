"""Differentiable toy rewards for debugging runs and tests (no weights needed)."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor


class BrightnessReward:
    """Mean pixel intensity in [0, 1]: trivially hackable, useful to see that optimization works."""

    name = "toy_brightness"
    differentiable = True

    def score(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        return images.mean(dim=(1, 2, 3))  # [B]


class RednessReward:
    """Red minus the mean of green and blue, in [-1, 1]."""

    name = "toy_redness"
    differentiable = True

    def score(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        r, g, b = images.unbind(1)  # each [B, H, W]
        return (r - (g + b) / 2).mean(dim=(1, 2))  # [B]


TOY_SCORERS = {"toy_brightness": BrightnessReward, "toy_redness": RednessReward}
