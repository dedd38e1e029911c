"""The differentiable sampler: parity with diffusers' LCM pipeline, gradients, truncation."""

from __future__ import annotations

import copy

import pytest
import torch

from rocm_ray.models.policy import make_policy
from rocm_ray.sampling import draw_noise, encode_prompts, latent_shape, sample, sample_trajectory

PROMPTS = ["a handwritten digit 7", "a thick digit 3", "a thin digit 0"]


@pytest.mark.parametrize("steps,guidance,seed", [(4, 8.0, 0), (2, 1.5, 7), (6, 3.0, 123)])
def test_parity_with_diffusers_pipeline(tiny_pipe, steps, guidance, seed):
    ours = sample(tiny_pipe, PROMPTS, num_inference_steps=steps, guidance_scale=guidance, seed=seed)
    theirs = tiny_pipe(PROMPTS, num_inference_steps=steps, guidance_scale=guidance,
                       generator=torch.Generator().manual_seed(seed), output_type="pt").images
    assert ours.shape == (3, 3, 16, 16)
    assert ours.min() >= 0 and ours.max() <= 1
    assert (ours - theirs).abs().max() < 1e-4


def test_parity_with_per_image_generators(tiny_pipe):
    gens = lambda: [torch.Generator().manual_seed(s) for s in (11, 12, 13)]  # noqa: E731
    ours = sample(tiny_pipe, PROMPTS, num_inference_steps=3, guidance_scale=5.0, generator=gens())
    theirs = tiny_pipe(PROMPTS, num_inference_steps=3, guidance_scale=5.0, generator=gens(),
                       output_type="pt").images
    assert (ours - theirs).abs().max() < 1e-4


def test_different_seeds_give_different_images(tiny_pipe):
    a = sample(tiny_pipe, PROMPTS[:1], seed=0)
    b = sample(tiny_pipe, PROMPTS[:1], seed=1)
    assert (a - b).abs().max() > 1e-3


@pytest.fixture()
def lora_policy(tiny_pipe):
    pipe = copy.deepcopy(tiny_pipe)
    policy = make_policy(pipe, lora_rank=4, lora_alpha=4.0, seed=0)
    # move LoRA B off zero so that every LoRA parameter has a non-trivial gradient
    with torch.no_grad():
        for name, p in policy.unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    return policy


def _trajectory(policy, truncate=None, checkpointing=False, n=4, seed=0):
    text = encode_prompts(policy.tokenizer, policy.text_encoder, PROMPTS[:2])
    gens = [torch.Generator().manual_seed(seed + i) for i in range(2)]
    noises = draw_noise(latent_shape(policy, 2), n, gens)
    return sample_trajectory(policy.eps_fn(), policy.vae, policy.scheduler, text, noises, 8.0,
                             policy.time_cond_proj_dim, ref_eps_fn=policy.ref_eps_fn(), truncate_steps=truncate,
                             gradient_checkpointing=checkpointing)


def _grads(policy, traj):
    policy.unet.zero_grad(set_to_none=True)
    loss = traj.images.mean() + sum(((k.mean_policy - k.mean_ref) ** 2).mean() for k in traj.kernels)
    loss.backward()
    return {n: p.grad.clone() for n, p in policy.unet.named_parameters() if p.requires_grad}


def test_kernels_and_reference(lora_policy):
    traj = _trajectory(lora_policy)
    assert len(traj.kernels) == 4 and traj.kernels[-1].terminal
    assert all(0 < k.var < 1 for k in traj.kernels)
    # the policy differs from the reference (LoRA B != 0), the reference equals the adapter-free UNet
    assert all((k.mean_policy - k.mean_ref).abs().max() > 0 for k in traj.kernels)
    no_term = _trajectory(lora_policy)
    assert len(no_term.kernels) == 4


def test_gradient_reaches_every_lora_parameter(lora_policy):
    grads = _grads(lora_policy, _trajectory(lora_policy))
    assert grads and all("lora_" in n for n in grads)
    for name, g in grads.items():
        assert torch.isfinite(g).all(), name
        assert g.abs().sum() > 0, f"no gradient reached {name}"


def test_truncation_changes_gradients_not_images(lora_policy):
    full = _trajectory(lora_policy, truncate=None)
    k1 = _trajectory(lora_policy, truncate=1)
    assert torch.equal(full.images, k1.images)
    g_full, g_k1 = _grads(lora_policy, _trajectory(lora_policy)), _grads(lora_policy, k1)
    diff = max((g_full[n] - g_k1[n]).abs().max().item() for n in g_full)
    assert diff > 1e-6
    # K = N is the full gradient
    g_kn = _grads(lora_policy, _trajectory(lora_policy, truncate=4))
    assert all(torch.allclose(g_full[n], g_kn[n], atol=1e-7) for n in g_full)


def test_gradient_checkpointing_gives_same_gradients(lora_policy):
    g_plain = _grads(lora_policy, _trajectory(lora_policy))
    g_ckpt = _grads(lora_policy, _trajectory(lora_policy, checkpointing=True))
    for n in g_plain:
        torch.testing.assert_close(g_ckpt[n], g_plain[n], rtol=1e-4, atol=1e-7)


def test_full_finetune_reference_is_frozen_copy(tiny_pipe):
    policy = make_policy(copy.deepcopy(tiny_pipe), lora_rank=0)
    assert policy.ref_unet is not None and not any(p.requires_grad for p in policy.ref_unet.parameters())
    assert all(p.requires_grad for p in policy.unet.parameters())
    traj = _trajectory(policy)
    for k in traj.kernels:  # identical weights at the start: identical kernels
        torch.testing.assert_close(k.mean_policy, k.mean_ref)
