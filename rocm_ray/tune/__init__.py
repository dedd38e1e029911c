"""``rocm-ray tune``: Ray Tune searches over recipes (regularizer x beta x lr, or any recipe key).

The package, by what a newcomer looks for:

* :mod:`rocm_ray.tune.search_space`: ``tune.search_space`` parsed (grids, uniform / loguniform / choice) and
  checked point by point before anything launches;
* :mod:`rocm_ray.tune.trials`: what one trial runs (in-process, Ray Train, or PBT's checkpointed loop) and
  reports, and ``kl_to_ref``, the divergence measure shared by every regularizer;
* :mod:`rocm_ray.tune.search`: the ``Tuner`` (schedulers, resources, loggers, resume of an interrupted
  search);
* :mod:`rocm_ray.tune.results`: the table, the best trial (also as a ready-to-run recipe), the Pareto front
  and its plot;
* :mod:`rocm_ray.tune.cli`: ``rocm-ray tune``.
"""

from rocm_ray.tune.cli import cmd_tune, register_cli
from rocm_ray.tune.results import (
    ResultSummary,
    pareto_axes,
    pareto_front,
    pick_best,
    plot_pareto,
    summarize,
    write_tables,
)
from rocm_ray.tune.search import tune_callbacks, tune_recipe
from rocm_ray.tune.search_space import SearchKey, check_search_space, parse_search_space
from rocm_ray.tune.trials import TrialSpec, kl_to_reference, load_trained_policy, run_trial, trial_recipe

__all__ = [
    "ResultSummary", "SearchKey", "TrialSpec", "check_search_space", "cmd_tune", "kl_to_reference",
    "load_trained_policy", "pareto_axes", "pareto_front", "parse_search_space", "pick_best", "plot_pareto",
    "register_cli", "run_trial", "summarize", "trial_recipe", "tune_callbacks", "tune_recipe", "write_tables",
]
