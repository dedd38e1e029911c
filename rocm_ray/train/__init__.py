"""Training: ``step.py`` (one ROCM step), ``inprocess.py`` (one process), ``ray_trainer.py`` + ``ray_worker.py``
(Ray Train + DeepSpeed), ``outputs.py`` (what a run writes), ``progress.py`` (the run log).

The package is also callable, so that ``rocm_ray.train(recipe, overrides)`` -- the Python API's train
function -- and the subpackage ``rocm_ray.train`` can share one name: ``rocm_ray.train("recipes/x.yaml")``
is :func:`rocm_ray.api.train`. Importing this package imports nothing heavy.
"""

from __future__ import annotations

import sys
import types
from typing import Any


class _CallableTrainPackage(types.ModuleType):
    def __call__(self, recipe: Any, overrides: list[str] | None = None, **kwargs: Any) -> Any:
        """``rocm_ray.train(recipe, overrides, resume=False)``: see :func:`rocm_ray.api.train`."""
        from rocm_ray.api import train

        return train(recipe, overrides, **kwargs)


sys.modules[__name__].__class__ = _CallableTrainPackage
