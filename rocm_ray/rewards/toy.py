"""Differentiable toy rewards for debugging runs and tests (no weights needed)."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor


class BrightnessReward:
    """Mean pixel intensity in [0, 1]: trivially hackable, useful to see that optimization works."""

    name = "toy_brightness"
    differentiable = True

    def __init__(self, path: str | None = None, device: object = "cpu", dtype: object = None) -> None:
        del path, device, dtype  # no weights

    def score(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        return images.mean(dim=(1, 2, 3))  # [B]


class RednessReward:
    """Red minus the mean of green and blue, in [-1, 1]."""

    name = "toy_redness"
    differentiable = True

    def __init__(self, path: str | None = None, device: object = "cpu", dtype: object = None) -> None:
        del path, device, dtype  # no weights

    def score(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        r, g, b = images.unbind(1)  # each [B, H, W]
        return (r - (g + b) / 2).mean(dim=(1, 2))  # [B]
