"""The in-process ROCM trainer: one process, no Ray. For laptops, debugging and the reference numbers
that the Ray path must reproduce."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from rocm_ray.config import Recipe, prompts_of
from rocm_ray.evaluate import judge_accuracy, score_images
from rocm_ray.models.policy import save_policy_weights
from rocm_ray.rewards.gradient import score_with_grad
from rocm_ray.train.builders import build_policy, build_reward, eval_grid_inputs, generate
from rocm_ray.train.nonfinite import NonFiniteGuard, guarded_step, save_last_good, skipped_row
from rocm_ray.train.outputs import MetricsLog, SampleLog, plot_curves, save_before_after, write_summary
from rocm_ray.train.ppo_step import group_of, local_reward_fn, ppo_step, torch_optimizer_step
from rocm_ray.train.step import rocm_step, step_batch


@dataclass
class RunResult:
    output_dir: Path
    metrics: list[dict]
    summary: dict


AUTOCAST = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def step_kwargs(recipe: Recipe, device: str | torch.device = "cpu") -> dict:
    """The recipe's algorithm section as :func:`rocm_step` keywords (autocast on GPU only)."""
    a = recipe.algorithm
    on_gpu = torch.device(device).type == "cuda"
    if a.name == "ppo":
        from rocm_ray.train.ppo_step import ppo_kwargs

        return ppo_kwargs(recipe)
    return dict(
        autocast_dtype=AUTOCAST[recipe.train.mixed_precision] if on_gpu else None,
        num_inference_steps=a.num_inference_steps, guidance_scale=a.guidance_scale, regularizer=a.regularizer,
        beta=a.beta, reduction=a.reduction, terminal=a.terminal, truncate_steps=a.truncate_steps,
        gradient_checkpointing=a.gradient_checkpointing, reward_scale=recipe.reward.scale,
    )


def metrics_row(step: int, res, grad_norm: float, dt: float, batch: int, lr: float) -> dict:
    row = {"step": step, "loss": res.loss.loss, "reward": res.loss.reward, "divergence": res.loss.divergence,
           "grad_norm": grad_norm, "images_per_s": batch / dt, "it_per_s": 1.0 / dt, "lr": lr}
    for i, d in enumerate(res.loss.step_divergences):
        row[f"div_step_{i + 1}"] = d
    if len(res.components) > 1:
        for name, v in res.components.items():
            row[f"reward_{name}"] = float(v.float().mean())
    row.update(getattr(res, "extra", {}))  # PPO: clip_fraction, approx_kl, ppo_updates
    return row


def evaluate_before_after(recipe: Recipe, policy, scorer, prompts: list[str], reference: bool) -> dict:
    """Rewards (and the digit judge, where it applies) on the fixed eval prompts and seeds."""
    a = recipe.algorithm
    ps, ss = eval_grid_inputs(recipe, prompts)
    images = generate(policy, ps, ss, a.num_inference_steps, a.guidance_scale, reference=reference)
    out = {"images": images, "prompts": ps, "seeds": ss,
           "reward": float(score_images(scorer, images, ps).mean())}
    acc = judge_accuracy(images, ps)
    if acc is not None:
        out["judge_accuracy"] = acc
    return out


def train_inprocess(recipe: Recipe, on_step: Callable[[dict], None] | None = None,
                    evaluate: Callable[[int, object], dict] | None = None, resume: bool = False,
                    force: bool = False) -> RunResult:
    """Fine-tune ``recipe.model`` toward ``recipe.reward`` with regularized ROCM (or the PPO baseline), in
    this process.

    ``on_step(row)`` is called with each step's metrics row (Ray Tune reports through it).
    ``evaluate(step, policy)`` (benchmarks' learning curves) may add metrics to a step's row; its time is
    not counted in the row's ``it_per_s``. Checkpoints every ``train.checkpoint_every`` steps; ``resume``
    continues from the newest complete one, ``force`` replaces an existing run
    (:class:`rocm_ray.train.checkpoint.InprocessRun`).
    """
    from rocm_ray.train.checkpoint import InprocessRun

    t = recipe.train
    if t.cpu_threads is not None:
        torch.set_num_threads(t.cpu_threads)
    torch.manual_seed(t.seed)
    prompts = prompts_of(recipe)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    policy = build_policy(recipe, device)
    scorer = build_reward(recipe.reward, device, algorithm=recipe.algorithm.name)
    run = InprocessRun(recipe, resume=resume, force=force)  # only once the inputs loaded: a bad input writes nothing
    out_dir = run.out_dir
    (out_dir / "recipe.json").write_text(json.dumps(recipe.to_dict(), indent=2))
    params = policy.trainable_parameters()
    n_params = sum(p.numel() for p in params)
    kind = f"LoRA r={recipe.model.lora_rank}" if policy.lora else "full"
    print(f"rocm-ray: {recipe.name}: {recipe.model.pretrained} ({kind}, {n_params:,} trainable parameters), "
          f"reward {[m.name for m in recipe.reward.models]}, "
          f"{recipe.algorithm.name} {recipe.algorithm.regularizer} beta={recipe.algorithm.beta}, {t.steps} steps x "
          f"{t.batch_size} images",
          flush=True)
    opt = torch.optim.AdamW(params, lr=t.lr, betas=tuple(t.adam_betas), weight_decay=t.weight_decay)
    named = [(n, p) for n, p in policy.unet.named_parameters() if p.requires_grad]
    start, prior_rows = run.restore(named, opt)

    before = evaluate_before_after(recipe, policy, scorer, prompts, reference=True)
    samples = SampleLog(out_dir / "samples.parquet", append=bool(start))
    samples.add(0, before["prompts"], before["seeds"], before["images"],
                score_images(scorer, before["images"], before["prompts"]), {}, None)
    log = MetricsLog(out_dir, t.steps, recipe.logging.log_every,
                     recipe.logging.wandb_project if recipe.logging.wandb else None,
                     recipe.logging.tensorboard, recipe.name, recipe.to_dict())
    log.rows = prior_rows  # a resume continues the checkpoint's rows (later ones are written again)
    kwargs = step_kwargs(recipe, device)
    step_fn, reward_fn = rocm_step, lambda images, ps: score_with_grad(scorer, images, ps)  # noqa: E731
    if recipe.algorithm.name == "ppo":  # RLCM-style PPO: inner updates stepped through the same optimizer
        step_fn, reward_fn = ppo_step, local_reward_fn(scorer, "ppo")
        kwargs["optimizer_step"] = torch_optimizer_step(opt, params, t.max_grad_norm)
    guard = NonFiniteGuard(t.max_nonfinite_steps)
    t_start = time.perf_counter()
    for step in range(start + 1, t.steps + 1):
        t0 = time.perf_counter()
        ps, seeds = step_batch(prompts, t.batch_size, step, t.seed, group=group_of(recipe))
        opt.zero_grad(set_to_none=True)
        res, skip = guarded_step(
            lambda bw, ps=ps, seeds=seeds: step_fn(policy, ps, seeds, reward_fn, backward=bw, **kwargs),
            lambda loss: loss.backward())
        gn = torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm if t.max_grad_norm > 0 else math.inf) \
            if skip is None else torch.tensor(math.nan)
        if skip is not None or not torch.isfinite(gn):  # skipped: no optimizer step, nothing changes
            opt.zero_grad(set_to_none=True)
            guard.skip(step, skip or f"the gradient norm is {float(gn)}")
            log.log(guard.annotate(skipped_row(step, log.rows[-1] if log.rows else None, res, float(gn),
                                               time.perf_counter() - t0, t.batch_size, t.lr), skipped=True))
            if guard.exhausted:
                log.close()
                raise guard.stop_error(step, save_last_good(policy, out_dir, step - guard.in_a_row, guard.last_reason))
            continue
        opt.step()
        guard.ok()
        row = guard.annotate(metrics_row(step, res, float(gn), time.perf_counter() - t0, t.batch_size,
                                         opt.param_groups[0]["lr"]), False)
        if evaluate is not None:
            row.update(evaluate(step, policy))
        log.log(row)
        run.after_step(step, named, opt, log.rows)
        if on_step is not None:
            on_step(row)
        every = recipe.logging.sample_every
        if every and step % every == 0 and step != t.steps:
            samples.add(step, ps, seeds, res.images, res.rewards, res.components, res.sample_divergences)
    wall = time.perf_counter() - t_start
    log.close()
    res = finish_run(recipe, out_dir, policy, scorer, prompts, before, log.rows, samples, wall,
                     images_trained=(t.steps - start) * t.batch_size)
    run.stage.commit()
    return res


def finish_run(recipe: Recipe, out_dir: Path, policy, scorer, prompts: list[str], before: dict,
               rows: list[dict], samples: SampleLog, wall: float,
               images_trained: int | None = None) -> RunResult:
    """Everything after the last step, shared by the in-process and the Ray trainers: evaluate the trained
    policy, then write samples, weights, curves, the before/after grid and the summary.

    ``images_trained`` (default ``train.steps * train.batch_size``) and ``wall`` give the throughput.
    """
    t = recipe.train
    after = evaluate_before_after(recipe, policy, scorer, prompts, reference=False)
    samples.add(t.steps, after["prompts"], after["seeds"], after["images"],
                score_images(scorer, after["images"], after["prompts"]), {}, None)
    save_policy_weights(policy, out_dir / "weights")
    plot_curves(rows, out_dir / "curves.png", f"{recipe.name}: {recipe.algorithm.regularizer} "
                f"beta={recipe.algorithm.beta}")
    save_before_after(before["images"], after["images"], recipe.data.eval_seeds,
                      list(dict.fromkeys(before["prompts"])), out_dir / "grid.png")
    images = t.steps * t.batch_size if images_trained is None else images_trained
    summary = {"name": recipe.name, "algorithm": recipe.algorithm.name, "steps": t.steps,
               "regularizer": recipe.algorithm.regularizer,
               "beta": recipe.algorithm.beta, "wall_time_s": round(wall, 1),
               "images_per_s": round(images / wall, 2) if wall > 0 else 0.0}
    for key in ("reward", "judge_accuracy"):
        if key in before:
            summary[f"{key}_before"], summary[f"{key}_after"] = before[key], after[key]
    write_summary(out_dir, summary)
    print(f"rocm-ray: wrote {out_dir}/ (metrics.csv, curves.png, grid.png, samples.parquet, weights/, summary.md)",
          flush=True)
    return RunResult(output_dir=out_dir, metrics=rows, summary=summary)
