"""The trials of ``rocm-ray tune``: one ordinary training run per trial, reporting every step to Tune.

Every trial is the recipe with the trial's values applied as ``key=value`` overrides, writing its own run
folder ``<output_dir>/trials/<trial id>``:

* ``train.num_workers == 0``: :func:`run_trial` runs :func:`rocm_ray.train.inprocess.train_inprocess` and
  reports every step with ``ray.tune.report`` (``training_iteration`` == ``step``).
* ``train.num_workers >= 1``: the trial builds and fits its own ``TorchTrainer`` through
  :mod:`rocm_ray.train.ray_trainer` (the Ray Train V2 pattern); the workers' ``ray.train.report`` calls reach
  Tune through ``ray.tune.integration.ray_train.TuneReportCallback`` in the Train ``RunConfig``.
* ``tune.scheduler: pbt``: :func:`train_checkpointed`, an in-process loop with Tune checkpoints (LoRA / UNet
  weights + AdamW state) so that PBT can clone a good trial and perturb ``train.lr`` / ``algorithm.beta``.

The last report of a trial carries the before/after evaluation and ``kl_to_ref`` (:func:`kl_to_reference`),
the one divergence measure every regularizer's trials share (the Pareto front's x axis).
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from rocm_ray.config import Recipe, recipe_from_dict
from rocm_ray.tune.search_space import _override, _ray_train_entry


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
