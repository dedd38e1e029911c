"""The policy-gradient baseline's loss: RLCM (Oertell et al. 2024, "RL for Consistency Models: Faster Reward
Guided Text-to-Image Generation", arXiv 2403.19632), i.e. PPO on the consistency sampler seen as an MDP.

The MDP (the same sampler as ROCM, :mod:`rocm_ray.sampling`): the state is (c, t_n, x_n), the action is
the next latent, drawn from the step kernel

    pi_theta(x_{n+1} | x_n, c) = N( sqrt(abar_{n+1}) d_theta(x_n, t_n, c),  (1 - abar_{n+1}) I )

where d_theta is the LCM consistency function (c_skip x_n + c_out x0_hat). The last step is noisy too
when ``algorithm.terminal`` is "auto" (RLCM's scheduler: abar of t_N itself, the image decoded from that
sample); with "none" it is the deterministic emission d_N and not an action. The reward r(image, c)
comes only at the end, needs no gradient, and can be anything (JPEG size included).

Log-probabilities (RLCM's scheduler, as DDPO's): the per-dimension Gaussian log-density of the sampled
x_{n+1}, averaged over the latent's dimensions ("mean"; "sum" is the exact joint log-density):

    log pi = mean_d [ -(x_{n+1} - mu_theta)^2 / (2 var) - log sqrt(var) - log sqrt(2 pi) ]

Advantages: per prompt, A_i = (r_i - mean_{j in prompt} r_j) / (std_{j in prompt} r_j + 1e-8), clipped to
[-a, a]. Per sampled step (i, n), with rho = exp(log pi_theta - log pi_old) (pi_old: the sampling policy),

    L_clip = mean_{i,n} max( -A_i rho_{i,n},  -A_i clip(rho_{i,n}, 1 - eps, 1 + eps) )

and, optionally, a KL (or any :mod:`rocm_ray.divergences`) penalty between the policy's and the frozen
reference's step kernels at the visited states, beta * mean_i sum_n D_n, as in ROCM's regularizer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


def gaussian_log_prob(sample: Tensor, mean: Tensor, var: float, reduction: str = "mean") -> Tensor:
    """log N(sample; mean, var I) per sample [B]: averaged over the non-batch dimensions ("mean", RLCM's
    and DDPO's convention) or summed ("sum", the joint density). ``sample`` and ``mean``: [B, ...]."""
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    if var <= 0:
        raise ValueError(f"the step kernel's variance must be > 0, got {var}")
    per_dim = (-(sample.detach() - mean) ** 2 / (2 * var) - 0.5 * math.log(var)
               - 0.5 * math.log(2 * math.pi))  # [B, ...]
    flat = per_dim.flatten(1)  # [B, D]
    return flat.mean(1) if reduction == "mean" else flat.sum(1)  # [B]


def group_advantages(rewards: Tensor, group_size: int, clip_max: float | None = None,
                     eps: float = 1e-8) -> Tensor:
    """Per-prompt normalized advantages [B] of rewards [B] laid out as consecutive groups of ``group_size``
    samples of one prompt: (r - group mean) / (group std + eps), std without Bessel's correction (numpy's),
    then clipped to [-clip_max, clip_max]."""
    if rewards.ndim != 1 or rewards.shape[0] % group_size:
        raise ValueError(f"rewards [B] with B a multiple of group_size={group_size}, got {tuple(rewards.shape)}")
    g = rewards.double().view(-1, group_size)  # [G, group]
    adv = (g - g.mean(1, keepdim=True)) / (g.std(1, unbiased=False, keepdim=True) + eps)  # [G, group]
    adv = adv.flatten().to(rewards.dtype if rewards.is_floating_point() else torch.float32)  # [B]
    if clip_max is not None:
        adv = adv.clamp(-clip_max, clip_max)
    return adv


@dataclass
class PpoLossTerms:
    surrogate: Tensor  # scalar to backpropagate
    policy_loss: float  # mean clipped objective (without the penalty)
    clip_fraction: float  # share of (sample, step) pairs whose ratio was clipped
    approx_kl: float  # mean (log pi_old - log pi_theta): how far this update moved from the sampler


def ppo_clip_loss(log_prob: Tensor, old_log_prob: Tensor, advantages: Tensor, clip_range: float,
                  penalty: Tensor | None = None, beta: float = 0.0) -> PpoLossTerms:
    """RLCM's clipped PPO objective over log-probs [B, K] (K sampled steps), advantages [B] and an optional
    per-sample, per-step divergence penalty [B, K] weighted by ``beta`` (summed over steps, batch mean)."""
    if log_prob.shape != old_log_prob.shape or log_prob.shape[0] != advantages.shape[0]:
        raise ValueError(f"log_prob {tuple(log_prob.shape)}, old_log_prob {tuple(old_log_prob.shape)} and "
                         f"advantages {tuple(advantages.shape)} do not fit")
    ratio = torch.exp(log_prob - old_log_prob.detach())  # [B, K]
    adv = advantages.detach()[:, None].to(ratio.dtype)  # [B, 1]
    unclipped = -adv * ratio  # [B, K]
    clipped = -adv * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)  # [B, K]
    policy = torch.maximum(unclipped, clipped).mean()
    surrogate = policy
    if penalty is not None and beta > 0:
        surrogate = surrogate + beta * penalty.sum(1).mean()
    with torch.no_grad():
        clip_frac = ((ratio - 1.0).abs() > clip_range).float().mean()
        approx_kl = (old_log_prob - log_prob).mean()
    return PpoLossTerms(surrogate=surrogate, policy_loss=float(policy.detach()), clip_fraction=float(clip_frac),
                        approx_kl=float(approx_kl))


def minibatch_indices(n_groups: int, group_size: int, minibatches: int, generator: torch.Generator
                      ) -> list[Tensor]:
    """A random split of the batch into ``minibatches`` parts that keep each prompt's group together."""
    order = torch.randperm(n_groups, generator=generator)  # [G]
    per = n_groups // minibatches
    out = []
    for m in range(minibatches):
        groups = order[m * per:(m + 1) * per]  # [G / M]
        out.append((groups[:, None] * group_size + torch.arange(group_size)[None, :]).flatten())  # [b]
    return out

