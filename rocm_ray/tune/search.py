"""The search of ``rocm-ray tune``: Ray Tune's ``Tuner`` over the trials, with fifo / ASHA / PBT, TensorBoard
(and W&B) logging, and the results written at the end (:mod:`rocm_ray.tune.results`).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from rocm_ray.config import Recipe, RecipeError, recipe_from_dict
from rocm_ray.tune.results import ResultSummary, summarize
from rocm_ray.tune.search_space import (
    SearchKey,
    _check_metric,
    _check_trial_kind,
    _override,
    check_search_space,
    parse_search_space,
)
from rocm_ray.tune.trials import TrialSpec, _absolute_paths, run_trial


def _scheduler(recipe: Recipe, keys: list[SearchKey]):
    """fifo, ASHA on the step count, or PBT perturbing the numeric searched keys (train.lr, algorithm.beta).
    Returns the scheduler and PBT's checkpoint interval in steps (0 = trials need no checkpoints)."""
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, PopulationBasedTraining

    steps = recipe.train.steps
    kind = recipe.tune.scheduler
    if kind == "fifo":
        return FIFOScheduler(), 0
    if kind == "asha":
        # short runs: a first rung after a quarter of the run, halving at each rung (reduction factor 2)
        return ASHAScheduler(time_attr="step", max_t=steps, grace_period=max(1, steps // 4),
                             reduction_factor=2), 0
    mutations = {k.key: k.to_mutation() for k in keys if k.numeric}
    if not mutations:
        raise RecipeError(recipe.source, "tune.scheduler", "pbt perturbs numeric searched keys, and "
                          "tune.search_space has none: add e.g. train.lr: {loguniform: [1.0e-4, 1.0e-2]} or "
                          "algorithm.beta: [0.01, 0.1, 1.0]")
    interval = max(1, steps // 4)
    return PopulationBasedTraining(time_attr="step", perturbation_interval=interval,
                                   hyperparam_mutations=mutations, quantile_fraction=0.25,
                                   resample_probability=0.25, synch=True), interval


def tune_callbacks(recipe: Recipe) -> list:
    """Tune's TensorBoard logger (events per trial under ``<output_dir>/tune``), and W&B (one W&B run per
    trial, grouped by the recipe name) when ``logging.wandb`` is on."""
    from ray.tune.logger import TBXLoggerCallback

    callbacks: list = [TBXLoggerCallback()]
    if recipe.logging.wandb:
        from ray.air.integrations.wandb import WandbLoggerCallback

        callbacks.append(WandbLoggerCallback(project=recipe.logging.wandb_project, group=recipe.name,
                                             log_config=True))
    return callbacks


def _start_ray(recipe: Recipe, dashboard: bool = False) -> bool:
    """Connect to ``ray.address`` / ``$RAY_ADDRESS``, else start a local Ray on loopback (its dashboard,
    on loopback too, only when Ray Train trials need its state API). Returns True when this call
    connected (so :func:`tune_recipe` disconnects at the end)."""
    import ray

    if ray.is_initialized():
        return False
    address = recipe.ray.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        opts: dict[str, Any] = {"include_dashboard": dashboard}
        if dashboard:
            opts["dashboard_host"] = "127.0.0.1"
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        from rocm_ray.security import apply_local_ray_env

        apply_local_ray_env()  # every Ray server on 127.0.0.1, token auth with a token of this process
        for attempt in range(1, LOCAL_RAY_ATTEMPTS + 1):
            try:
                ray.init(address="local", _node_ip_address="127.0.0.1", log_to_driver=True, **opts)  # our own
                break
            except Exception as e:  # noqa: BLE001 - only Ray's start-up timeout is retried
                # Ray waits a fixed 30 s for its raylet; on an overloaded machine that is not enough
                if "timed out during startup" not in str(e) or attempt == LOCAL_RAY_ATTEMPTS:
                    raise
                print(f"rocm-ray tune: the local Ray did not start in time (attempt {attempt}/"
                      f"{LOCAL_RAY_ATTEMPTS}, machine overloaded?); trying again", flush=True)
                ray.shutdown()
    return True


#: tries to start a local Ray whose raylet misses Ray's fixed 30 s start-up window (an overloaded machine)
LOCAL_RAY_ATTEMPTS = 3


def _trial_resources(config: dict, spec: TrialSpec):
    """In-process trials hold one CPU (or GPU); a Ray Train trial's driver holds almost nothing (its
    TorchTrainer asks for its own workers; tune.max_concurrent_trials bounds how many run at once)."""
    from ray.tune import PlacementGroupFactory

    r = recipe_from_dict(spec.base, spec.source, [_override(k, v) for k, v in config.items()])
    if r.train.num_workers >= 1:
        return PlacementGroupFactory([{"CPU": 0.01}])
    return PlacementGroupFactory([{"CPU": 1, "GPU": 1} if r.train.use_gpu else {"CPU": 1}])


def tune_recipe(recipe: Recipe, resume: bool = False) -> ResultSummary:
    """Run the search of ``recipe.tune`` over ``recipe`` on Ray Tune; write results.csv/.md, pareto.png and
    best_recipe.yaml.

    The search space is checked (every grid point built as a recipe) before Ray starts. ``resume``: continue
    an interrupted search of the same recipe (``Tuner.restore`` of ``<output_dir>/tune/<name>``).
    """
    keys = parse_search_space(recipe)
    _check_metric(recipe)
    n_checked = check_search_space(recipe, keys)
    _check_trial_kind(recipe)
    scheduler, ckpt_every = _scheduler(recipe, keys)

    from ray import tune

    out = output_dir(recipe)
    tune_dir = out / "tune"
    (out / "trials").mkdir(parents=True, exist_ok=True)
    spec = TrialSpec(base=_absolute_paths(recipe), source=recipe.source, trials_dir=str(out / "trials"),
                     wandb_callback=recipe.logging.wandb, pbt_checkpoint_every=ckpt_every)
    callbacks = tune_callbacks(recipe)
    n_grid = math.prod(len(k.values) for k in keys if k.kind == "grid")
    print(f"rocm-ray tune: {recipe.name}: {n_grid * recipe.tune.num_samples} trials "
          f"({', '.join(k.key for k in keys)}; {n_checked} grid points checked), scheduler "
          f"{recipe.tune.scheduler}, metric {recipe.tune.metric} ({recipe.tune.mode}), "
          f"{recipe.tune.max_concurrent_trials} at a time -> {out}", flush=True)

    started = _start_ray(recipe, dashboard=recipe.train.num_workers >= 1
                         or any(k.key == "train.num_workers" for k in keys))
    try:
        trainable = tune.with_resources(tune.with_parameters(run_trial, spec=spec),
                                        lambda config: _trial_resources(config, spec))
        experiment = tune_dir / recipe.name
        if resume and tune.Tuner.can_restore(str(experiment)):
            # an interrupted search: finished trials are kept, unfinished and errored ones run again
            print(f"rocm-ray tune: resuming the search in {experiment}", flush=True)
            tuner = tune.Tuner.restore(str(experiment), trainable=trainable, resume_unfinished=True,
                                       resume_errored=True, restart_errored=False)
            return _fit_and_summarize(tuner, recipe, keys, out, started)
        if resume:
            print(f"rocm-ray tune: --resume: no search to resume in {experiment}; starting afresh", flush=True)
        tuner = tune.Tuner(
            trainable,
            param_space={k.key: k.to_tune() for k in keys},
            tune_config=tune.TuneConfig(metric=recipe.tune.metric, mode=recipe.tune.mode, scheduler=scheduler,
                                        num_samples=recipe.tune.num_samples,
                                        max_concurrent_trials=recipe.tune.max_concurrent_trials,
                                        reuse_actors=True),  # no new process (and imports) per trial
            run_config=tune.RunConfig(name=recipe.name, storage_path=str(tune_dir), callbacks=callbacks,
                                      verbose=1, checkpoint_config=tune.CheckpointConfig(
                                          # PBT clones other trials' checkpoints: keep a few
                                          num_to_keep=4 if ckpt_every else 2)),
        )
    except BaseException:
        if started:
            import ray

            ray.shutdown()
        raise
    return _fit_and_summarize(tuner, recipe, keys, out, started)


def _fit_and_summarize(tuner, recipe: Recipe, keys: list[SearchKey], out: Path, started: bool) -> ResultSummary:
    try:
        grid = tuner.fit()
    finally:
        if started:
            import ray

            ray.shutdown()
    return summarize(recipe, keys, grid, out)


def output_dir(recipe: Recipe) -> Path:
    """Where the search writes: ``train.output_dir``, under ``$ROCM_RAY_OUTPUT_ROOT`` when relative (as a
    training run; every trial's folder is ``<this>/trials/<trial id>``)."""
    from rocm_ray.train.ray_trainer import resolve_output_dir

    return resolve_output_dir(recipe)
