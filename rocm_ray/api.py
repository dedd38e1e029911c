"""The Python entry point of training: ``rocm_ray.train(recipe_or_path, overrides)`` -> :class:`RunResult`.

The same run as ``rocm-ray train`` (the in-process trainer when ``train.num_workers == 0``, Ray Train +
DeepSpeed otherwise), for notebooks and scripts. See docs/api.md.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rocm_ray.config import Recipe
    from rocm_ray.train.inprocess import RunResult


def resolve_recipe(recipe: Recipe | str | Path | dict[str, Any], overrides: list[str] | None = None) -> Recipe:
    """A validated :class:`~rocm_ray.config.Recipe` from a recipe, a YAML path or a plain dict, with
    ``key.path=value`` overrides applied (a bad key or value raises ``RecipeError`` naming it)."""
    from rocm_ray.config import Recipe, load_recipe, recipe_from_dict

    if isinstance(recipe, Recipe):
        return recipe_from_dict(recipe.to_dict(), recipe.source, overrides) if overrides else recipe
    if isinstance(recipe, dict):
        return recipe_from_dict(recipe, "<dict>", overrides)
    if isinstance(recipe, (str, Path)):
        return load_recipe(recipe, overrides)
    raise TypeError(f"train() takes a Recipe, a recipe file path or a dict, not {type(recipe).__name__}")


def train(recipe: Recipe | str | Path | dict[str, Any], overrides: list[str] | None = None, *,
          resume: bool = False) -> RunResult:
    """Fine-tune with regularized ROCM, exactly as ``rocm-ray train RECIPE OVERRIDES [--resume]`` does.

    Args:
        recipe: a :class:`~rocm_ray.config.Recipe`, the path of a recipe YAML file, or a dict with the
            recipe's sections.
        overrides: ``key.path=value`` strings, e.g. ``["train.steps=2", "algorithm.beta=0.1"]``.
        resume: continue from the run's latest checkpoint (the Ray path, ``train.num_workers >= 1``).

    Returns:
        a :class:`~rocm_ray.train.inprocess.RunResult`: ``output_dir`` (metrics.csv, grid.png, weights/,
        summary.md, ...), the metrics rows and the summary dict (reward before/after, wall time).
    """
    r = resolve_recipe(recipe, overrides)
    if r.train.num_workers >= 1:
        from rocm_ray.train.ray_trainer import train_ray

        return train_ray(r, resume=resume)
    if resume:
        from rocm_ray.config import RecipeError

        raise RecipeError(r.source, "train.num_workers", "resume needs the Ray path (train.num_workers >= 1); "
                          "the in-process trainer restarts from step 0")
    from rocm_ray.train.inprocess import train_inprocess

    return train_inprocess(r)
