"""Training throughput at real size: ROCM (rocm_ray's sampler and loss) vs a plain AlignProp-style loop.

    python benchmarks/gpu_throughput.py                     # on a GPU: Dreamshaper-v7 UNet, 512 px, ViT-H-14
    python benchmarks/gpu_throughput.py --cpu-small         # CPU: reduced widths, 64 px (what runs here)
    python benchmarks/gpu_throughput.py --cpu-small --resolution 32 --steps 2 --modes lora --ckpt off \
        --iters 1 --warmup 0 --batch 1 --no-write            # what the test runs

Models (random weights, configs in benchmarks/configs/, nothing downloaded): the Dreamshaper-v7 UNet
(SD1.5 + LCM guidance embedding, 859.6M parameters), the SD1.5 VAE (83.7M) and an HPSv2-size reward:
the OpenCLIP ViT-H-14 image tower (632M, a transformers ``CLIPVisionModelWithProjection``) scored
against a fixed random text embedding. ``--width`` / ``--reward-layers`` shrink them for CPU. Prompts
enter as random text embeddings [B, 77, 768] (the frozen text encoder runs once per step and is left out).

Per configuration (steps N in ``--steps``, LoRA rank 8 or full fine-tuning, gradient checkpointing
off/on), two methods run in the same process, alternating iterations:

  rocm       rocm_ray: ``sample_trajectory`` with the frozen reference (LoRA: adapter off; full: a frozen
             copy), the reward and its image gradient, the KL-regularized ROCM loss, backward, AdamW
  alignprop  the plain diffusers way: ``LCMScheduler.step`` in a loop under autograd, VAE decode, the
             reward, ``(-reward).backward()`` through everything, AdamW (no regularizer, no reference)

Reported: images/s (median over ``--iters`` timed iterations after ``--warmup``), peak memory
(``torch.cuda.max_memory_allocated`` on GPU; the process's peak RSS on CPU, cumulative), and
model-FLOP utilisation: FLOPs of one iteration counted by ``torch.utils.flop_counter.FlopCounterMode``
divided by the iteration time and the device's peak (``--peak-tflops``; on GPU the default is looked up
from the device name for the compute dtype; none on CPU).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "benchmarks" / "configs"
START, END = "<!-- gpu_throughput:start -->", "<!-- gpu_throughput:end -->"
PEAK_TFLOPS = {"H200": {"bf16": 989.0, "fp32": 67.0}, "H100": {"bf16": 989.0, "fp32": 67.0},
               "A100": {"bf16": 312.0, "fp32": 19.5}, "MI300X": {"bf16": 1307.0, "fp32": 163.4},
               "L40S": {"bf16": 362.0, "fp32": 91.6}}


def _config(name: str) -> dict:
    return {k: v for k, v in json.loads((CONFIGS / name).read_text()).items() if not k.startswith("_")}


def _scaled(channels: list[int], width: float) -> list[int]:
    return [max(32, int(round(c * width / 32)) * 32) for c in channels]


class ClipReward:
    """An HPSv2-shaped reward: cosine of the CLIP image embedding with a fixed text embedding, x 100."""

    def __init__(self, layers: int | None, width: float, device, dtype):
        import torch
        from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

        cfg = _config("hpsv2_vit_h14.json")
        if layers:
            cfg["num_hidden_layers"] = layers
        if width < 1:
            cfg["hidden_size"] = max(64, int(cfg["hidden_size"] * width) // 64 * 64)
            cfg["intermediate_size"] = 4 * cfg["hidden_size"]
            cfg["num_attention_heads"] = max(1, cfg["hidden_size"] // 80)
        self.model = CLIPVisionModelWithProjection(CLIPVisionConfig(**cfg)).to(device, dtype).requires_grad_(False)
        self.size = cfg["image_size"]
        self.text = torch.nn.functional.normalize(torch.randn(cfg["projection_dim"], device=device, dtype=dtype), dim=0)

    def __call__(self, images):
        import torch.nn.functional as F

        x = F.interpolate(images, size=(self.size, self.size), mode="bilinear", align_corners=False)  # [B,3,s,s]
        emb = F.normalize(self.model(pixel_values=x.to(self.text.dtype)).image_embeds, dim=-1)  # [B, D]
        return 100.0 * (emb @ self.text).float()  # [B]


def build(args, mode: str, device, dtype):
    """(policy, reward, text embeddings [B, 77, 768]) at the requested size."""
    import types

    import torch
    from diffusers import AutoencoderKL, LCMScheduler, UNet2DConditionModel

    from rocm_ray.models.policy import make_policy

    torch.manual_seed(0)
    ucfg = _config("dreamshaper_v7_unet.json")
    ucfg["block_out_channels"] = _scaled(ucfg["block_out_channels"], args.width)
    vcfg = _config("sd15_vae.json")
    vcfg["block_out_channels"] = _scaled(vcfg["block_out_channels"], args.width)
    unet = UNet2DConditionModel(**ucfg).to(device, dtype)
    vae = AutoencoderKL(**vcfg).to(device, dtype)
    pipe = types.SimpleNamespace(unet=unet, vae=vae, text_encoder=torch.nn.Identity(), tokenizer=None,
                                 scheduler=LCMScheduler(beta_start=0.00085, beta_end=0.012,
                                                        beta_schedule="scaled_linear"))
    policy = make_policy(pipe, lora_rank=8 if mode == "lora" else 0)
    if mode == "lora":  # fp32 adapter over a low-precision base
        for p in policy.trainable_parameters():
            p.data = p.data.float()
    reward = ClipReward(args.reward_layers, args.reward_width, device, dtype)
    text = torch.randn(args.batch, 77, ucfg["cross_attention_dim"], device=device, dtype=dtype)
    return policy, reward, text


def rocm_iteration(policy, reward, text, steps: int, ckpt: bool, opt, args) -> None:
    """One ROCM step with rocm_ray's sampler and loss."""
    import torch

    from rocm_ray.loss import rocm_loss, step_divergences
    from rocm_ray.sampling import draw_noise, sample_trajectory

    b, lat = text.shape[0], args.resolution // 8
    gens = [torch.Generator().manual_seed(i) for i in range(b)]
    noises = draw_noise((b, 4, lat, lat), steps, gens, device=text.device, dtype=text.dtype)
    traj = sample_trajectory(policy.eps_fn(), policy.vae, policy.scheduler, text, noises, 8.0,
                             policy.time_cond_proj_dim, ref_eps_fn=policy.ref_eps_fn(),
                             gradient_checkpointing=ckpt)
    images = traj.images.float()  # [B, 3, H, W]
    x = images.detach().requires_grad_(True)
    r = reward(x)  # [B]
    (g,) = torch.autograd.grad(r.sum(), x)  # [B, 3, H, W]
    out = rocm_loss(images, r.detach(), g, step_divergences(traj.kernels, "kl"), beta=0.01)
    out.surrogate.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def alignprop_iteration(policy, reward, text, steps: int, ckpt: bool, opt, args) -> None:
    """The plain loop: LCMScheduler.step under autograd, decode, -reward backward through it all."""
    import torch
    from torch.utils.checkpoint import checkpoint

    from rocm_ray.sampling import guidance_embedding

    sched = policy.scheduler
    sched.set_timesteps(steps, device=text.device)
    b, lat = text.shape[0], args.resolution // 8
    latents = torch.randn(b, 4, lat, lat, generator=torch.Generator().manual_seed(0)).to(text.device, text.dtype)
    w = guidance_embedding(8.0, b, policy.time_cond_proj_dim, device=text.device).to(text.dtype)  # [B, 256]
    unet = policy.unet

    def eps(x, t):
        return unet(x, t, timestep_cond=w, encoder_hidden_states=text, return_dict=False)[0]

    for t in sched.timesteps:
        pred = checkpoint(eps, latents, t, use_reentrant=False) if ckpt else eps(latents, t)
        latents, denoised = sched.step(pred, t, latents, return_dict=False)
    images = policy.vae.decode(denoised / policy.vae.config.scaling_factor, return_dict=False)[0]
    images = (images.float() / 2 + 0.5).clamp(0, 1)  # [B, 3, H, W]
    (-reward(images).mean()).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def _peak_mib(device) -> float:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(args, mode: str, steps: int, ckpt: bool, device, dtype) -> list[dict]:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    policy, reward, text = build(args, mode, device, dtype)
    if mode == "full":
        policy.ref_unet = copy.deepcopy(policy.unet).requires_grad_(False)  # the reference ROCM needs
    opt = torch.optim.AdamW(policy.trainable_parameters(), lr=1e-6)
    rows = []
    methods = {"rocm": rocm_iteration, "alignprop": alignprop_iteration}
    times: dict[str, list[float]] = {m: [] for m in methods}
    peaks, flops = {}, {}
    for m, fn in methods.items():  # FLOPs of one iteration (also a warm-up)
        with FlopCounterMode(display=False) as fc:
            fn(policy, reward, text, steps, ckpt, opt, args)
        flops[m] = fc.get_total_flops()
    for i in range(args.warmup + args.iters):  # alternating methods: the same conditions for both
        for m, fn in methods.items():
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            _sync(device)
            t0 = time.perf_counter()
            fn(policy, reward, text, steps, ckpt, opt, args)
            _sync(device)
            if i >= args.warmup:
                times[m].append(time.perf_counter() - t0)
                peaks[m] = max(peaks.get(m, 0.0), _peak_mib(device))
    for m in methods:
        t = statistics.median(times[m])
        mfu = flops[m] / t / (args.peak_tflops * 1e12) if args.peak_tflops else None
        rows.append({"method": m, "mode": mode, "steps": steps, "ckpt": ckpt, "img_s": args.batch / t,
                     "peak_mib": peaks[m], "tflop": flops[m] / 1e12, "mfu": mfu})
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cpu-small", action="store_true", help="reduced sizes for a CPU run (the defaults below)")
    ap.add_argument("--width", type=float, default=1.0, help="UNet/VAE channel width scale")
    ap.add_argument("--reward-layers", type=int, default=None, help="ViT layers (default 32)")
    ap.add_argument("--reward-width", type=float, default=1.0)
    ap.add_argument("--resolution", type=int, default=512)
    ap.add_argument("--batch", type=int, default=2, help="images per iteration")
    ap.add_argument("--steps", default="4,8")
    ap.add_argument("--modes", default="lora,full")
    ap.add_argument("--ckpt", default="off,on", help="gradient checkpointing settings")
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--dtype", default=None, help="bf16 | fp32 (default: bf16 on GPU, fp32 on CPU)")
    ap.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU")
    ap.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md alone")
    args = ap.parse_args(argv)
    if args.cpu_small:
        args.width, args.reward_layers, args.reward_width, args.resolution = 0.1, 2, 0.1, 64
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    sys.path.insert(0, str(REPO / "benchmarks"))
    from _common import machine, versions, write_section

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dname = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dname]
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    if args.peak_tflops is None and gpu:
        args.peak_tflops = next((v[dname] for k, v in PEAK_TFLOPS.items() if k in gpu), None)
    rows = []
    for mode in args.modes.split(","):
        for steps in (int(s) for s in args.steps.split(",")):
            for ckpt in (c == "on" for c in args.ckpt.split(",")):
                rows += measure(args, mode, steps, ckpt, device, dtype)
                print(f"{mode} N={steps} ckpt={ckpt}: " + ", ".join(
                    f"{r['method']} {r['img_s']:.3g} img/s" for r in rows[-2:]), flush=True)
    lines = ["| method | mode | steps | grad. checkpointing | images/s | peak memory (MiB) | TFLOP per iteration "
             "| MFU |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a (CPU)"
        lines.append(f"| {r['method']} | {r['mode']} | {r['steps']} | {'on' if r['ckpt'] else 'off'} | "
                     f"{r['img_s']:.3g} | {r['peak_mib']:.0f} | {r['tflop']:.3g} | {mfu} |")
    where = f"GPU: {gpu}, {dname}" if gpu else f"CPU ({dname}; peak memory is the process's cumulative peak RSS)"
    text = "\n".join([
        f"{where}; UNet/VAE width {args.width:g}, reward ViT layers {args.reward_layers or 32} at width "
        f"{args.reward_width:g}, {args.resolution} px, {args.batch} images per iteration, median of {args.iters} "
        f"iterations after {args.warmup} warm-up, methods alternating.",
        f"Machine: {machine()}; {versions()}.", "", *lines])
    print(text)
    if not args.no_write:
        cmd = "python benchmarks/gpu_throughput.py" + "".join(f" {a}" for a in (sys.argv[1:] if argv is None else argv))
        write_section(START, END, "Training throughput (`benchmarks/gpu_throughput.py`)", cmd, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
