"""Evaluation helpers shared by the trainers and ``rocm-ray eval``: rewards and the digit judge."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


@torch.no_grad()
def score_images(scorer, images: Tensor, prompts: Sequence[str], batch_size: int = 64) -> Tensor:
    """Rewards [B] of ``images`` under ``scorer`` (batched, no graph)."""
    out = [scorer.score(images[i:i + batch_size], list(prompts[i:i + batch_size])).float().cpu()
           for i in range(0, len(prompts), batch_size)]
    return torch.cat(out)


_JUDGE = {}


def judge_accuracy(images: Tensor, prompts: Sequence[str]) -> float | None:
    """Fraction of images the embedded held-out digit judge reads as the digit their prompt asks for.

    None when the prompts are not digit prompts or the embedded judge is not installed.
    """
    try:
        from rocm_ray.models.judge import judge_predict, load_judge
        from rocm_ray.models.tiny_world import prompt_digit
        from rocm_ray.paths import resolve_path
    except ImportError:
        return None
    try:
        labels = [prompt_digit(p) for p in prompts]
    except ValueError:
        return None
    if any(lbl is None for lbl in labels):
        return None
    if "judge" not in _JUDGE:
        try:
            _JUDGE["judge"] = load_judge(resolve_path("embedded:tiny/judge"))
        except (FileNotFoundError, OSError):
            return None
    pred = judge_predict(_JUDGE["judge"], images)
    return float((pred.cpu() == torch.tensor(labels)).float().mean())
