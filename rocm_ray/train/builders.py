"""Builders: recipe sections -> the flat, typed components (STYLE: components never see the recipe)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from rocm_ray.config import Recipe, RewardConfig
from rocm_ray.models.policy import Policy, load_pipeline, make_policy
from rocm_ray.sampling import draw_noise, encode_prompts, latent_shape, sample_trajectory


def build_reward(cfg: RewardConfig, device: str | torch.device = "cpu", algorithm: str = "rocm"):
    """The recipe's reward: one scorer, or a weighted mixture; checked differentiable for ROCM."""
    from rocm_ray.rewards import RewardMixture, build_scorer, require_differentiable

    parts = []
    for m in cfg.models:
        options = {k: v for k, v in (("head_path", m.head_path), ("tokenizer_path", m.tokenizer_path)) if v}
        parts.append((build_scorer(m.name, path=m.path, device=device, **options), m.weight))
    scorer = parts[0][0] if len(parts) == 1 and parts[0][1] == 1.0 else RewardMixture(parts)
    if algorithm == "rocm":
        require_differentiable(scorer, algorithm="rocm")
    return scorer


def build_policy(recipe: Recipe, device: str | torch.device = "cpu") -> Policy:
    m = recipe.model
    pipe = load_pipeline(m.pretrained, m.revision, m.cache_dir, m.dtype, device)
    if pipe.unet.config.time_cond_proj_dim is None:
        from rocm_ray.models.policy import ModelLoadError

        raise ModelLoadError(f"{recipe.source}: model.pretrained: the UNet of {m.pretrained!r} has no guidance "
                             "embedding (time_cond_proj_dim is null), so algorithm.guidance_scale would be "
                             "ignored; use an LCM distilled with one, e.g. SimianLuo/LCM_Dreamshaper_v7")
    return make_policy(pipe, m.lora_rank, m.lora_alpha, m.lora_targets, seed=recipe.train.seed)


@torch.no_grad()
def generate(policy: Policy, prompts: Sequence[str], seeds: Sequence[int], num_inference_steps: int,
             guidance_scale: float, reference: bool = False, batch_size: int = 32) -> Tensor:
    """Images [B, 3, H, W] of the policy (or the reference) for fixed prompts and per-image seeds."""
    device = next(policy.unet.parameters()).device
    out = []
    eps = policy.ref_eps_fn() if reference else policy.eps_fn()
    for i in range(0, len(prompts), batch_size):
        ps, ss = list(prompts[i:i + batch_size]), list(seeds[i:i + batch_size])
        text = encode_prompts(policy.tokenizer, policy.text_encoder, ps, device)
        gens = [torch.Generator().manual_seed(s) for s in ss]
        noises = draw_noise(latent_shape(policy, len(ps)), num_inference_steps, gens, device, text.dtype)
        traj = sample_trajectory(eps, policy.vae, policy.scheduler, text, noises, guidance_scale,
                                 policy.time_cond_proj_dim, terminal="none")
        out.append(traj.images.float().cpu())
    return torch.cat(out)  # [B, 3, H, W]


def eval_grid_inputs(recipe: Recipe, prompts: Sequence[str]) -> tuple[list[str], list[int]]:
    """Fixed prompts x seeds for before/after comparisons (seeds independent of training seeds)."""
    eval_prompts = list(recipe.data.eval_prompts) or list(dict.fromkeys(prompts))[:8]
    ps, ss = [], []
    for p in eval_prompts:
        for j in range(recipe.data.eval_seeds):
            ps.append(p)
            ss.append(10_000 + j)
    return ps, ss
