"""Reward scorers: images ``[B, 3, H, W]`` in ``[0, 1]`` + prompts -> rewards ``[B]``.

``build_scorer(name, path=None, device="cpu", dtype=torch.float32, **options)`` builds one by registry
name (``clip_score``, ``pickscore``, ``hpsv2``, ``hpsv21``, ``imagereward``, ``aesthetic``,
``jpeg_compressibility``, ``jpeg_incompressibility``); ``RewardMixture`` combines several. Importing this
package does not import transformers: each scorer's module is loaded when it is built.
See docs/rewards.md.
"""

from rocm_ray.rewards.base import (
    RewardMixture,
    RewardModelLoadError,
    RewardModelNotFoundError,
    RewardScorer,
    available_scorers,
    build_scorer,
    require_differentiable,
    resolve_dtype,
    scorer_options,
)

__all__ = [
    "RewardMixture",
    "RewardModelLoadError",
    "RewardModelNotFoundError",
    "RewardScorer",
    "available_scorers",
    "build_scorer",
    "require_differentiable",
    "resolve_dtype",
    "scorer_options",
]
