"""``rocm-ray tune``: Ray Tune searches over recipes (regularizer x beta x lr, or any recipe key).

Every trial is one ordinary training run of the recipe with the trial's values applied as ``key=value``
overrides, writing its own run folder ``<output_dir>/trials/<trial id>``:

* ``train.num_workers == 0``: a function trainable runs :func:`rocm_ray.train.inprocess.train_inprocess`
  and reports every step with ``ray.tune.report`` (``training_iteration`` == ``step``).
* ``train.num_workers >= 1``: the trial builds and fits its own ``TorchTrainer`` through
  :mod:`rocm_ray.train.ray_trainer` (the Ray Train V2 pattern); the workers' ``ray.train.report`` calls
  reach Tune through ``ray.tune.integration.ray_train.TuneReportCallback`` in the Train ``RunConfig``.
* ``tune.scheduler: pbt``: in-process trials run a checkpointed loop (LoRA / UNet weights + AdamW state)
  so that PBT can clone a good trial and perturb ``train.lr`` / ``algorithm.beta``.

The search space is checked before anything launches: every key must be a recipe key and every value
(each grid point, the ends of every range) must make a valid recipe, else a :class:`RecipeError` names
``tune.search_space.<key>``. After the search: ``results.csv``, ``results.md`` (one row per trial) and
``pareto.png`` (final reward vs final divergence, the non-dominated trials labelled) in the output dir.
"""

from __future__ import annotations

import csv
import itertools
import json
import math
import os
import re
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
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


# ------------------------------------------------------------------------------------------ search space


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
    """Trials on Ray Train need the Ray Train path to accept Tune's report callback."""
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


# ---------------------------------------------------- a divergence on one scale for every trial (Pareto)


def _device() -> str:
    """Where in-process work runs: the in-process trainer's rule (CUDA when this process sees one)."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load_trained_policy(recipe: Recipe, weights_dir: Path):
    """The recipe's policy with a run's trained weights (``weights/lora`` or ``weights/unet``) loaded;
    None when the run wrote no weights there."""
    import torch

    from rocm_ray.train.builders import build_policy

    policy = build_policy(recipe, _device())
    lora_file = weights_dir / "lora" / "pytorch_lora_weights.safetensors"
    if policy.lora and lora_file.is_file():
        from diffusers.utils import convert_unet_state_dict_to_peft
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        sd = {k[len("unet."):]: v for k, v in load_file(str(lora_file)).items() if k.startswith("unet.")}
        res = set_peft_model_state_dict(policy.unet, convert_unet_state_dict_to_peft(sd),
                                        adapter_name="default")
        if getattr(res, "unexpected_keys", None):
            raise RuntimeError(f"{lora_file}: LoRA keys the policy does not have: {res.unexpected_keys[:3]}")
        return policy
    if not policy.lora and (weights_dir / "unet").is_dir():
        from diffusers import UNet2DConditionModel

        trained = UNet2DConditionModel.from_pretrained(str(weights_dir / "unet"))
        with torch.no_grad():
            policy.unet.load_state_dict(trained.state_dict())  # copies onto the policy's device and dtype
        return policy
    return None


def kl_to_reference(policy, recipe: Recipe) -> float:
    """KL(policy step kernel || reference step kernel) per latent dimension, summed over the N steps
    (terminal kernel included), averaged over the recipe's fixed eval prompts x seeds.

    Every trial's own ``divergence`` is in its regularizer's units (KL, JS, Hellinger, ...; 0 when
    beta = 0), so trials with different regularizers cannot be compared on it; this is the same measure
    for all of them, which is what the Pareto front needs.
    """
    import torch

    from rocm_ray.config import prompts_of
    from rocm_ray.loss import step_divergences
    from rocm_ray.sampling import draw_noise, encode_prompts, latent_shape, sample_trajectory
    from rocm_ray.train.builders import eval_grid_inputs

    a = recipe.algorithm
    ps, ss = eval_grid_inputs(recipe, prompts_of(recipe))
    device = next(policy.unet.parameters()).device
    with torch.no_grad():
        text = encode_prompts(policy.tokenizer, policy.text_encoder, ps, device)  # [B, L, E]
        gens = [torch.Generator().manual_seed(s) for s in ss]
        noises = draw_noise(latent_shape(policy, len(ps)), a.num_inference_steps, gens, device, text.dtype)
        traj = sample_trajectory(policy.eps_fn(), policy.vae, policy.scheduler, text, noises,
                                 a.guidance_scale, policy.time_cond_proj_dim, ref_eps_fn=policy.ref_eps_fn(),
                                 terminal="auto", decode=False)
        divs = step_divergences(traj.kernels, "kl", "mean")  # [B, K]
    return float(divs.sum(1).mean())


def _with_kl(row: dict, recipe: Recipe, policy=None) -> dict:
    """``row`` plus ``kl_to_ref`` of the trained policy (reloaded from the run folder if not given)."""
    if policy is None:
        policy = load_trained_policy(recipe, recipe.output_path / "weights")
    if policy is not None:
        row["kl_to_ref"] = kl_to_reference(policy, recipe)
    return row


# -------------------------------------------------------------------------------------------- trials


def _absolute_paths(recipe: Recipe) -> dict:
    """The recipe as a dict with relative local paths made absolute: Tune runs trials in other folders."""

    def absolute(p: str | None) -> str | None:
        if p and not re.match(r"^[a-z]+:", p) and not Path(p).is_absolute() and Path(p).exists():
            return str(Path(p).resolve())
        return p

    d = recipe.to_dict()
    d["model"]["pretrained"] = absolute(d["model"]["pretrained"])
    d["model"]["cache_dir"] = absolute(d["model"]["cache_dir"])
    for m in d["reward"]["models"]:
        for k in ("path", "head_path", "tokenizer_path"):
            m[k] = absolute(m[k])
    pf = d["data"]["prompts_file"]
    if pf and not Path(pf).is_absolute():
        here = Path(pf) if Path(pf).exists() else Path(recipe.source).parent / pf
        d["data"]["prompts_file"] = str(here.resolve())
    return d


@dataclass
class TrialSpec:
    """What every trial needs besides its config (pickled into the trial actors)."""

    base: dict  # the recipe, paths absolute
    source: str  # the recipe file, for error messages
    trials_dir: str  # <output_dir>/trials
    wandb_callback: bool  # W&B is logged by Tune's callback: trials do not open their own W&B runs
    pbt_checkpoint_every: int  # > 0: run the checkpointed in-process loop (PBT)


def trial_recipe(spec: TrialSpec, config: dict, trial_id: str) -> Recipe:
    """The recipe of one trial: the base recipe with the trial's values and its own output folder."""
    overrides = [_override(k, v) for k, v in config.items()]
    overrides.append(_override("train.output_dir", str(Path(spec.trials_dir) / trial_id)))
    if spec.wandb_callback:
        overrides.append("logging.wandb=false")
    return recipe_from_dict(spec.base, spec.source, overrides)


def _final_report(row: dict, summary: dict) -> dict:
    """The last step's row plus the run's before/after evaluation (fixed eval prompts and seeds).

    ``done: True`` ends the trial before the scheduler sees this result: PBT must not exploit (restart)
    a trial that has finished its steps.
    """
    out = dict(row, done=True)
    for key, name in (("reward", "eval_reward"), ("judge_accuracy", "judge_accuracy")):
        if f"{key}_after" in summary:
            out[name], out[f"{name}_before"] = summary[f"{key}_after"], summary[f"{key}_before"]
    return out


def run_trial(config: dict, spec: TrialSpec) -> None:
    """The Tune trainable: one training run of the trial's recipe, reporting every step to Tune."""
    import torch
    from ray import tune

    from rocm_ray._quiet import quiet_library_warnings

    quiet_library_warnings()
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    recipe = trial_recipe(spec, config, tune.get_context().get_trial_id())
    if recipe.train.num_workers >= 1:
        from ray.tune.integration.ray_train import TuneReportCallback

        res = _ray_train_entry(recipe.source)(recipe, callbacks=[TuneReportCallback()])
        # the workers reported every step; one more report carries the final evaluation
        tune.report(_with_kl(_final_report(res.metrics[-1], res.summary), recipe))
        return
    if spec.pbt_checkpoint_every:
        train_checkpointed(recipe, spec.pbt_checkpoint_every)
        return
    from rocm_ray.train.inprocess import train_inprocess

    held: list[dict] = []

    def on_step(row: dict) -> None:
        # every step is one Tune iteration; the last is held back and sent with the final evaluation
        if row["step"] < recipe.train.steps:
            tune.report(row)
        else:
            held.append(row)

    res = train_inprocess(recipe, on_step=on_step)
    tune.report(_with_kl(_final_report(held[-1] if held else res.metrics[-1], res.summary), recipe))


def train_checkpointed(recipe: Recipe, checkpoint_every: int) -> None:
    """In-process ROCM with a Tune checkpoint (trainable weights + AdamW state + step) every
    ``checkpoint_every`` steps, resuming from ``ray.tune.get_checkpoint()``: what PBT needs to clone a
    trial. The steps are those of :func:`train_inprocess`; the trial's (possibly perturbed) ``train.lr``
    and ``algorithm.beta`` apply from the step it resumes at."""
    import torch
    from ray import tune

    from rocm_ray.config import prompts_of
    from rocm_ray.models.policy import save_policy_weights
    from rocm_ray.rewards.gradient import score_with_grad
    from rocm_ray.train.builders import build_policy, build_reward
    from rocm_ray.train.inprocess import evaluate_before_after, metrics_row, step_kwargs
    from rocm_ray.train.outputs import MetricsLog, plot_curves, save_before_after, write_summary
    from rocm_ray.train.step import NonFiniteError, rocm_step, step_batch

    t = recipe.train
    torch.manual_seed(t.seed)
    out_dir = recipe.output_path
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "recipe.json").write_text(json.dumps(recipe.to_dict(), indent=2))
    prompts = prompts_of(recipe)
    device = _device()
    policy = build_policy(recipe, device)
    scorer = build_reward(recipe.reward, device)
    named = {n: p for n, p in policy.unet.named_parameters() if p.requires_grad}
    params = list(named.values())
    opt = torch.optim.AdamW(params, lr=t.lr, betas=tuple(t.adam_betas), weight_decay=t.weight_decay)
    start = 1
    ckpt = tune.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            state = torch.load(Path(d) / "state.pt", map_location=device, weights_only=True)
        with torch.no_grad():
            for n, p in named.items():
                p.copy_(state["params"][n])
        opt.load_state_dict(state["optimizer"])
        for g in opt.param_groups:  # PBT may have perturbed the learning rate
            g["lr"] = t.lr
        start = int(state["step"]) + 1
        print(f"rocm-ray: resumed at step {start} from {ckpt.path} (lr={t.lr}, beta={recipe.algorithm.beta})",
              flush=True)
    log = MetricsLog(out_dir, t.steps, recipe.logging.log_every, None, recipe.logging.tensorboard,
                     recipe.name, recipe.to_dict(), append=start > 1)
    kwargs = step_kwargs(recipe, device)
    reward_fn = lambda images, ps: score_with_grad(scorer, images, ps)  # noqa: E731
    t_start = time.perf_counter()
    for step in range(start, t.steps + 1):
        t0 = time.perf_counter()
        ps, seeds = step_batch(prompts, t.batch_size, step, t.seed)
        opt.zero_grad(set_to_none=True)
        res = rocm_step(policy, ps, seeds, reward_fn, **kwargs)
        gn = torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm if t.max_grad_norm > 0 else math.inf)
        if not torch.isfinite(gn):
            raise NonFiniteError(f"step {step}: gradient norm is {float(gn)}; "
                                 "lower train.lr or algorithm.beta")
        opt.step()
        row = metrics_row(step, res, float(gn), time.perf_counter() - t0, t.batch_size, t.lr)
        log.log(row)
        if step == t.steps:
            log.close()
            before = evaluate_before_after(recipe, policy, scorer, prompts, reference=True)
            after = evaluate_before_after(recipe, policy, scorer, prompts, reference=False)
            save_policy_weights(policy, out_dir / "weights")
            plot_curves(log.rows, out_dir / "curves.png", f"{recipe.name}: {recipe.algorithm.regularizer} "
                        f"beta={recipe.algorithm.beta} (PBT trial)")
            save_before_after(before["images"], after["images"], recipe.data.eval_seeds,
                              list(dict.fromkeys(before["prompts"])), out_dir / "grid.png")
            summary = {"name": recipe.name, "steps": t.steps, "regularizer": recipe.algorithm.regularizer,
                       "beta": recipe.algorithm.beta, "wall_time_s": round(time.perf_counter() - t_start, 1)}
            for key in ("reward", "judge_accuracy"):
                if key in before:
                    summary[f"{key}_before"], summary[f"{key}_after"] = before[key], after[key]
            write_summary(out_dir, summary)
            row = _with_kl(_final_report(row, summary), recipe, policy)
        if step % checkpoint_every == 0 and step < t.steps:  # the last report ends the trial (done)
            with tempfile.TemporaryDirectory() as d:
                torch.save({"params": {n: p.detach().cpu() for n, p in named.items()},
                            "optimizer": opt.state_dict(), "step": step}, Path(d) / "state.pt")
                tune.report(row, checkpoint=tune.Checkpoint.from_directory(d))
        else:
            tune.report(row)


# ----------------------------------------------------------------------------------------- the search


@dataclass
class ResultSummary:
    """What a search produced: one row per trial, the best one, and where the tables and plots are."""

    output_dir: Path
    tune_dir: Path
    rows: list[dict]
    searched: list[str]
    metric: str
    mode: str
    best: dict | None
    results_csv: Path
    results_md: Path
    pareto_png: Path | None
    errors: list[str] = field(default_factory=list)


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
        ray.init(address="local", _node_ip_address="127.0.0.1", log_to_driver=True, **opts)  # our own Ray
    return True


def _trial_resources(config: dict, spec: TrialSpec):
    """In-process trials hold one CPU (or GPU); a Ray Train trial's driver holds almost nothing (its
    TorchTrainer asks for its own workers; tune.max_concurrent_trials bounds how many run at once)."""
    from ray.tune import PlacementGroupFactory

    r = recipe_from_dict(spec.base, spec.source, [_override(k, v) for k, v in config.items()])
    if r.train.num_workers >= 1:
        return PlacementGroupFactory([{"CPU": 0.01}])
    return PlacementGroupFactory([{"CPU": 1, "GPU": 1} if r.train.use_gpu else {"CPU": 1}])


def tune_recipe(recipe: Recipe) -> ResultSummary:
    """Run the search of ``recipe.tune`` over ``recipe`` on Ray Tune; write results.csv/.md and pareto.png.

    The search space is checked (every grid point built as a recipe) before Ray starts.
    """
    keys = parse_search_space(recipe)
    _check_metric(recipe)
    n_checked = check_search_space(recipe, keys)
    _check_trial_kind(recipe)
    scheduler, ckpt_every = _scheduler(recipe, keys)

    from ray import tune

    out = recipe.output_path.resolve()
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
        grid = tuner.fit()
    finally:
        if started:
            import ray

            ray.shutdown()
    return summarize(recipe, keys, grid, out)


# ---------------------------------------------------------------------------------------- the results


def _trial_row(result, keys: list[SearchKey], base: Recipe, out: Path) -> dict:
    m = result.metrics or {}
    cfg = result.config or {}
    trial_id = m.get("trial_id") or Path(result.path).name
    row: dict[str, Any] = {"trial_id": trial_id}
    for k in keys:
        row[k.key] = cfg.get(k.key)
    for key, name, value in (("algorithm.regularizer", "regularizer", base.algorithm.regularizer),
                             ("algorithm.beta", "beta", base.algorithm.beta)):
        if key not in row:  # not searched: the recipe's value, for the table and the Pareto labels
            row[name] = value
    steps = m.get("step")
    if result.error is not None:
        row["status"] = "error"
    elif steps is not None and steps < cfg.get("train.steps", base.train.steps):
        row["status"] = "stopped early"
    else:
        row["status"] = "done" if m else "no result"
    row["steps"] = steps
    for name in ("reward", "divergence", "loss", "eval_reward", "eval_reward_before", "kl_to_ref",
                 "judge_accuracy", "judge_accuracy_before", base.tune.metric):
        if name in m:
            row[name] = m[name]
    row["run_dir"] = str(Path("trials") / trial_id) if (out / "trials" / trial_id).exists() else ""
    return row


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


#: the Pareto axes, preferred first: (reward key, divergence key, reward label, divergence label)
PARETO_AXES = (
    ("eval_reward", "kl_to_ref", "final reward (fixed eval prompts x seeds, after training)",
     "final KL to the reference (per dim, summed over steps; same measure for every regularizer)"),
    ("reward", "divergence", "reward at the last step (training batch)",
     "divergence at the last step (each trial's own regularizer)"),
)


def pareto_axes(rows: list[dict]) -> tuple[str, str, str, str]:
    """The after-training eval reward vs KL to the reference when any trial has them (finished trials);
    else the last step's training reward vs the trial's own divergence."""
    for axes in PARETO_AXES:
        if any(_finite(r.get(axes[0])) and _finite(r.get(axes[1])) for r in rows):
            return axes
    return PARETO_AXES[-1]


def pareto_front(rows: list[dict], reward_key: str = "reward", div_key: str = "divergence") -> list[int]:
    """Indices of the rows no other row dominates (reward at least as high and divergence at least as low,
    one of them strictly); rows without both values take no part."""
    pts = [(i, r[reward_key], r[div_key]) for i, r in enumerate(rows)
           if _finite(r.get(reward_key)) and _finite(r.get(div_key))]
    front = []
    for i, ri, di in pts:
        dominated = any((rj >= ri and dj <= di) and (rj > ri or dj < di) for _, rj, dj in pts)
        if not dominated:
            front.append(i)
    return front


def pick_best(rows: list[dict], metric: str, mode: str) -> dict | None:
    """The best trial by ``metric`` at its last report, among trials that ran every step (ASHA-stopped
    trials were measured at an earlier step); among all reported trials if none finished."""
    ok = [r for r in rows if r["status"] != "error" and _finite(r.get(metric))]
    done = [r for r in ok if r["status"] == "done"] or ok
    if not done:
        return None
    sign = 1 if mode == "max" else -1
    return max(done, key=lambda r: sign * r[metric])


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)


def write_tables(rows: list[dict], out: Path, title: str, best: dict | None,
                 metric: str) -> tuple[Path, Path]:
    """``results.csv`` and ``results.md``: one row per trial (searched values, final metrics, status)."""
    cols = list(dict.fromkeys(k for r in rows for k in r))
    csv_path, md_path = out / "results.csv", out / "results.md"
    with csv_path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)
    lines = [f"# {title}", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |")
    if best is not None:
        lines += ["", f"Best by {metric}: trial {best['trial_id']} ({metric} = {_fmt(best[metric])})."]
    rk, dk, _, _ = pareto_axes(rows)
    lines += ["", f"Pareto front ({rk} vs {dk}): "
              + (", ".join(r["trial_id"] for r in rows if r.get("pareto")) or "none"), ""]
    md_path.write_text("\n".join(lines))
    return csv_path, md_path


def _label(row: dict) -> str:
    reg = row.get("algorithm.regularizer", row.get("regularizer"))
    beta = row.get("algorithm.beta", row.get("beta"))
    lr = f" lr={_fmt(row['train.lr'])}" if "train.lr" in row else ""
    return f"{reg} β={_fmt(beta)}{lr}"


def plot_pareto(rows: list[dict], path: Path, title: str) -> Path | None:
    """Final reward vs final divergence of every trial; the non-dominated ones highlighted and labelled
    by regularizer and beta."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rk, dk, r_label, d_label = pareto_axes(rows)
    pts = [r for r in rows if _finite(r.get(rk)) and _finite(r.get(dk))]
    if not pts:
        return None
    fig, ax = plt.subplots(figsize=(6.8, 4.8), dpi=120)
    others = [r for r in pts if not r.get("pareto")]
    front = sorted((r for r in pts if r.get("pareto")), key=lambda r: r[dk])
    ax.scatter([r[dk] for r in others], [r[rk] for r in others], c="0.6", s=28, label="dominated")
    for r in others:
        ax.annotate(_label(r), (r[dk], r[rk]), textcoords="offset points", xytext=(4, -10), fontsize=7,
                    color="0.45")
    ax.plot([r[dk] for r in front], [r[rk] for r in front], "-o", c="C3", ms=7, label="Pareto front")
    for r in front:
        ax.annotate(_label(r), (r[dk], r[rk]), textcoords="offset points", xytext=(5, 5), fontsize=8,
                    color="C3", weight="bold")
    divs = [r[dk] for r in pts]
    if min(divs) > 0 and max(divs) / min(divs) > 100:
        ax.set_xscale("log")
    ax.margins(x=0.12, y=0.12)  # room for the labels
    ax.set_xlabel(d_label, fontsize=8)
    ax.set_ylabel(r_label, fontsize=8)
    left_out = len([r for r in rows if r["status"] != "error"]) - len(pts)
    ax.set_title(title + (f"\n({left_out} trials without these values left out)" if left_out else ""),
                 fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _error_line(err: BaseException) -> str:
    """A trial's failure in one line: the original exception (Ray wraps it in a RayTaskError)."""
    cause = getattr(err, "cause", None) or err
    text = " ".join(str(cause).split())
    return f"{type(cause).__name__}: {text[:400]}"


def summarize(recipe: Recipe, keys: list[SearchKey], grid, out: Path) -> ResultSummary:
    """Tune's ResultGrid -> results.csv, results.md, pareto.png and the best trial."""
    rows = [_trial_row(grid[i], keys, recipe, out) for i in range(len(grid))]
    rk, dk, _, _ = pareto_axes(rows)
    for i in pareto_front(rows, rk, dk):
        rows[i]["pareto"] = True
    for r in rows:
        r.setdefault("pareto", False)
    metric, mode = recipe.tune.metric, recipe.tune.mode
    best = pick_best(rows, metric, mode)
    errors = [f"trial {rows[i]['trial_id']}: {_error_line(grid[i].error)}"
              for i in range(len(grid)) if grid[i].error is not None]
    title = f"{recipe.name}: {len(rows)} trials, scheduler {recipe.tune.scheduler}"
    csv_path, md_path = write_tables(rows, out, title, best, metric)
    png = plot_pareto(rows, out / "pareto.png", f"{recipe.name}: reward vs divergence ({len(rows)} trials)")
    return ResultSummary(output_dir=out, tune_dir=out / "tune", rows=rows, searched=[k.key for k in keys],
                         metric=metric, mode=mode, best=best, results_csv=csv_path, results_md=md_path,
                         pareto_png=png, errors=errors)


# ---------------------------------------------------------------------------------------------- the CLI


def cmd_tune(args) -> int:
    from rocm_ray.config import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    res = tune_recipe(recipe)
    print(res.results_md.read_text(), flush=True)
    if res.best is not None:
        cfg = {k: res.best.get(k) for k in res.searched}
        print(f"rocm-ray tune: best by {res.metric} ({res.mode}): trial {res.best['trial_id']} "
              f"{res.metric}={_fmt(res.best[res.metric])} config {json.dumps(cfg)}", flush=True)
        print("  rerun it: rocm-ray train " + args.recipe + " " + " ".join(
            _override(k, v) for k, v in cfg.items()), flush=True)
    wrote = ", ".join(str(p) for p in (res.results_csv, res.results_md, res.pareto_png) if p)
    print(f"rocm-ray tune: wrote {wrote}; TensorBoard: tensorboard --logdir {res.tune_dir}", flush=True)
    for e in res.errors:
        print(f"error: {e}", file=sys.stderr, flush=True)
    if res.errors or res.best is None:
        return 1
    return 0


def register_cli(sub) -> None:
    """Add ``rocm-ray tune RECIPE [key=value ...]`` to the ``rocm-ray`` subcommands."""
    t = sub.add_parser("tune", help="hyperparameter search over a recipe with Ray Tune (tune: section)")
    t.add_argument("recipe", help="recipes/<name>.yaml with a tune: section")
    t.add_argument("overrides", nargs="*", help="key.path=value overrides, e.g. tune.scheduler=fifo")
    t.set_defaults(func=cmd_tune)
