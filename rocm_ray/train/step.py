"""One ROCM step, shared by the in-process trainer and the Ray Train workers.

The reward arrives as a function ``reward_fn(images, prompts) -> (r [B], dr/dimages [B,3,H,W], parts)``:
a local scorer (in-process) or a remote RewardService (Ray). Everything else is identical, which is
what makes the two paths give the same numbers.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from rocm_ray.loss import RocmLoss, rocm_loss, step_divergences
from rocm_ray.models.policy import Policy
from rocm_ray.sampling import EpsFn, draw_noise, encode_prompts, latent_shape, sample_trajectory

RewardFn = Callable[[Tensor, list[str]], tuple[Tensor, Tensor, dict[str, Tensor]]]


class NonFiniteError(FloatingPointError):
    """A loss, reward or gradient became NaN/inf; raised instead of training on garbage."""


def step_batch(prompts: Sequence[str], batch_size: int, step: int, seed: int,
               group: int = 1) -> tuple[list[str], list[int]]:
    """The global batch of step ``step``: prompts drawn from ``prompts`` and one noise seed per sample.

    A pure function of (seed, step), so every worker, and every resumed run, agrees on it; a worker
    takes its contiguous shard. ``group > 1`` (PPO): ``batch_size / group`` prompts, each repeated
    ``group`` times in a row (with different seeds), so per-prompt statistics stay inside a shard.
    """
    rng = random.Random(seed * 1_000_003 + step)
    drawn = [prompts[rng.randrange(len(prompts))] for _ in range(batch_size // group)]
    chosen = [p for p in drawn for _ in range(group)]
    seeds = [seed * 1_000_000_007 + step * 10_007 + i for i in range(batch_size)]
    return chosen, seeds


def shard(items: Sequence, rank: int, world: int) -> list:
    per = len(items) // world
    return list(items[rank * per:(rank + 1) * per])


@dataclass
class StepResult:
    loss: RocmLoss
    images: Tensor  # [B, 3, H, W], detached, CPU
    rewards: Tensor  # [B]
    sample_divergences: Tensor  # [B, K]
    components: dict[str, Tensor] = field(default_factory=dict)  # reward name -> [B]


@dataclass
class SampledStep:
    """The first half of a ROCM step: a trajectory with its graph, waiting for the reward (see :func:`rocm_step`)."""

    prompts: list[str]
    images: Tensor  # [B, 3, H, W] float32, attached to the policy's graph
    kernels: list  # the trajectory's step kernels (divergence inputs)
    regularize: bool


def sample_for_step(
    policy: Policy,
    prompts: list[str],
    seeds: list[int],
    *,
    num_inference_steps: int,
    guidance_scale: float,
    regularizer: str,
    beta: float,
    terminal: str = "auto",
    truncate_steps: int | None = None,
    gradient_checkpointing: bool = False,
    eps_fn: EpsFn | None = None,
    ref_eps_fn: EpsFn | None = None,
    autocast_dtype: torch.dtype | None = None,
    **_: object,
) -> SampledStep:
    """Sample a reparameterized trajectory (with its graph); ``ref_eps_fn`` defaults to the policy's reference."""
    device = next(policy.unet.parameters()).device
    text = encode_prompts(policy.tokenizer, policy.text_encoder, prompts, device)  # [B, L, E]
    shape = latent_shape(policy, len(prompts))  # [B, C, h, w]
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    noises = draw_noise(shape, num_inference_steps, gens, device=device, dtype=text.dtype)
    regularize = beta > 0 and regularizer != "none"
    autocast = (torch.autocast(device_type=device.type, dtype=autocast_dtype) if autocast_dtype is not None
                else torch.autocast(device_type=device.type, enabled=False))
    with autocast:
        traj = sample_trajectory(
            eps_fn or policy.eps_fn(), policy.vae, policy.scheduler, text, noises, guidance_scale,
            policy.time_cond_proj_dim,
            ref_eps_fn=(ref_eps_fn or policy.ref_eps_fn()) if regularize else None,
            truncate_steps=truncate_steps, gradient_checkpointing=gradient_checkpointing, terminal=terminal,
        )
    return SampledStep(list(prompts), traj.images.float(), traj.kernels, regularize)


def finish_step(
    sampled: SampledStep,
    reward: Tensor,
    grad: Tensor,
    parts: dict[str, Tensor],
    *,
    regularizer: str,
    beta: float,
    reduction: str = "mean",
    reward_scale: float = 1.0,
    backward: Callable[[Tensor], None] = lambda t: t.backward(),
    **_: object,
) -> StepResult:
    """The second half: the ROCM loss from (r [B], dr/dx [B,3,H,W]) and its backward."""
    images, prompts = sampled.images, sampled.prompts
    device = images.device
    reward, grad = reward.to(device), grad.to(device)
    if not (torch.isfinite(reward).all() and torch.isfinite(grad).all()):
        raise NonFiniteError(f"the reward model returned non-finite rewards or gradients: rewards={reward.tolist()}")
    if sampled.regularize:
        divs = step_divergences(sampled.kernels, regularizer, reduction)  # [B, K]
    else:
        divs = torch.zeros(len(prompts), max(len(sampled.kernels), 1), device=device)  # [B, K]
    out = rocm_loss(images, reward, grad, divs, beta=beta, reward_scale=reward_scale)
    if not math.isfinite(out.loss):
        raise NonFiniteError(
            f"non-finite loss {out.loss} (reward {out.reward}, divergence {out.divergence}): lower train.lr or "
            "algorithm.beta, or use algorithm.reduction=mean")
    backward(out.surrogate)
    return StepResult(loss=out, images=images.detach().cpu(), rewards=reward.detach().cpu(),
                      sample_divergences=divs.detach().cpu(),
                      components={k: v.detach().cpu() for k, v in parts.items()})


def rocm_step(
    policy: Policy,
    prompts: list[str],
    seeds: list[int],
    reward_fn: RewardFn,
    *,
    num_inference_steps: int,
    guidance_scale: float,
    regularizer: str,
    beta: float,
    reduction: str = "mean",
    terminal: str = "auto",
    truncate_steps: int | None = None,
    gradient_checkpointing: bool = False,
    reward_scale: float = 1.0,
    eps_fn: EpsFn | None = None,
    backward: Callable[[Tensor], None] = lambda t: t.backward(),
    autocast_dtype: torch.dtype | None = None,
) -> StepResult:
    """Sample a reparameterized trajectory, get (r, dr/dx) from ``reward_fn``, backpropagate the ROCM loss.

    The optimizer step is the caller's (plain AdamW or a DeepSpeed engine). The two halves are
    :func:`sample_for_step` and :func:`finish_step` (the Ray workers interleave them over micro-batches).
    """
    sampled = sample_for_step(
        policy, prompts, seeds, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
        regularizer=regularizer, beta=beta, terminal=terminal, truncate_steps=truncate_steps,
        gradient_checkpointing=gradient_checkpointing, eps_fn=eps_fn, autocast_dtype=autocast_dtype)
    reward, grad, parts = reward_fn(sampled.images.detach(), prompts)
    return finish_step(sampled, reward, grad, parts, regularizer=regularizer, beta=beta, reduction=reduction,
                       reward_scale=reward_scale, backward=backward)
