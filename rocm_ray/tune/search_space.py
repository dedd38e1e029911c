"""The search space of ``rocm-ray tune``: ``tune.search_space`` parsed into typed keys and checked before
anything launches.

Every key must be a recipe key and every value (each grid point, the ends of every range) must make a
valid recipe, else a :class:`RecipeError` names ``tune.search_space.<key>``. ``{train: {lr: [...]}}`` and
``{train.lr: [...]}`` mean the same; a mapping ``{uniform|loguniform|choice: [...]}`` is a distribution.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from rocm_ray.config import Recipe, RecipeError, as_number, recipe_from_dict

DISTRIBUTIONS = ("uniform", "loguniform", "choice")


#: metrics every trial reports (plus ``div_step_<n>`` and ``reward_<scorer>`` for mixtures)
REPORTED_METRICS = ("loss", "reward", "divergence", "grad_norm", "images_per_s", "it_per_s", "lr", "step",
                    "eval_reward", "eval_reward_before", "judge_accuracy", "judge_accuracy_before",
                    "kl_to_ref")


#: keys a search may not set: the tune section itself and where trials write (set per trial)
FORBIDDEN_PREFIXES = ("tune", "train.output_dir", "ray")


#: most grid points checked one by one before launching (beyond: each key alone)
MAX_CHECKED_POINTS = 512


@dataclass(frozen=True)
class SearchKey:
    """One searched recipe key: a grid (``values`` tried in turn) or a distribution sampled per trial."""

    key: str
    kind: str  # "grid" | "uniform" | "loguniform" | "choice"
    values: tuple  # grid / choice: the values; uniform / loguniform: (low, high)

    @property
    def numeric(self) -> bool:
        """True when PBT can perturb it (a range, or numbers only)."""
        if self.kind in ("uniform", "loguniform"):
            return True
        return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in self.values)

    def probe_values(self) -> list:
        """Values that must all make a valid recipe: every grid/choice value, both ends of a range."""
        return list(self.values)

    def to_tune(self) -> Any:
        from ray import tune

        if self.kind == "grid":
            return tune.grid_search(list(self.values))
        if self.kind == "choice":
            return tune.choice(list(self.values))
        if self.kind == "uniform":
            return tune.uniform(*self.values)
        return tune.loguniform(*self.values)

    def to_mutation(self) -> Any:
        """PBT's ``hyperparam_mutations`` entry: resample from the list, or from the range."""
        return list(self.values) if self.kind in ("grid", "choice") else self.to_tune()


def _number(v: Any, source: str, key: str) -> float:
    """A range end: a number, or a string YAML left unparsed (PyYAML reads ``1e-3`` as a string)."""
    if isinstance(v, bool):
        raise RecipeError(source, key, f"expected a number, got {v!r}")
    if isinstance(v, (int, float)):
        return float(v)
    try:
        return float(v)
    except (TypeError, ValueError):
        raise RecipeError(source, key, f"expected a number, got {v!r}") from None


def _flatten_space(space: dict) -> dict[str, Any]:
    """``{train: {lr: [...]}}`` (nested YAML, or the override ``tune.search_space.train.lr=[...]``) ->
    ``{"train.lr": [...]}``: a mapping under a recipe section's name (model, algorithm, train, ...) is
    that section's keys; any other mapping is a distribution."""
    import dataclasses

    sections = {f.name for f in dataclasses.fields(Recipe) if f.name not in ("tune", "source")}
    flat: dict[str, Any] = {}
    for k, v in space.items():
        if k in sections and isinstance(v, dict):
            flat.update({f"{k}.{kk}": vv for kk, vv in v.items()})
        else:
            flat[k] = v
    return flat


def parse_search_space(recipe: Recipe) -> list[SearchKey]:
    """``recipe.tune.search_space`` -> typed :class:`SearchKey` s (syntax only; values are checked by
    :func:`check_search_space`)."""
    src = recipe.source
    space = recipe.tune.search_space
    if not space:
        raise RecipeError(src, "tune.search_space", "empty: give at least one key to search, e.g. "
                          "{algorithm.beta: [0.01, 0.1]} or {train.lr: {loguniform: [1.0e-5, 1.0e-3]}}")
    out = []
    for key, spec in _flatten_space(space).items():
        where = f"tune.search_space.{key}"
        if any(key == p or key.startswith(p + ".") for p in FORBIDDEN_PREFIXES):
            raise RecipeError(src, where, "cannot be searched (the tune: and ray: sections and "
                              "train.output_dir are the same for every trial; each trial writes "
                              "<output_dir>/trials/<id>)")
        if isinstance(spec, list):
            if not spec:
                raise RecipeError(src, where, "an empty grid: give at least one value")
            out.append(SearchKey(key, "grid", tuple(as_number(v) for v in spec)))  # "1e-3": the number
        elif isinstance(spec, dict):
            if len(spec) != 1 or next(iter(spec)) not in DISTRIBUTIONS:
                raise RecipeError(src, where, "a distribution is a mapping with one key, one of "
                                  f"{', '.join(DISTRIBUTIONS)}, e.g. {{loguniform: [1.0e-3, 1.0]}}; "
                                  f"got {spec!r}")
            kind, args = next(iter(spec.items()))
            if not isinstance(args, list) or not args:
                raise RecipeError(src, where, f"{kind} takes a list, e.g. {{{kind}: [0.1, 1.0]}}; "
                                  f"got {args!r}")
            if kind == "choice":
                out.append(SearchKey(key, "choice", tuple(as_number(v) for v in args)))
                continue
            if len(args) != 2:
                raise RecipeError(src, where, f"{kind} takes [low, high]; got {args!r}")
            lo, hi = (_number(a, src, where) for a in args)
            if not lo < hi:
                raise RecipeError(src, where, f"{kind}: low must be < high; got [{lo}, {hi}]")
            if kind == "loguniform" and lo <= 0:
                raise RecipeError(src, where, f"loguniform needs 0 < low; got {lo}")
            out.append(SearchKey(key, kind, (lo, hi)))
        else:
            raise RecipeError(src, where, "expected a list of values (a grid) or a distribution "
                              f"{{uniform|loguniform|choice: [...]}}; got {spec!r}")
    return out


def _override(key: str, value: Any) -> str:
    """A ``key=value`` override that parses back to exactly ``value`` (JSON is YAML)."""
    return f"{key}={json.dumps(value)}"


def _yaml_float_hint(value: Any) -> str:
    if isinstance(value, str):
        try:
            float(value)
            return f" (YAML reads {value} as a string: write it with a dot, e.g. 1.0e-3)"
        except ValueError:
            pass
    return ""


def check_search_space(recipe: Recipe, keys: list[SearchKey]) -> int:
    """Build the recipe of every grid point (and both ends of every range) before anything launches.

    Returns the number of points checked. A bad key or value is a :class:`RecipeError` naming
    ``tune.search_space.<key>`` and saying what the recipe allows there.
    """
    base = recipe.to_dict()
    src = recipe.source

    def build(point: dict[str, Any]) -> None:
        try:
            r = recipe_from_dict(base, src, [_override(k, v) for k, v in point.items()])
        except RecipeError as e:
            blamed = next((k for k in point
                           if e.key == k or e.key.startswith(k + ".") or k.startswith(e.key + ".")), None)
            if blamed is not None:
                value = point[blamed]
                raise RecipeError(src, f"tune.search_space.{blamed}",
                                  f"value {value!r}: {e.detail}{_yaml_float_hint(value)}") from None
            combo = ", ".join(f"{k}={v!r}" for k, v in point.items())
            raise RecipeError(src, "tune.search_space", f"the point {{{combo}}} gives an invalid recipe: "
                              f"{e.key}: {e.detail}") from None
        _check_trial_kind(r)

    n_points = math.prod(len(k.probe_values()) for k in keys)
    if n_points <= MAX_CHECKED_POINTS:
        for combo in itertools.product(*(k.probe_values() for k in keys)):
            build({k.key: v for k, v in zip(keys, combo, strict=True)})
        return n_points
    checked = 0
    for k in keys:  # too many combinations: each key's values alone
        for v in k.probe_values():
            build({k.key: v})
            checked += 1
    return checked


def _check_trial_kind(r: Recipe) -> None:
    """Trials on Ray Train need the Ray Train path to accept Tune's report callback; PBT's checkpointed
    in-process loop is ROCM's."""
    if r.tune.scheduler == "pbt" and r.algorithm.name != "rocm":
        raise RecipeError(r.source, "tune.scheduler", f"pbt's checkpointed trials run ROCM only, and this "
                          f"search trains algorithm.name={r.algorithm.name}; use fifo or asha")
    if r.train.num_workers == 0:
        return
    if r.tune.scheduler == "pbt":
        raise RecipeError(r.source, "tune.scheduler", "pbt needs in-process trials (train.num_workers: 0): "
                          "its checkpoint/restore of Ray Train runs is not wired; use asha or fifo")
    _ray_train_entry(r.source)


def _ray_train_entry(source: str) -> Callable:
    """``rocm_ray.train.ray_trainer.train_ray``, checked to accept ``callbacks=`` (for the Train
    ``RunConfig``: Tune's report callback goes there)."""
    import inspect

    try:
        from rocm_ray.train.ray_trainer import train_ray
    except ImportError as e:
        raise RecipeError(source, "train.num_workers", f"the Ray Train path is not available ({e}); "
                          "search with in-process trials (train.num_workers: 0)") from None
    params = inspect.signature(train_ray).parameters
    if "callbacks" not in params and not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        raise RecipeError(source, "train.num_workers", "rocm_ray.train.ray_trainer.train_ray does not take "
                          "callbacks=, so its TorchTrainer cannot report to Tune; search with "
                          "train.num_workers: 0")
    return train_ray


def _check_metric(recipe: Recipe) -> None:
    m = recipe.tune.metric
    if m in REPORTED_METRICS or m.startswith(("div_step_", "reward_")):
        return
    raise RecipeError(recipe.source, "tune.metric", f"{m!r} is not a metric the trials report; one of "
                      f"{', '.join(REPORTED_METRICS)}, div_step_<n>, reward_<scorer name>")
