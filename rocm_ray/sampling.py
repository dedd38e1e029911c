"""Differentiable multi-step consistency sampling (ROCM, Shekhar & Zhang 2025, Sec. 3; LCM, Luo et al. 2023).

The sampler is the LCM pipeline's loop written out so that autograd sees it whole:

    x_1 = z_0
    d_n = c_skip(t_n) x_n + c_out(t_n) x0_hat(eps_theta(x_n, t_n, c, w))
    x_{n+1} = sqrt(abar_{n+1}) d_n + sqrt(1 - abar_{n+1}) z_n        (n < N)
    image = decode(d_N)

All noises z_0..z_{N-1} are drawn before the loop (reparameterization) with diffusers' own
``randn_tensor`` in the pipeline's order, so with the same generator the images equal those of
``LatentConsistencyModelPipeline``. For every step the sampler also returns the Gaussian step kernel
of the policy and of the reference at the same state x_n, which the regularizer compares.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

# eps_fn(x [B,C,h,w], t (int), w_embedding [B,D], text_embeddings [B,L,E]) -> eps [B,C,h,w]
EpsFn = Callable[[Tensor, int, Tensor, Tensor], Tensor]


@dataclass
class StepKernel:
    """pi(x_{n+1} | x_n) = N(mean, var I) of one sampling step, for the policy and the reference."""

    mean_policy: Tensor  # [B, C, h, w]
    mean_ref: Tensor | None  # [B, C, h, w]; None when no reference was evaluated
    var: float
    timestep: int
    terminal: bool  # the last step: no noise injected, kernel by the terminal convention


@dataclass
class Trajectory:
    images: Tensor  # [B, 3, H, W] in [0, 1]
    latents: Tensor  # d_N, [B, C, h, w]
    kernels: list[StepKernel]
    timesteps: list[int]


def guidance_embedding(guidance_scale: float, batch: int, dim: int, dtype=torch.float32, device=None) -> Tensor:
    """LCM's guidance-scale embedding of w = guidance_scale - 1 (sinusoidal, as the LCM pipeline)."""
    w = torch.full((batch,), guidance_scale - 1.0) * 1000.0  # [B]
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=dtype) * -(math.log(10000.0) / (half - 1)))  # [D/2]
    emb = w.to(dtype)[:, None] * freqs[None, :]  # [B, D/2]
    emb = torch.cat([torch.sin(emb), torch.cos(emb)], dim=1)  # [B, D]
    if dim % 2 == 1:
        emb = torch.nn.functional.pad(emb, (0, 1))  # [B, D]
    return emb.to(device=device)


def encode_prompts(tokenizer, text_encoder, prompts: Sequence[str], device=None) -> Tensor:
    """CLIP text embeddings exactly as the LCM pipeline computes them (no clip skip). [B, L, E]"""
    ids = tokenizer(
        list(prompts),
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids.to(device or text_encoder.device)  # [B, L]
    mask = None
    if getattr(text_encoder.config, "use_attention_mask", False):
        mask = (ids != tokenizer.pad_token_id).long()
    with torch.no_grad():
        return text_encoder(ids, attention_mask=mask)[0]  # [B, L, E]


def draw_noise(
    shape: Sequence[int],
    num_inference_steps: int,
    generator: torch.Generator | list[torch.Generator] | None,
    device=None,
    dtype=torch.float32,
) -> list[Tensor]:
    """z_0 (initial latents) then z_1..z_{N-1}, drawn in the LCM pipeline's order. Each [B, C, h, w]."""
    from diffusers.utils.torch_utils import randn_tensor

    return [randn_tensor(tuple(shape), generator=generator, device=device, dtype=dtype)
            for _ in range(num_inference_steps)]


def sample_trajectory(
    eps_fn: EpsFn,
    vae,
    scheduler,
    text_embeddings: Tensor,
    noises: Sequence[Tensor],
    guidance_scale: float,
    time_cond_proj_dim: int | None,
    ref_eps_fn: EpsFn | None = None,
    truncate_steps: int | None = None,
    gradient_checkpointing: bool = False,
    terminal: str = "auto",
    decode: bool = True,
) -> Trajectory:
    """Run the N-step consistency sampler with autograd; N = len(noises).

    Args:
        eps_fn: the policy's noise prediction (the trainable UNet).
        vae: diffusers ``AutoencoderKL`` (frozen) used to decode d_N.
        scheduler: an ``LCMScheduler``; its ``set_timesteps(N)`` schedule and boundary scalings are used.
        text_embeddings: [B, L, E] prompt embeddings.
        noises: z_0..z_{N-1}, each [B, C, h, w] (see :func:`draw_noise`).
        guidance_scale: w of the guidance embedding (LCM distills classifier-free guidance into it).
        time_cond_proj_dim: the UNet's guidance-embedding width (None: a UNet without one).
        ref_eps_fn: the frozen reference's noise prediction; when given, every step's kernel carries the
            reference mean at the same state x_n.
        truncate_steps: K, backprop through the last K steps only (DRaFT-K); None = all steps.
        gradient_checkpointing: recompute each UNet call in backward instead of storing activations.
        terminal: "auto" gives the noise-free last step the kernel N(sqrt(abar_N) d_N, (1 - abar_N) I)
            (as if d_N were re-noised to its own timestep); "none" leaves it out of ``kernels``.
        decode: decode d_N to images (False: ``images`` is d_N itself, for latent-space rewards/tests).
    """
    n_steps = len(noises)
    scheduler.set_timesteps(n_steps, device="cpu")
    timesteps = [int(t) for t in scheduler.timesteps]
    abar = scheduler.alphas_cumprod.double()
    batch = noises[0].shape[0]
    device, dtype = noises[0].device, noises[0].dtype
    w_emb = None
    if time_cond_proj_dim is not None:
        w_emb = guidance_embedding(guidance_scale, batch, time_cond_proj_dim, device=device).to(dtype)  # [B, D]
    first_grad_step = 0 if truncate_steps is None else max(0, n_steps - truncate_steps)

    def call(fn: EpsFn, x: Tensor, t: int) -> Tensor:
        if gradient_checkpointing and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(fn, x, t, w_emb, text_embeddings, use_reentrant=False)
        return fn(x, t, w_emb, text_embeddings)

    def denoise(eps: Tensor, x: Tensor, t: int) -> Tensor:
        return consistency_denoise(scheduler, eps, x, t)

    # 1. x_1 = z_0 (init_noise_sigma is 1 for LCM)
    x = noises[0] * scheduler.init_noise_sigma  # [B, C, h, w]
    kernels: list[StepKernel] = []
    d = x
    for n, t in enumerate(timesteps):
        grad_ctx = contextlib.nullcontext() if n >= first_grad_step else torch.no_grad()
        if n == first_grad_step:
            x = x.detach()
        with grad_ctx:
            # 2. d_n = f_theta(x_n, t_n, c, w): the consistency function of the policy
            d = denoise(call(eps_fn, x, t), x, t)  # [B, C, h, w]
            # 3. the reference's consistency function at the same state x_n (frozen weights)
            d_ref = denoise(call(ref_eps_fn, x, t), x, t) if ref_eps_fn is not None else None
            last = n == n_steps - 1
            # 4. the step kernel N(sqrt(abar_{n+1}) d_n, (1 - abar_{n+1}) I) (terminal: abar of t_N)
            a_next = float(abar[t if last else timesteps[n + 1]])
            if not last or terminal == "auto":
                s = math.sqrt(a_next)
                kernels.append(StepKernel(
                    mean_policy=s * d,
                    mean_ref=None if d_ref is None else s * d_ref,
                    var=1.0 - a_next,
                    timestep=t,
                    terminal=last,
                ))
            # 5. x_{n+1} = sqrt(abar_{n+1}) d_n + sqrt(1 - abar_{n+1}) z_n
            if not last:
                x = math.sqrt(a_next) * d + math.sqrt(1.0 - a_next) * noises[n + 1]  # [B, C, h, w]
    if not decode:
        return Trajectory(images=d, latents=d, kernels=kernels, timesteps=timesteps)
    # 6. image = decode(d_N), mapped from [-1, 1] to [0, 1] as the pipeline's postprocessing does
    images = decode_latents(vae, d, gradient_checkpointing)  # [B, 3, H, W]
    return Trajectory(images=images, latents=d, kernels=kernels, timesteps=timesteps)


def consistency_denoise(scheduler, eps: Tensor, x: Tensor, t: int) -> Tensor:
    """d = c_skip(t) x + c_out(t) x0_hat(eps): the LCM boundary-condition parameterization
    (``LCMScheduler.step``) of the consistency function at state x [B, C, h, w] and timestep t."""
    a_t = float(scheduler.alphas_cumprod.double()[t])
    c_skip, c_out = scheduler.get_scalings_for_boundary_condition_discrete(t)
    if scheduler.config.prediction_type == "epsilon":
        x0 = (x - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)  # [B, C, h, w]
    elif scheduler.config.prediction_type == "v_prediction":
        x0 = math.sqrt(a_t) * x - math.sqrt(1 - a_t) * eps
    else:  # "sample"
        x0 = eps
    if scheduler.config.thresholding:
        x0 = scheduler._threshold_sample(x0)
    elif scheduler.config.clip_sample:
        x0 = x0.clamp(-scheduler.config.clip_sample_range, scheduler.config.clip_sample_range)
    return float(c_out) * x0 + float(c_skip) * x  # [B, C, h, w]


def decode_latents(vae, latents: Tensor, gradient_checkpointing: bool = False) -> Tensor:
    """decode(latents) mapped from [-1, 1] to [0, 1] as the pipeline's postprocessing does. [B, 3, H, W]"""
    z = latents / vae.config.scaling_factor
    if gradient_checkpointing and torch.is_grad_enabled():
        img = torch.utils.checkpoint.checkpoint(lambda v: vae.decode(v).sample, z, use_reentrant=False)
    else:
        img = vae.decode(z).sample  # [B, 3, H, W]
    return (img / 2 + 0.5).clamp(0, 1)  # [B, 3, H, W]


def unet_eps_fn(unet) -> EpsFn:
    """Wrap a diffusers ``UNet2DConditionModel`` as an :data:`EpsFn`."""

    def fn(x: Tensor, t: int, w_emb: Tensor | None, text: Tensor) -> Tensor:
        return unet(x, t, timestep_cond=w_emb, encoder_hidden_states=text, return_dict=False)[0]

    return fn


def latent_shape(pipe, batch: int, height: int | None = None, width: int | None = None) -> tuple[int, ...]:
    """[B, C, h, w] of the latents for ``pipe`` at the given (default: the UNet's native) resolution."""
    vsf = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    h = (height or pipe.unet.config.sample_size * vsf) // vsf
    w = (width or pipe.unet.config.sample_size * vsf) // vsf
    return (batch, pipe.unet.config.in_channels, h, w)


@torch.no_grad()
def sample(
    pipe,
    prompts: str | Sequence[str],
    num_inference_steps: int = 4,
    guidance_scale: float = 8.0,
    seed: int | None = 0,
    generator: torch.Generator | list[torch.Generator] | None = None,
    height: int | None = None,
    width: int | None = None,
) -> Tensor:
    """Images [B, 3, H, W] in [0, 1] from a diffusers LCM pipeline, identical to the pipeline's own output
    for the same seed (``generator=torch.Generator().manual_seed(seed)``)."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    device = pipe.unet.device
    if generator is None:
        generator = torch.Generator().manual_seed(seed if seed is not None else torch.seed())
    text = encode_prompts(pipe.tokenizer, pipe.text_encoder, prompts, device).to(pipe.unet.dtype)
    noises = draw_noise(latent_shape(pipe, len(prompts), height, width), num_inference_steps, generator,
                        device=device, dtype=text.dtype)
    traj = sample_trajectory(
        unet_eps_fn(pipe.unet), pipe.vae, pipe.scheduler, text, noises, guidance_scale,
        pipe.unet.config.time_cond_proj_dim, terminal="none",
    )
    return traj.images.float()
