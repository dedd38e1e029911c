"""One RLCM-style PPO step (``algorithm.name: ppo``), shared by the in-process trainer and the Ray Train workers.

RLCM (Oertell et al. 2024) treats the consistency sampler as an MDP and fine-tunes it with PPO; the loss
and the log-probabilities are :mod:`rocm_ray.ppo`. One step here:

1. samples a batch of trajectories WITHOUT gradient with the same sampler as ROCM
   (:func:`rocm_ray.sampling.sample_trajectory`, the same prompts/noise seeds layout, ``group`` samples
   per prompt), keeping every state x_n, every sampled x_{n+1}, the sampling policy's log-probs and the
   reference's step means (for the optional penalty);
2. scores the images with the reward (a local scorer or the RewardService; only r is needed, no dr/dx,
   so non-differentiable rewards such as JPEG compressibility work) and normalizes advantages per prompt;
3. runs ``algorithm.ppo_epochs`` inner epochs of ``algorithm.ppo_minibatches`` clipped-ratio updates.

The caller's loop is the ROCM loop unchanged: every inner update but the last is stepped here through
``optimizer_step`` (the caller's optimizer or DeepSpeed engine); the LAST update's gradient is left in
place for the caller's own clip-and-step, exactly as after :func:`rocm_ray.train.step.rocm_step`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from rocm_ray.divergences import gaussian_divergence
from rocm_ray.loss import RocmLoss
from rocm_ray.models.policy import Policy
from rocm_ray.ppo import gaussian_log_prob, group_advantages, minibatch_indices, ppo_clip_loss
from rocm_ray.sampling import (
    EpsFn,
    consistency_denoise,
    decode_latents,
    draw_noise,
    encode_prompts,
    guidance_embedding,
    latent_shape,
    sample_trajectory,
)
from rocm_ray.train.step import NonFiniteError, RewardFn, StepResult


@dataclass
class Rollout:
    """A batch of sampled trajectories as MDP transitions (K = sampled steps), all detached."""

    text: Tensor  # [B, L, E]
    w_emb: Tensor | None  # [B, D]
    states: list[Tensor]  # x_n of each sampled step, K x [B, C, h, w]
    samples: list[Tensor]  # the sampled x_{n+1}, K x [B, C, h, w]
    timesteps: list[int]  # t_n of each sampled step, K
    scales: list[float]  # sqrt(abar_{n+1}): the kernel mean is scale * d_theta(x_n, t_n), K
    variances: list[float]  # 1 - abar_{n+1}, K
    means: list[Tensor]  # the sampling policy's kernel means, K x [B, C, h, w]
    ref_means: list[Tensor | None]  # the reference kernel means, K x [B, C, h, w] (None: no penalty)
    old_log_probs: Tensor  # [B, K] under the sampling policy
    images: Tensor  # [B, 3, H, W] in [0, 1]


@dataclass
class PpoStepResult(StepResult):
    extra: dict[str, float] = field(default_factory=dict)  # clip_fraction, approx_kl, ppo_updates


@torch.no_grad()
def sample_rollout(policy: Policy, prompts: list[str], seeds: list[int], eps_fn: EpsFn, *,
                   num_inference_steps: int, guidance_scale: float, terminal: str = "auto",
                   ref_eps_fn: EpsFn | None = None) -> Rollout:
    """Sample trajectories without gradient and lay them out as transitions (x_n, x_{n+1}).

    The noises are ROCM's (``draw_noise`` with one generator per seed); ``terminal="auto"`` draws one
    more noise and samples the last step too (RLCM's scheduler: x ~ N(sqrt(abar_N) d_N, (1 - abar_N) I),
    the image decoded from that sample); ``"none"`` keeps the deterministic last step out of the MDP.
    """
    device = next(policy.unet.parameters()).device
    text = encode_prompts(policy.tokenizer, policy.text_encoder, prompts, device)  # [B, L, E]
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    n_noise = num_inference_steps + (1 if terminal == "auto" else 0)
    noises = draw_noise(latent_shape(policy, len(prompts)), n_noise, gens, device=device, dtype=text.dtype)
    traj = sample_trajectory(eps_fn, policy.vae, policy.scheduler, text, noises[:num_inference_steps],
                             guidance_scale, policy.time_cond_proj_dim, ref_eps_fn=ref_eps_fn,
                             terminal=terminal, decode=False)
    states, samples = [noises[0] * policy.scheduler.init_noise_sigma], []  # x_1 = z_0
    for k, kern in enumerate(traj.kernels):
        # the sampler's own update: x_{n+1} = sqrt(abar_{n+1}) d_n + sqrt(1 - abar_{n+1}) z_{n+1}
        nxt = kern.mean_policy + math.sqrt(kern.var) * noises[k + 1]  # [B, C, h, w]
        samples.append(nxt)
        if k + 1 < len(traj.kernels):
            states.append(nxt)
    final = samples[-1] if terminal == "auto" else traj.latents  # [B, C, h, w]
    images = decode_latents(policy.vae, final).float()  # [B, 3, H, W]
    old = torch.stack([gaussian_log_prob(x, k.mean_policy, k.var) for x, k in zip(samples, traj.kernels,
                                                                                 strict=True)], 1)  # [B, K]
    w_emb = None
    if policy.time_cond_proj_dim is not None:
        w_emb = guidance_embedding(guidance_scale, len(prompts), policy.time_cond_proj_dim, device=device)
        w_emb = w_emb.to(text.dtype)  # [B, D]
    return Rollout(text=text, w_emb=w_emb, states=states, samples=samples,
                   timesteps=[k.timestep for k in traj.kernels],
                   scales=[math.sqrt(a) for a in _next_abars(policy.scheduler, traj.timesteps, len(traj.kernels))],
                   variances=[k.var for k in traj.kernels], means=[k.mean_policy for k in traj.kernels],
                   ref_means=[k.mean_ref for k in traj.kernels],
                   old_log_probs=old, images=images)


def _next_abars(scheduler, timesteps: list[int], n_kernels: int) -> list[float]:
    """abar_{n+1} of each kernel as the sampler computes it (the last step: abar of t_N itself)."""
    abar = scheduler.alphas_cumprod.double()
    n = len(timesteps)
    return [float(abar[timesteps[k] if k == n - 1 else timesteps[k + 1]]) for k in range(n_kernels)]


def kernel_mean(eps_fn: EpsFn, policy: Policy, ro: Rollout, k: int, idx: Tensor) -> Tensor:
    """The current policy's kernel mean sqrt(abar_{n+1}) d_theta(x_n, t_n) at step k for samples ``idx``."""
    x = ro.states[k][idx]  # [b, C, h, w]
    t = ro.timesteps[k]
    w = None if ro.w_emb is None else ro.w_emb[idx]
    d = consistency_denoise(policy.scheduler, eps_fn(x, t, w, ro.text[idx]), x, t)  # [b, C, h, w]
    return ro.scales[k] * d


def ppo_step(
    policy: Policy,
    prompts: list[str],
    seeds: list[int],
    reward_fn: RewardFn,
    *,
    optimizer_step: Callable[[], float],
    num_inference_steps: int,
    guidance_scale: float,
    regularizer: str,
    beta: float,
    reduction: str = "mean",
    terminal: str = "auto",
    group_size: int = 4,
    epochs: int = 2,
    minibatches: int = 1,
    clip_range: float = 1e-4,
    adv_clip_max: float = 5.0,
    eps_fn: EpsFn | None = None,
    backward: Callable[[Tensor], None] = lambda t: t.backward(),
) -> PpoStepResult:
    """Sample, score, and run ``epochs x minibatches`` PPO updates; see the module docstring.

    ``optimizer_step()`` clips, steps and zeroes the gradients between inner updates and returns the
    gradient norm; it is not called after the last update (the caller steps it).
    """
    eps_fn = eps_fn or policy.eps_fn()
    regularize = beta > 0 and regularizer != "none"
    ro = sample_rollout(policy, prompts, seeds, eps_fn, num_inference_steps=num_inference_steps,
                        guidance_scale=guidance_scale, terminal=terminal,
                        ref_eps_fn=policy.ref_eps_fn() if regularize else None)
    reward, _, parts = reward_fn(ro.images, prompts)
    reward = reward.detach().float().cpu()  # [B]
    if not torch.isfinite(reward).all():
        raise NonFiniteError(f"the reward model returned non-finite rewards: {reward.tolist()}")
    device = ro.text.device
    adv = group_advantages(reward, group_size, adv_clip_max).to(device)  # [B]
    batch, n_steps = len(prompts), len(ro.samples)
    gen = torch.Generator().manual_seed(int(seeds[0]) % (2**63))  # the same minibatches on every path
    updates = [(e, idx) for e in range(epochs)
               for idx in minibatch_indices(batch // group_size, group_size, minibatches, gen)]
    first_divs = torch.zeros(batch, n_steps)  # [B, K] of the sampling policy, at the visited states
    if regularize:
        first_divs = torch.stack([gaussian_divergence(regularizer, m.float(), r.float(), v, reduction=reduction)
                                  for m, r, v in zip(ro.means, ro.ref_means, ro.variances, strict=True)],
                                 1).cpu()  # [B, K]
    losses, clip_fracs, approx_kls = [], [], []
    for u, (_, idx) in enumerate(updates):
        idx = idx.to(device)
        lps, divs = [], []
        for k in range(n_steps):
            mean = kernel_mean(eps_fn, policy, ro, k, idx)  # [b, C, h, w]
            lps.append(gaussian_log_prob(ro.samples[k][idx], mean.float(), ro.variances[k]))  # [b]
            if regularize:
                divs.append(gaussian_divergence(regularizer, mean.float(), ro.ref_means[k][idx].float(),
                                                ro.variances[k], reduction=reduction))  # [b]
        penalty = torch.stack(divs, 1) if divs else None  # [b, K]
        terms = ppo_clip_loss(torch.stack(lps, 1), ro.old_log_probs[idx], adv[idx], clip_range, penalty, beta)
        if not math.isfinite(float(terms.surrogate.detach())):
            raise NonFiniteError(f"non-finite PPO loss (update {u + 1}/{len(updates)}): lower train.lr or "
                                 "algorithm.beta")
        backward(terms.surrogate)
        losses.append(float(terms.surrogate.detach()))
        clip_fracs.append(terms.clip_fraction)
        approx_kls.append(terms.approx_kl)
        if u + 1 < len(updates):
            optimizer_step()
    out = RocmLoss(surrogate=torch.tensor(losses[-1]), loss=sum(losses) / len(losses),
                   reward=float(reward.mean()), divergence=float(first_divs.sum(1).mean()),
                   step_divergences=[float(v) for v in first_divs.mean(0)])
    extra = {"clip_fraction": sum(clip_fracs) / len(clip_fracs), "approx_kl": sum(approx_kls) / len(approx_kls),
             "ppo_updates": float(len(updates))}
    return PpoStepResult(loss=out, images=ro.images.detach().cpu(), rewards=reward,
                         sample_divergences=first_divs, components={k: v.detach().cpu() for k, v in parts.items()},
                         extra=extra)


# --------------------------------------------------------------------------- what the training loops call


def group_of(recipe) -> int:
    """Samples per prompt in a step's batch: ``algorithm.ppo_group_size`` for PPO, 1 for ROCM."""
    return recipe.algorithm.ppo_group_size if recipe.algorithm.name == "ppo" else 1


def ppo_kwargs(recipe) -> dict:
    """The recipe's algorithm section as :func:`ppo_step` keywords (without ``optimizer_step``)."""
    a = recipe.algorithm
    return dict(num_inference_steps=a.num_inference_steps, guidance_scale=a.guidance_scale,
                regularizer=a.regularizer, beta=a.beta, reduction=a.reduction, terminal=a.terminal,
                group_size=a.ppo_group_size, epochs=a.ppo_epochs, minibatches=a.ppo_minibatches,
                clip_range=a.ppo_clip_range, adv_clip_max=a.ppo_adv_clip_max)


def torch_optimizer_step(opt: torch.optim.Optimizer, params: list, max_grad_norm: float) -> Callable[[], float]:
    """An inner PPO update of the in-process trainer: clip, step, zero; returns the gradient norm."""

    def step() -> float:
        gn = torch.nn.utils.clip_grad_norm_(params, max_grad_norm if max_grad_norm > 0 else math.inf)
        if not torch.isfinite(gn):
            raise NonFiniteError(f"PPO inner update: gradient norm is {float(gn)}; lower train.lr")
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(gn)

    return step


def engine_optimizer_step(engine, zero_stage: int) -> Callable[[], float]:
    """An inner PPO update of a Ray Train worker: the DeepSpeed engine's step (its clipping, its all-reduce)."""
    from rocm_ray.train.ds_engine import grad_norm

    def step() -> float:
        gn = grad_norm(engine) if zero_stage == 0 else None  # stage 0: before step() zeroes the gradients
        engine.step()
        return gn if gn is not None else grad_norm(engine)

    return step


def local_reward_fn(scorer, algorithm: str) -> RewardFn:
    """``reward_fn`` of the in-process trainer: (r, dr/dx, parts) for ROCM, (r, None, parts) for PPO."""
    from rocm_ray.rewards.gradient import score_with_grad, score_without_grad

    if algorithm == "ppo":
        return lambda images, ps: score_without_grad(scorer, images, ps)
    return lambda images, ps: score_with_grad(scorer, images, ps)
