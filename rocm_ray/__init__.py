"""rocm_ray: RLHF fine-tuning of latent consistency models with regularized ROCM, from a notebook or a cluster.

The Python API (see docs/api.md)::

    import rocm_ray

    pipe = rocm_ray.load_pipeline("random:0")          # or a folder / HF id / "embedded:tiny/lcm"
    images = rocm_ray.sample(pipe, ["a digit 3"], num_inference_steps=4, guidance_scale=8.0, seed=0)
    d = rocm_ray.gaussian_divergence("kl", mean_p, mean_q, var, reduction="sum")
    scorer = rocm_ray.build_scorer("toy_brightness")
    result = rocm_ray.train("recipes/tiny_debug.yaml", ["train.steps=2"])

Importing ``rocm_ray`` is light: it imports neither torch, Ray, DeepSpeed nor diffusers. Each name below is
resolved from its module the first time it is used (PEP 562 ``__getattr__``), so a notebook pays only for
what it calls.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# public name -> module that defines it
_EXPORTS: dict[str, str] = {
    "sample": "rocm_ray.sampling",
    "sample_trajectory": "rocm_ray.sampling",
    "draw_noise": "rocm_ray.sampling",
    "encode_prompts": "rocm_ray.sampling",
    "latent_shape": "rocm_ray.sampling",
    "unet_eps_fn": "rocm_ray.sampling",
    "Trajectory": "rocm_ray.sampling",
    "StepKernel": "rocm_ray.sampling",
    "gaussian_divergence": "rocm_ray.divergences",
    "DIVERGENCES": "rocm_ray.divergences",
    "rocm_loss": "rocm_ray.loss",
    "step_divergences": "rocm_ray.loss",
    "RocmLoss": "rocm_ray.loss",
    "load_recipe": "rocm_ray.config",
    "recipe_from_dict": "rocm_ray.config",
    "Recipe": "rocm_ray.config",
    "RecipeError": "rocm_ray.config",
    "RewardScorer": "rocm_ray.rewards.base",
    "RewardMixture": "rocm_ray.rewards.base",
    "build_scorer": "rocm_ray.rewards.base",
    "available_scorers": "rocm_ray.rewards.base",
    "score_with_grad": "rocm_ray.rewards.gradient",
    "load_pipeline": "rocm_ray.models.policy",
    "make_policy": "rocm_ray.models.policy",
    "Policy": "rocm_ray.models.policy",
    "load_model": "rocm_ray.loading",
    "train": "rocm_ray.api",  # resolved to the callable subpackage rocm_ray.train (see __getattr__)
    "RunResult": "rocm_ray.train.inprocess",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:  # for type checkers and IDEs only; never executed
    from rocm_ray.api import train  # noqa: F401
    from rocm_ray.config import Recipe, RecipeError, load_recipe, recipe_from_dict  # noqa: F401
    from rocm_ray.divergences import DIVERGENCES, gaussian_divergence  # noqa: F401
    from rocm_ray.loading import load_model  # noqa: F401
    from rocm_ray.loss import RocmLoss, rocm_loss, step_divergences  # noqa: F401
    from rocm_ray.models.policy import Policy, load_pipeline, make_policy  # noqa: F401
    from rocm_ray.rewards.base import RewardMixture, RewardScorer, available_scorers, build_scorer  # noqa: F401
    from rocm_ray.rewards.gradient import score_with_grad  # noqa: F401
    from rocm_ray.sampling import (  # noqa: F401
        StepKernel,
        Trajectory,
        draw_noise,
        encode_prompts,
        latent_shape,
        sample,
        sample_trajectory,
        unet_eps_fn,
    )
    from rocm_ray.train.inprocess import RunResult  # noqa: F401


def __getattr__(name: str) -> Any:
    """Import the module that defines ``name`` on first use and cache the attribute here."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'rocm_ray' has no attribute {name!r}")
    if name == "train":  # the subpackage rocm_ray.train is callable: rocm_ray.train(...) is rocm_ray.api.train
        return importlib.import_module("rocm_ray.train")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
