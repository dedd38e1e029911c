"""Build the embedded tiny world: a latent consistency model and reward models trained on sklearn digits.

``python -m rocm_ray.models.tiny_world --out rocm_ray/assets/tiny [--seed 0] [--scale 1.0]``

No weights can be downloaded on a fresh machine, so rocm_ray ships a tiny world of its own, made from the
1797 8x8 handwritten digits that ship inside scikit-learn (upsampled to 32x32 RGB, white ink on black).
Every model is a real diffusers/transformers class at toy size, loaded by the same code as the real
checkpoints:

* ``lcm/``: a ``LatentConsistencyModelPipeline`` folder (``AutoencoderKL`` with a 4x8x8 latent, a frozen
  random ``CLIPTextModel`` + ``CLIPTokenizer``, a ``UNet2DConditionModel`` with cross-attention and the LCM
  guidance embedding, ``LCMScheduler`` with LCM Dreamshaper's settings). Made by latent consistency
  distillation (LCD, Luo et al. 2023, Algorithm 1) from a tiny latent diffusion teacher with
  classifier-free guidance, following diffusers' ``train_lcm_distill_sd_wds.py``.
* ``clip/``: a tiny ``CLIPModel`` + tokenizer + ``CLIPImageProcessor`` trained contrastively on digits vs.
  prompts, for the ``clip_score`` reward.
* ``aesthetic_head.pth``: a LAION-aesthetic-format linear MLP on the tiny CLIP's normalized image
  embedding, trained to predict ink mass (a deliberately hackable "aesthetic" score, roughly 0-10).
* ``judge/``: a CNN digit classifier (:mod:`rocm_ray.models.judge`), a held-out judge, never a reward.
* ``build_info.json``: seed, scale, per-stage times and the evaluate stage's numbers.

Stages (each a function here): judge, vae, teacher, distill, clip, aesthetic, evaluate. Intermediate
results and training checkpoints live in a work folder (default ``<out>/.build``, removed after a
successful build unless ``--keep-work``), so rerunning the same command after a crash resumes.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import re
import shutil
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

# Busy-waiting OpenMP threads collapse under CPU contention (measured on a shared 2-core machine: 0.7 s/step
# passive vs 5-20 s/step spinning). Set only when this module is what first loads torch (the build CLI);
# an explicit OMP_WAIT_POLICY in the environment wins.
if "torch" not in sys.modules:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from rocm_ray.sampling import encode_prompts  # noqa: E402  (prompt embeddings as the LCM pipeline makes them)

IMAGE_SIZE = 32
LATENT_CHANNELS = 4
LATENT_SIZE = 8  # VAE downsampling factor 4: 32x32 images <-> 4x8x8 latents
SPLIT_SEED = 0  # the train/test split is part of the world's definition, independent of --seed
TEST_FRACTION = 0.2
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
STYLES = ("", "thick", "thin")  # "thick"/"thin": top/bottom third of ink mass within the image's digit
DEFAULT_GUIDANCE = 3.0  # recipe default guidance scale (Imagen convention, as the LCM pipeline takes it)
DEFAULT_STEPS = 4
# LCD guidance range in the LCM paper's convention w (the pipeline's guidance_scale is w + 1).
W_MIN, W_MAX = 1.0, 4.0
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
STAGES = ("judge", "vae", "teacher", "distill", "clip", "aesthetic", "evaluate")


# ----------------------------------------------------------------------------------------------------
# Prompts
# ----------------------------------------------------------------------------------------------------


def make_prompt(digit: int, style: str = "", word: bool = False) -> str:
    """The tiny world's prompt for ``digit``: "a handwritten digit 7", "a thick handwritten digit seven"."""
    name = DIGIT_WORDS[digit] if word else str(digit)
    return f"a {style + ' ' if style else ''}handwritten digit {name}"


def tiny_prompts(digits: Iterable[int] = range(10), styles: Sequence[str] = ("",)) -> list[str]:
    """The prompts the trainer uses on the tiny world, one per (style, digit): "a handwritten digit k".

    ``styles`` adds variations ("thick", "thin") that the tiny LCM and CLIP were trained on.
    """
    return [make_prompt(d, s) for s in styles for d in digits]


_DIGIT_RE = re.compile(r"\b(" + "|".join(DIGIT_WORDS) + r"|[0-9])\b")


def prompt_digit(prompt: str) -> int:
    """The digit a tiny-world prompt asks for (the last digit or digit word in it).

    Raises ``ValueError`` for a prompt that names no digit.
    """
    found = _DIGIT_RE.findall(prompt.lower())
    if not found:
        raise ValueError(f"prompt {prompt!r} names no digit (expected e.g. 'a handwritten digit 7')")
    last = found[-1]
    return int(last) if last.isdigit() else DIGIT_WORDS.index(last)


def all_captions() -> list[str]:
    """Every caption of the world: 10 digits x 3 styles x (numeral, word)."""
    return [make_prompt(d, s, w) for w in (False, True) for s in STYLES for d in range(10)]


# ----------------------------------------------------------------------------------------------------
# Data and augmentation
# ----------------------------------------------------------------------------------------------------


@dataclass
class DigitData:
    """sklearn digits as 32x32 RGB images in [0, 1] (white ink on black), split into train and test."""

    train_images: torch.Tensor  # [N, 3, 32, 32]
    train_labels: torch.Tensor  # [N]
    test_images: torch.Tensor  # [M, 3, 32, 32]
    test_labels: torch.Tensor  # [M]
    mass_thresholds: torch.Tensor  # [10, 2]: per digit, the 1/3 and 2/3 quantiles of train ink mass
    mass_mean: float
    mass_std: float


def ink_mass(images: torch.Tensor) -> torch.Tensor:
    """Mean ink of each image ``[B, 3, H, W]`` in [0, 1] -> ``[B]`` (the fraction of the canvas inked)."""
    return images.mean(dim=(1, 2, 3))


def load_digit_data() -> DigitData:
    """Load sklearn's digits, upsample 8x8 -> 32x32 (bicubic), and split 80/20 stratified (fixed seed)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0  # [1797, 1, 8, 8]
    x = F.interpolate(
        x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bicubic", align_corners=False
    )  # [1797, 1, 32, 32]
    x = x.clamp(0, 1).expand(-1, 3, -1, -1).contiguous()  # [1797, 3, 32, 32]
    y = torch.tensor(digits.target, dtype=torch.long)
    idx_train, idx_test = train_test_split(
        np.arange(len(y)), test_size=TEST_FRACTION, random_state=SPLIT_SEED, stratify=digits.target
    )
    train_x, train_y = x[idx_train], y[idx_train]
    mass = ink_mass(train_x)
    thresholds = torch.stack(
        [torch.quantile(mass[train_y == d], torch.tensor([1 / 3, 2 / 3])) for d in range(10)]
    )  # [10, 2]
    return DigitData(
        train_images=train_x,
        train_labels=train_y,
        test_images=x[idx_test],
        test_labels=y[idx_test],
        mass_thresholds=thresholds,
        mass_mean=float(mass.mean()),
        mass_std=float(mass.std()),
    )


def image_styles(images: torch.Tensor, labels: torch.Tensor, thresholds: torch.Tensor) -> list[str]:
    """Style word of each image: "thin"/"thick" for the bottom/top third of its digit's ink mass, else ""."""
    mass = ink_mass(images)
    lo, hi = thresholds[labels, 0], thresholds[labels, 1]
    return ["thin" if m < a else "thick" if m > b else "" for m, a, b in zip(mass, lo, hi, strict=True)]


def _gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable 5-tap Gaussian blur of ``x [B, C, H, W]``."""
    r = torch.arange(-2, 3, dtype=x.dtype)
    k = torch.exp(-(r**2) / (2 * sigma**2))
    k = k / k.sum()
    c = x.shape[1]
    x = F.conv2d(F.pad(x, (2, 2, 0, 0), mode="replicate"), k.view(1, 1, 1, 5).expand(c, 1, 1, 5), groups=c)
    return F.conv2d(F.pad(x, (0, 0, 2, 2), mode="replicate"), k.view(1, 1, 5, 1).expand(c, 1, 5, 1), groups=c)


def augment(
    images: torch.Tensor,
    gen: torch.Generator,
    shift: float = 2.0,
    rotate_deg: float = 8.0,
    scale: float = 0.08,
    thickness: float = 1.0,
    blur: float = 0.5,
    noise: float = 0.03,
) -> torch.Tensor:
    """Random small affine jitter, stroke thickening/thinning, blur and noise of ``images [B, 3, H, W]``.

    Makes the judge and the CLIP robust to the statistics of generated images (slightly blurry, shifted,
    thicker or thinner strokes). ``thickness`` in [0, 1] is the strength of the stroke change.
    """
    b, _, h, _ = images.shape

    def u(lo: float, hi: float) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(b, generator=gen)  # [B]

    # 1. affine jitter (shift in pixels, rotation, zoom), zero (black) padding
    ang = u(-rotate_deg, rotate_deg) * math.pi / 180
    zoom = u(1 - scale, 1 + scale)
    tx, ty = u(-shift, shift) * 2 / h, u(-shift, shift) * 2 / h
    theta = torch.stack(
        [
            torch.stack([torch.cos(ang) / zoom, -torch.sin(ang) / zoom, tx], dim=1),
            torch.stack([torch.sin(ang) / zoom, torch.cos(ang) / zoom, ty], dim=1),
        ],
        dim=1,
    )  # [B, 2, 3]
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)  # [B, H, W, 2]
    x = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    # 2. stroke thickness: blend toward a dilation (thicker) or an erosion (thinner)
    if thickness > 0:
        dil = F.max_pool2d(x, 3, stride=1, padding=1)
        ero = -F.max_pool2d(-x, 3, stride=1, padding=1)
        t = u(-thickness, thickness).view(b, 1, 1, 1)  # [B, 1, 1, 1]
        x = torch.where(t > 0, x + t * (dil - x), x + (-t) * (ero - x))
    # 3. blur toward a Gaussian-blurred copy
    if blur > 0:
        a = u(0, blur).view(b, 1, 1, 1)
        x = x + a * (_gaussian_blur(x, 1.0) - x)
    # 4. contrast and noise
    x = x * u(0.85, 1.1).view(b, 1, 1, 1)
    if noise > 0:
        x = x + noise * torch.rand(b, 1, 1, 1, generator=gen) * torch.randn(x.shape, generator=gen)
    return x.clamp(0, 1)


# ----------------------------------------------------------------------------------------------------
# Build plumbing: budgets, logging, checkpoints
# ----------------------------------------------------------------------------------------------------


@dataclass
class Budget:
    """Iterations and batch sizes of every stage at ``--scale 1.0`` (about 35-45 min on 2 CPU cores)."""

    judge_steps: int = 700
    judge_batch: int = 128
    vae_steps: int = 500
    vae_batch: int = 64
    teacher_steps: int = 2500
    teacher_batch: int = 128
    distill_steps: int = 900
    distill_batch: int = 96
    clip_steps: int = 500
    clip_batch: int = 192
    aesthetic_steps: int = 1500
    eval_samples: int = 50  # per digit, for the gate
    teacher_copies: int = 4  # augmented copies of the train set encoded for teacher/distill latents
    max_images: int = 1_000_000  # cap on images for post-hoc statistics and embeddings (tests: small)
    guidance_sweep: tuple[float, ...] = (1.0, 2.0, 3.0, 4.0, 5.0)  # evaluated besides DEFAULT_GUIDANCE
    diag_per_digit: int = 20  # teacher diagnostic samples per digit

    def scaled(self, scale: float) -> Budget:
        """Every iteration count times ``scale`` (at least 2); tiny scales also shrink batches (tests)."""
        out = Budget()
        for name, value in asdict(self).items():
            if name.endswith("_steps"):
                setattr(out, name, max(2, round(value * scale)))
            elif name.endswith("_batch"):
                setattr(out, name, value if scale >= 0.1 else min(value, 16))
        out.eval_samples = max(2, round(self.eval_samples * min(1.0, scale * 10)))
        if scale < 0.1:
            out.teacher_copies, out.max_images, out.guidance_sweep, out.diag_per_digit = 1, 128, (), 2
        return out


@dataclass
class BuildContext:
    """What every stage needs: the data, the folders, the seed, the budget and a shared log."""

    out: Path
    work: Path
    seed: int
    budget: Budget
    data: DigitData
    info: dict = field(default_factory=dict)

    def stage_seed(self, stage: str) -> int:
        """A per-stage seed, so rerunning one stage reproduces it without rerunning the others."""
        return self.seed * 1000 + STAGES.index(stage)


def log(stage: str, msg: str) -> None:
    """One progress line: ``[stage] msg``."""
    print(f"[{stage}] {msg}", flush=True)


def cosine_lr(step: int, total: int, base: float, warmup: int = 50) -> float:
    """Linear warmup then cosine decay to 10% of ``base``."""
    if step < warmup:
        return base * (step + 1) / warmup
    p = (step - warmup) / max(1, total - warmup)
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, p))))


class Checkpointer:
    """Periodic training checkpoints of a stage, so a crash loses at most ``every_s`` seconds of work."""

    def __init__(self, path: Path, every_s: float = 90.0):
        self.path = path
        self.every_s = every_s
        self.last = time.time()

    def load(self) -> dict | None:
        """The saved state, or ``None`` when the stage starts fresh."""
        if self.path.is_file():
            return torch.load(self.path, map_location="cpu", weights_only=True)  # tensors, dicts, ints only
        return None

    def maybe_save(self, state_fn: Callable[[], dict], force: bool = False) -> None:
        """Save ``state_fn()`` if ``every_s`` seconds passed since the last save (or ``force``)."""
        if force or time.time() - self.last > self.every_s:
            tmp = self.path.with_suffix(".tmp")
            torch.save(state_fn(), tmp)
            tmp.replace(self.path)
            self.last = time.time()

    def clear(self) -> None:
        """Remove the checkpoint once the stage's result is saved."""
        self.path.unlink(missing_ok=True)


def train_loop(
    ctx: BuildContext,
    stage: str,
    steps: int,
    modules: dict[str, nn.Module],
    optimizer: torch.optim.Optimizer,
    gen: torch.Generator,
    step_fn: Callable[[int], float],
    base_lr: float,
    log_every: int = 25,
) -> None:
    """Run ``step_fn(step) -> loss`` for ``steps`` steps with LR schedule, progress lines and checkpoints.

    ``modules`` (models, EMA copies) and the optimizer, the data generator and torch's global RNG are
    checkpointed together, so a resumed stage continues the same random stream.
    """
    ckpt = Checkpointer(ctx.work / f"{stage}_ckpt.pt")
    start = 0
    state = ckpt.load()
    if state is not None:
        for name, module in modules.items():
            module.load_state_dict(state["modules"][name])
        optimizer.load_state_dict(state["optimizer"])
        gen.set_state(state["gen"])
        torch.set_rng_state(state["rng"])
        start = state["step"]
        log(stage, f"resumed from step {start}")

    def snapshot(step: int) -> dict:
        return {
            "modules": {k: m.state_dict() for k, m in modules.items()},
            "optimizer": optimizer.state_dict(),
            "gen": gen.get_state(),
            "rng": torch.get_rng_state(),
            "step": step,
        }

    t0, ema_loss = time.time(), None
    for step in range(start, steps):
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(step, steps, base_lr)
        loss = step_fn(step)
        ema_loss = loss if ema_loss is None else 0.9 * ema_loss + 0.1 * loss
        done = step + 1
        if done % log_every == 0 or done == steps:
            rate = (done - start) / (time.time() - t0)
            log(stage, f"step {done}/{steps} loss {ema_loss:.4f} {rate:.2f} it/s")
        if done < steps:
            ckpt.maybe_save(lambda d=done: snapshot(d))
    ckpt.clear()


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """``ema <- decay * ema + (1 - decay) * model``, parameter by parameter."""
    for pe, pm in zip(ema.parameters(), model.parameters(), strict=True):
        pe.lerp_(pm, 1 - decay)


# ----------------------------------------------------------------------------------------------------
# Stage: judge
# ----------------------------------------------------------------------------------------------------


def train_judge(ctx: BuildContext) -> Path:
    """Train the held-out digit judge on the train split with heavy augmentation; save ``<out>/judge``."""
    from rocm_ray.models.judge import DigitJudge, judge_predict, save_judge

    stage, b = "judge", ctx.budget
    torch.manual_seed(ctx.stage_seed(stage))
    gen = torch.Generator().manual_seed(ctx.stage_seed(stage))
    judge = DigitJudge(channels=(16, 32, 64))
    opt = torch.optim.AdamW(judge.parameters(), lr=2e-3, weight_decay=1e-4)
    x_all, y_all = ctx.data.train_images, ctx.data.train_labels

    def step_fn(step: int) -> float:
        judge.train()
        idx = torch.randint(0, len(y_all), (b.judge_batch,), generator=gen)
        x = augment(x_all[idx], gen, shift=2.5, rotate_deg=10, thickness=1.0, blur=0.8, noise=0.06)
        loss = F.cross_entropy(judge(x), y_all[idx], label_smoothing=0.05)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.item()

    train_loop(ctx, stage, b.judge_steps, {"judge": judge}, opt, gen, step_fn, base_lr=2e-3)
    judge.eval()
    acc = (judge_predict(judge, ctx.data.test_images) == ctx.data.test_labels).float().mean().item()
    log(stage, f"held-out accuracy on real digits: {acc:.4f}")
    save_judge(judge, ctx.out / "judge")
    return ctx.out / "judge"


# ----------------------------------------------------------------------------------------------------
# Stage: vae
# ----------------------------------------------------------------------------------------------------


def build_vae() -> nn.Module:
    """``AutoencoderKL``: 32x32 RGB <-> 4x8x8 latent (three encoder blocks, 0.29M parameters)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(32, 32, 32),
        layers_per_block=1,
        latent_channels=LATENT_CHANNELS,
        norm_num_groups=8,
        sample_size=IMAGE_SIZE,
    )


def train_vae(ctx: BuildContext) -> Path:
    """Train the VAE (L1 + MSE reconstruction, small KL) on augmented train digits; save ``work/vae``.

    After training, ``scaling_factor`` is set to 1 / std of the latents, as Stable Diffusion's 0.18215.
    """
    stage, b = "vae", ctx.budget
    torch.manual_seed(ctx.stage_seed(stage))
    gen = torch.Generator().manual_seed(ctx.stage_seed(stage))
    vae = build_vae()
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    x_all = ctx.data.train_images
    kl_weight = 1e-3

    def step_fn(step: int) -> float:
        idx = torch.randint(0, len(x_all), (b.vae_batch,), generator=gen)
        x = augment(x_all[idx], gen, shift=1.5, rotate_deg=6, thickness=0.6, blur=0.3, noise=0.0) * 2 - 1
        post = vae.encode(x).latent_dist
        z = post.sample(generator=gen)  # [B, 4, 8, 8]
        rec = vae.decode(z).sample  # [B, 3, 32, 32]
        kl = 0.5 * (post.mean**2 + post.var - 1 - post.logvar).mean()
        loss = F.mse_loss(rec, x) + 0.5 * F.l1_loss(rec, x) + kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        return loss.item()

    train_loop(ctx, stage, b.vae_steps, {"vae": vae}, opt, gen, step_fn, base_lr=1e-3)
    vae.eval()
    x_all = x_all[: b.max_images]
    with torch.no_grad():
        z = torch.cat([vae.encode(x * 2 - 1).latent_dist.mean for x in x_all.split(256)])  # [N, 4, 8, 8]
        rec = torch.cat([vae.decode(zz).sample for zz in z.split(256)])  # [N, 3, 32, 32]
    vae.register_to_config(scaling_factor=float(1.0 / z.std()))
    mse = F.mse_loss((rec / 2 + 0.5).clamp(0, 1), x_all).item()
    log(stage, f"train reconstruction MSE {mse:.5f}; latent std {z.std():.3f} mean {z.mean():.3f}")
    vae.save_pretrained(ctx.work / "vae")
    return ctx.work / "vae"


# ----------------------------------------------------------------------------------------------------
# Text side: tokenizer, frozen random text encoder, prompt embeddings
# ----------------------------------------------------------------------------------------------------


def build_text_side(ctx: BuildContext) -> tuple:
    """The tokenizer (``write_clip_tokenizer`` over ``DEFAULT_WORDS``) and a frozen random CLIPTextModel.

    A frozen random text encoder is enough: its per-token outputs differ, and the UNet's cross-attention
    learns to read them (as a frozen pretrained encoder is read in Stable Diffusion).
    """
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from rocm_ray.models.tiny import write_clip_tokenizer

    tok_dir, te_dir = ctx.work / "tokenizer", ctx.work / "text_encoder"
    if not (te_dir / "config.json").is_file():
        tok = write_clip_tokenizer(tok_dir)
        torch.manual_seed(ctx.seed * 1000 + 99)
        te = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(tok),
                hidden_size=64,
                intermediate_size=128,
                num_hidden_layers=2,
                num_attention_heads=4,
                max_position_embeddings=tok.model_max_length,
                projection_dim=64,
                bos_token_id=tok.bos_token_id,
                eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id,
            )
        )
        te.save_pretrained(te_dir)
    tok = CLIPTokenizer.from_pretrained(tok_dir)
    te = CLIPTextModel.from_pretrained(te_dir).eval().requires_grad_(False)
    return tok, te


# ----------------------------------------------------------------------------------------------------
# Stage: teacher (a tiny latent diffusion model with classifier-free guidance dropout)
# ----------------------------------------------------------------------------------------------------


def unet_config() -> dict:
    """The UNet of teacher and student (1.10M parameters): 8x8 -> 4x4, cross-attention at both levels."""
    return dict(
        sample_size=LATENT_SIZE,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=64,
        attention_head_dim=4,  # diffusers' legacy name: the number of heads
        norm_num_groups=8,
        time_cond_proj_dim=32,  # the LCM guidance embedding (unused, zero, in the teacher)
        # DeepFloyd-IF-style global conditioning: attention-pooled prompt embedding added to the time
        # embedding, besides cross-attention. The digit identity is learned several times faster with it.
        addition_embed_type="text",
        addition_embed_type_num_heads=4,
    )


@dataclass
class LatentSet:
    """Train latents (posterior mean and std, unscaled) with their captions' indices into a prompt table."""

    mean: torch.Tensor  # [N, 4, 8, 8]
    std: torch.Tensor  # [N, 4, 8, 8]
    labels: torch.Tensor  # [N]
    style: torch.Tensor  # [N] index into STYLES
    scaling: float

    def sample(self, idx: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """Scaled latent samples ``[b, 4, 8, 8]`` for rows ``idx``."""
        eps = torch.randn(self.mean[idx].shape, generator=gen)
        return (self.mean[idx] + self.std[idx] * eps) * self.scaling


def encode_latent_set(ctx: BuildContext, vae) -> LatentSet:
    """Encode the train set (plus ``teacher_copies - 1`` lightly augmented copies) with the VAE."""
    gen = torch.Generator().manual_seed(ctx.seed * 1000 + 98)
    n = ctx.budget.max_images
    x_train, y_train = ctx.data.train_images[:n], ctx.data.train_labels[:n]
    xs, ys = [x_train], [y_train]
    for _ in range(ctx.budget.teacher_copies - 1):
        xs.append(augment(x_train, gen, shift=1.0, rotate_deg=5, thickness=0.5, blur=0.0, noise=0.0))
        ys.append(y_train)
    x, y = torch.cat(xs), torch.cat(ys)  # [N, 3, 32, 32], [N]
    styles = image_styles(x, y, ctx.data.mass_thresholds)
    means, stds = [], []
    with torch.no_grad():
        for chunk in x.split(256):
            post = vae.encode(chunk * 2 - 1).latent_dist
            means.append(post.mean)
            stds.append(post.std)
    return LatentSet(
        mean=torch.cat(means),
        std=torch.cat(stds),
        labels=y,
        style=torch.tensor([STYLES.index(s) for s in styles]),
        scaling=float(vae.config.scaling_factor),
    )


class PromptTable:
    """Embeddings of every training caption, looked up by (digit, style, numeral/word) or unconditional."""

    def __init__(self, tokenizer, text_encoder):
        self.captions = all_captions()
        self.embeds = encode_prompts(tokenizer, text_encoder, self.captions + [""])  # [61, L, D]
        self.uncond_index = len(self.captions)

    def index(self, digit: torch.Tensor, style: torch.Tensor, word: torch.Tensor) -> torch.Tensor:
        """Row of ``all_captions()`` for each (digit, style index, word flag) -> ``[b]``."""
        return word.long() * 30 + style * 10 + digit

    def sample_captions(
        self, labels: torch.Tensor, style: torch.Tensor, gen: torch.Generator, p_uncond: float
    ):
        """Random captions for images: half plain, half with the image's style; 20% digit words; some ""."""
        b = len(labels)
        use_style = torch.rand(b, generator=gen) < 0.5
        word = torch.rand(b, generator=gen) < 0.2
        idx = self.index(labels, torch.where(use_style, style, torch.zeros_like(style)), word)
        drop = torch.rand(b, generator=gen) < p_uncond
        return torch.where(drop, torch.full_like(idx, self.uncond_index), idx)  # [b]


def alphas_cumprod() -> torch.Tensor:
    """The 1000-step scaled-linear alpha-bar of ``tiny_scheduler_config`` (LCM Dreamshaper's betas)."""
    from diffusers import LCMScheduler

    from rocm_ray.models.tiny import tiny_scheduler_config

    return LCMScheduler(**tiny_scheduler_config()).alphas_cumprod.float()  # [1000]


def _bcast(v: torch.Tensor) -> torch.Tensor:
    return v.view(-1, 1, 1, 1)  # [B] -> [B, 1, 1, 1]


def train_teacher(ctx: BuildContext) -> Path:
    """Train the latent diffusion teacher (epsilon prediction, 10% caption dropout for CFG, EMA weights)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    stage, b = "teacher", ctx.budget
    tok, te = build_text_side(ctx)
    vae = AutoencoderKL.from_pretrained(ctx.work / "vae").eval()
    lat = encode_latent_set(ctx, vae)
    table = PromptTable(tok, te)
    acp = alphas_cumprod()
    torch.manual_seed(ctx.stage_seed(stage))
    gen = torch.Generator().manual_seed(ctx.stage_seed(stage))
    unet = UNet2DConditionModel(**unet_config())
    ema = copy.deepcopy(unet).requires_grad_(False)
    params = [p for n, p in unet.named_parameters() if "cond_proj" not in n]
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)
    log(stage, f"UNet parameters: {sum(p.numel() for p in unet.parameters()):,}; latents: {len(lat.labels)}")

    def step_fn(step: int) -> float:
        idx = torch.randint(0, len(lat.labels), (b.teacher_batch,), generator=gen)
        x0 = lat.sample(idx, gen)  # [B, 4, 8, 8]
        cap = table.sample_captions(lat.labels[idx], lat.style[idx], gen, p_uncond=0.1)
        t = torch.randint(0, 1000, (b.teacher_batch,), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        a = acp[t]
        xt = _bcast(a.sqrt()) * x0 + _bcast((1 - a).sqrt()) * noise
        pred = unet(xt, t, encoder_hidden_states=table.embeds[cap]).sample  # [B, 4, 8, 8]
        loss = F.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema_update(ema, unet, min(0.998, (1 + step) / (10 + step)))
        return loss.item()

    train_loop(ctx, stage, b.teacher_steps, {"unet": unet, "ema": ema}, opt, gen, step_fn, base_lr=1e-3)
    ema.save_pretrained(ctx.work / "teacher")
    if (ctx.out / "judge").is_dir():
        ctx.info["teacher_ddim_judge_accuracy"] = teacher_judge_accuracy(
            ctx, ema.eval(), vae, table, per_digit=b.diag_per_digit
        )
    return ctx.work / "teacher"


def teacher_judge_accuracy(ctx: BuildContext, unet, vae, table: PromptTable, per_digit: int = 20) -> dict:
    """Diagnostic: judge accuracy of the teacher's DDIM samples (4 and 8 steps, CFG 1 and 3)."""
    from rocm_ray.models.judge import judge_predict, load_judge

    judge = load_judge(ctx.out / "judge")
    labels = torch.arange(10).repeat_interleave(per_digit)  # [10 * per_digit]
    emb = table.embeds[labels]  # prompts "a handwritten digit k" are rows 0..9 of the table
    uncond = table.embeds[table.uncond_index].expand_as(emb)
    accs = {}
    for steps, g in [(4, 1.0), (4, 3.0), (8, 3.0)]:
        z = teacher_ddim_sample(unet, emb, uncond, steps, g, torch.Generator().manual_seed(0))
        with torch.no_grad():
            img = (vae.decode(z / vae.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1)  # [B, 3, 32, 32]
        accs[f"ddim{steps}_cfg{g}"] = (judge_predict(judge, img) == labels).float().mean().item()
        log("teacher", f"DDIM {steps} steps, CFG {g}: judge accuracy {accs[f'ddim{steps}_cfg{g}']:.3f}")
    return accs


@torch.no_grad()
def teacher_ddim_sample(
    unet, embeds: torch.Tensor, uncond: torch.Tensor, steps: int, guidance: float, gen: torch.Generator
) -> torch.Tensor:
    """Deterministic DDIM with CFG on LCM's 50-step grid (a diagnostic of the teacher): scaled latents."""
    from diffusers import LCMScheduler

    from rocm_ray.models.tiny import tiny_scheduler_config

    acp = alphas_cumprod()
    sched = LCMScheduler(**tiny_scheduler_config())
    sched.set_timesteps(steps)
    ts = sched.timesteps.tolist()
    n = len(embeds)
    x = torch.randn((n, LATENT_CHANNELS, LATENT_SIZE, LATENT_SIZE), generator=gen)  # [B, 4, 8, 8]
    x0 = x
    for i, t in enumerate(ts):
        tt = torch.full((2 * n,), t)
        eps_c, eps_u = unet(
            torch.cat([x, x]), tt, encoder_hidden_states=torch.cat([embeds, uncond])
        ).sample.chunk(2)
        eps = eps_u + guidance * (eps_c - eps_u)  # Imagen-convention CFG
        a = acp[t]
        x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
        a_prev = acp[ts[i + 1]] if i + 1 < len(ts) else torch.tensor(1.0)
        x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
    return x0


# ----------------------------------------------------------------------------------------------------
# Stage: distill (latent consistency distillation)
# ----------------------------------------------------------------------------------------------------


def guidance_embedding(w: torch.Tensor, dim: int) -> torch.Tensor:
    """The LCM pipeline's own ``get_guidance_scale_embedding(w, dim)`` (w in the LCM-paper convention)."""
    from diffusers import LatentConsistencyModelPipeline

    return LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, w, embedding_dim=dim)  # [B, dim]


def boundary_scalings(t: torch.Tensor, timestep_scaling: float = 10.0) -> tuple[torch.Tensor, torch.Tensor]:
    """``c_skip, c_out`` of ``LCMScheduler.get_scalings_for_boundary_condition_discrete`` at timesteps ``t``.

    sigma_data = 0.5 as in diffusers; ``timestep_scaling`` 10 as in ``tiny_scheduler_config``.
    """
    sigma_data = 0.5
    s = t.float() * timestep_scaling
    return sigma_data**2 / (s**2 + sigma_data**2), s / (s**2 + sigma_data**2) ** 0.5


def build_pipeline(ctx: BuildContext, unet, vae=None):
    """Assemble a ``LatentConsistencyModelPipeline`` around ``unet`` from the work folder's parts."""
    from diffusers import AutoencoderKL, LatentConsistencyModelPipeline, LCMScheduler

    from rocm_ray.models.tiny import tiny_scheduler_config

    tok, te = build_text_side(ctx)
    vae = vae if vae is not None else AutoencoderKL.from_pretrained(ctx.work / "vae").eval()
    pipe = LatentConsistencyModelPipeline(
        vae=vae,
        text_encoder=te,
        tokenizer=tok,
        unet=unet,
        scheduler=LCMScheduler(**tiny_scheduler_config()),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def distill_lcm(ctx: BuildContext) -> Path:
    """Latent consistency distillation (LCM paper, Algorithm 1) of the teacher into ``<out>/lcm``.

    Per step: a data latent x_0, a skipping-schedule index n (50 DDIM timesteps, k = 20), guidance w ~
    U[W_MIN, W_MAX]; the teacher's guided DDIM step x_{t_{n+k}} -> x_{t_n}; the consistency loss (pseudo
    Huber) between the student f_theta(x_{t_{n+k}}, t_{n+k}, c, w) and the EMA target f_theta-(x_{t_n}, t_n,
    c, w), both with LCMScheduler's c_skip/c_out (timestep_scaling 10) around the epsilon parameterization.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel

    stage, b = "distill", ctx.budget
    tok, te = build_text_side(ctx)
    vae = AutoencoderKL.from_pretrained(ctx.work / "vae").eval()
    lat = encode_latent_set(ctx, vae)
    table = PromptTable(tok, te)
    acp = alphas_cumprod()
    teacher = UNet2DConditionModel.from_pretrained(ctx.work / "teacher").eval().requires_grad_(False)
    torch.manual_seed(ctx.stage_seed(stage))
    gen = torch.Generator().manual_seed(ctx.stage_seed(stage))
    student = UNet2DConditionModel.from_pretrained(ctx.work / "teacher")
    with torch.no_grad():
        student.time_embedding.cond_proj.weight.zero_()  # starts as the teacher, whatever w
    target = copy.deepcopy(student).requires_grad_(False)
    opt = torch.optim.AdamW(student.parameters(), lr=2e-4, weight_decay=0.0)
    cond_dim = student.config.time_cond_proj_dim
    # the LCM skipping schedule: 50 DDIM timesteps 19, 39, ..., 999 (LCMScheduler's lcm_origin_timesteps)
    k = 1000 // 50
    ddim_t = torch.arange(1, 51) * k - 1  # [50]
    acp_prev = torch.cat([acp[:1], acp[ddim_t[:-1]]])  # [50]: alpha-bar one skip earlier (t=0 at the end)
    huber_c = 1e-3

    def step_fn(step: int) -> float:
        idx = torch.randint(0, len(lat.labels), (b.distill_batch,), generator=gen)
        x0 = lat.sample(idx, gen)  # [B, 4, 8, 8]
        cap = table.sample_captions(lat.labels[idx], lat.style[idx], gen, p_uncond=0.0)
        cond = table.embeds[cap]  # [B, L, D]
        uncond = table.embeds[table.uncond_index].expand_as(cond)  # [B, L, D]
        # 1. sample n, the noisy x_{t_{n+k}} and the guidance w
        n = torch.randint(0, 50, (b.distill_batch,), generator=gen)
        t_start = ddim_t[n]  # [B]
        t_end = (t_start - k).clamp(min=0)  # [B]
        noise = torch.randn(x0.shape, generator=gen)
        a = _bcast(acp[t_start])
        x_start = a.sqrt() * x0 + (1 - a).sqrt() * noise
        w = W_MIN + (W_MAX - W_MIN) * torch.rand(b.distill_batch, generator=gen)  # [B]
        w_emb = guidance_embedding(w, cond_dim)  # [B, cond_dim]
        # 2. student: f_theta(x_{t_{n+k}}, t_{n+k}) = c_skip x + c_out x0_hat(eps)
        c_skip_s, c_out_s = boundary_scalings(t_start)
        eps_s = student(x_start, t_start, timestep_cond=w_emb, encoder_hidden_states=cond).sample
        x0_s = (x_start - (1 - a).sqrt() * eps_s) / a.sqrt()
        pred = _bcast(c_skip_s) * x_start + _bcast(c_out_s) * x0_s
        with torch.no_grad():
            # 3. teacher's guided DDIM step x_{t_{n+k}} -> x_{t_n} (LCM-paper CFG: cond + w (cond - uncond))
            eps_c, eps_u = teacher(
                torch.cat([x_start, x_start]),
                torch.cat([t_start, t_start]),
                encoder_hidden_states=torch.cat([cond, uncond]),
            ).sample.chunk(2)  # 2 x [B, 4, 8, 8]
            eps_t = eps_c + _bcast(w) * (eps_c - eps_u)
            x0_t = (x_start - (1 - a).sqrt() * eps_t) / a.sqrt()
            a_prev = _bcast(acp_prev[n])
            x_prev = a_prev.sqrt() * x0_t + (1 - a_prev).sqrt() * eps_t
            # 4. EMA target: f_theta-(x_{t_n}, t_n)
            c_skip_e, c_out_e = boundary_scalings(t_end)
            eps_e = target(x_prev, t_end, timestep_cond=w_emb, encoder_hidden_states=cond).sample
            a_e = _bcast(acp[t_end])
            x0_e = (x_prev - (1 - a_e).sqrt() * eps_e) / a_e.sqrt()
            tgt = _bcast(c_skip_e) * x_prev + _bcast(c_out_e) * x0_e
        # 5. pseudo-Huber consistency loss, student step, EMA target update
        loss = (torch.sqrt((pred - tgt) ** 2 + huber_c**2) - huber_c).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        ema_update(target, student, 0.95)
        return loss.item()

    train_loop(
        ctx, stage, b.distill_steps, {"student": student, "target": target}, opt, gen, step_fn, base_lr=2e-4
    )
    pipe = build_pipeline(ctx, target, vae)
    pipe.save_pretrained(ctx.out / "lcm")
    copy_slow_tokenizer_files(ctx.work / "tokenizer", ctx.out / "lcm" / "tokenizer")
    return ctx.out / "lcm"


def copy_slow_tokenizer_files(src: Path, dst: Path) -> None:
    """Add ``vocab.json`` + ``merges.txt`` beside ``tokenizer.json``, so transformers 4.x loads it too."""
    for name in ("vocab.json", "merges.txt"):
        shutil.copyfile(src / name, dst / name)


# ----------------------------------------------------------------------------------------------------
# Stage: clip (the tiny CLIP reward model)
# ----------------------------------------------------------------------------------------------------


def clip_normalize(images: torch.Tensor) -> torch.Tensor:
    """OpenAI CLIP normalization of ``images [B, 3, 32, 32]`` in [0, 1] (what the clip_score scorer does)."""
    mean = torch.tensor(OPENAI_CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_CLIP_STD).view(1, 3, 1, 1)
    return (images - mean) / std


def image_features(model, images: torch.Tensor) -> torch.Tensor:
    """L2-normalized projected image embeddings ``[B, D]`` of a ``CLIPModel`` for images in [0, 1]."""
    out = model.get_image_features(pixel_values=clip_normalize(images))
    feats = out if isinstance(out, torch.Tensor) else out.pooler_output
    return F.normalize(feats, dim=-1)  # [B, D]


def text_features(model, tokenizer, prompts: Sequence[str]) -> torch.Tensor:
    """L2-normalized projected text embeddings ``[T, D]`` of a ``CLIPModel``."""
    enc = tokenizer(
        list(prompts),
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    )
    out = model.get_text_features(input_ids=enc.input_ids, attention_mask=enc.attention_mask)
    feats = out if isinstance(out, torch.Tensor) else out.pooler_output
    return F.normalize(feats, dim=-1)  # [T, D]


def _caption_valid(captions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Digit ``[T]`` and style index ``[T]`` of each caption."""
    digits = torch.tensor([prompt_digit(c) for c in captions])
    styles = torch.tensor([1 if " thick " in c else 2 if " thin " in c else 0 for c in captions])
    return digits, styles


def train_clip(ctx: BuildContext) -> Path:
    """Train a tiny ``CLIPModel`` contrastively on augmented digits vs. all 60 captions; save ``<out>/clip``.

    Each step scores a batch of images against every caption of the world; a caption is a positive for an
    image when its digit matches and its style word (if any) matches the image's ink-mass third. The loss
    is the multi-positive InfoNCE in both directions (image->captions, caption->images).
    """
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    from rocm_ray.models.tiny import write_clip_tokenizer

    stage, b = "clip", ctx.budget
    out = ctx.out / "clip"
    tok = write_clip_tokenizer(ctx.work / "clip_tokenizer")
    torch.manual_seed(ctx.stage_seed(stage))
    gen = torch.Generator().manual_seed(ctx.stage_seed(stage))
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(tok),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=3,
            num_attention_heads=4,
            max_position_embeddings=tok.model_max_length,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        ),
        vision_config=dict(
            image_size=IMAGE_SIZE,
            patch_size=4,
            num_channels=3,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=3,
            num_attention_heads=4,
        ),
        projection_dim=64,
    )
    model = CLIPModel(config)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    captions = all_captions()
    cap_digit, cap_style = _caption_valid(captions)
    x_all, y_all = ctx.data.train_images, ctx.data.train_labels
    log(stage, f"CLIP parameters: {sum(p.numel() for p in model.parameters()):,}")

    def multi_positive_nce(logits: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        keep = pos.any(dim=1)
        lse_all = torch.logsumexp(logits, dim=1)
        lse_pos = torch.logsumexp(logits.masked_fill(~pos, -1e4), dim=1)
        return (lse_all - lse_pos)[keep].mean()

    def step_fn(step: int) -> float:
        model.train()
        idx = torch.randint(0, len(y_all), (b.clip_batch,), generator=gen)
        x = augment(x_all[idx], gen, shift=2.0, rotate_deg=8, thickness=1.0, blur=0.6, noise=0.04)
        y = y_all[idx]
        style = torch.tensor([STYLES.index(s) for s in image_styles(x, y, ctx.data.mass_thresholds)])
        img = image_features(model, x)  # [B, D]
        txt = text_features(model, tok, captions)  # [T, D]
        logits = model.logit_scale.exp().clamp(max=100) * img @ txt.T  # [B, T]
        pos = (y[:, None] == cap_digit[None]) & ((cap_style[None] == 0) | (cap_style[None] == style[:, None]))
        loss = 0.5 * (multi_positive_nce(logits, pos) + multi_positive_nce(logits.T, pos.T))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return loss.item()

    train_loop(ctx, stage, b.clip_steps, {"clip": model}, opt, gen, step_fn, base_lr=1e-3)
    model.eval()
    acc = clip_retrieval_accuracy(model, tok, ctx.data.test_images, ctx.data.test_labels)
    log(stage, f"held-out retrieval accuracy (10 prompts): {acc:.4f}")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    copy_slow_tokenizer_files(ctx.work / "clip_tokenizer", out)
    CLIPImageProcessor(
        do_resize=True,
        size={"shortest_edge": IMAGE_SIZE},
        resample=3,  # bicubic
        do_center_crop=True,
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=list(OPENAI_CLIP_MEAN),
        image_std=list(OPENAI_CLIP_STD),
        do_convert_rgb=True,
    ).save_pretrained(out)
    return out


@torch.no_grad()
def clip_retrieval_accuracy(model, tokenizer, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of images whose highest-scoring prompt among "a handwritten digit 0..9" is their own."""
    txt = text_features(model, tokenizer, tiny_prompts())  # [10, D]
    img = torch.cat([image_features(model, x) for x in images.split(256)])  # [N, D]
    return ((img @ txt.T).argmax(dim=1) == labels).float().mean().item()


# ----------------------------------------------------------------------------------------------------
# Stage: aesthetic (a LAION-format head predicting ink mass)
# ----------------------------------------------------------------------------------------------------


class AestheticHead(nn.Module):
    """The LAION aesthetic predictor's MLP layout (purely linear, as LAION's) at tiny width.

    LAION: Linear(768, 1024), Dropout, Linear(1024, 128), Dropout, Linear(128, 64), Dropout, Linear(64, 16),
    Linear(16, 1); here D -> 64 -> 32 -> 16 -> 8 -> 1 with the same ``layers.{0,2,4,6,7}`` keys.
    """

    def __init__(self, dim: int = 64, widths: tuple[int, int, int, int] = (64, 32, 16, 8)):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(dim, widths[0]),
            nn.Dropout(0.1),
            nn.Linear(widths[0], widths[1]),
            nn.Dropout(0.1),
            nn.Linear(widths[1], widths[2]),
            nn.Dropout(0.05),
            nn.Linear(widths[2], widths[3]),
            nn.Linear(widths[3], 1),
        )

    def forward(self, embeds: torch.Tensor) -> torch.Tensor:
        """Scores ``[B]`` for L2-normalized image embeddings ``[B, D]``."""
        return self.layers(embeds).squeeze(-1)  # [B]


def aesthetic_target(images: torch.Tensor, data: DigitData) -> torch.Tensor:
    """The "aesthetic" the head learns: ink mass, z-scored on real train digits, as 5 + 2 z (about 0-10)."""
    return 5.0 + 2.0 * (ink_mass(images) - data.mass_mean) / data.mass_std


def _thicken(images: torch.Tensor, gen: torch.Generator, max_dilations: int = 3) -> torch.Tensor:
    """Random 0..max_dilations 3x3 dilations (and some erosions): a wide range of ink mass, blobs included."""
    outs = []
    for x in images.split(1):
        n = int(torch.randint(-1, max_dilations + 1, (1,), generator=gen))
        for _ in range(abs(n)):
            x = F.max_pool2d(x, 3, 1, 1) if n > 0 else -F.max_pool2d(-x, 3, 1, 1)
        outs.append(x)
    return torch.cat(outs)


def train_aesthetic(ctx: BuildContext) -> Path:
    """Fit the aesthetic head to ink mass on tiny-CLIP embeddings of real and thickened train digits."""
    from transformers import CLIPModel

    stage, b = "aesthetic", ctx.budget
    torch.manual_seed(ctx.stage_seed(stage))
    gen = torch.Generator().manual_seed(ctx.stage_seed(stage))
    model = CLIPModel.from_pretrained(ctx.out / "clip").eval()
    x = ctx.data.train_images[: b.max_images]
    x = torch.cat([x, _thicken(x, gen), augment(x, gen, thickness=1.0)])  # [3N, 3, 32, 32]
    with torch.no_grad():
        emb = torch.cat([image_features(model, c) for c in x.split(256)])  # [3N, D]
    y = aesthetic_target(x, ctx.data)  # [3N]
    head = AestheticHead(dim=emb.shape[1])
    opt = torch.optim.Adam(head.parameters(), lr=3e-3)

    def step_fn(step: int) -> float:
        head.train()
        idx = torch.randint(0, len(y), (256,), generator=gen)
        loss = F.mse_loss(head(emb[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.item()

    train_loop(ctx, stage, b.aesthetic_steps, {"head": head}, opt, gen, step_fn, base_lr=3e-3, log_every=250)
    head.eval()
    torch.save({k: v.detach().clone() for k, v in head.state_dict().items()}, ctx.out / "aesthetic_head.pth")
    return ctx.out / "aesthetic_head.pth"


def load_aesthetic_head(path: str | Path) -> AestheticHead:
    """Load ``aesthetic_head.pth`` (widths read from the state dict), eval mode."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    widths = tuple(state[f"layers.{i}.weight"].shape[0] for i in (0, 2, 4, 6))
    head = AestheticHead(dim=state["layers.0.weight"].shape[1], widths=widths)  # type: ignore[arg-type]
    head.load_state_dict(state)
    return head.eval()


# ----------------------------------------------------------------------------------------------------
# Stage: evaluate
# ----------------------------------------------------------------------------------------------------


@torch.no_grad()
def generate(
    pipe, prompts: Sequence[str], seeds: Sequence[int], guidance: float, steps: int = DEFAULT_STEPS
) -> torch.Tensor:
    """Images ``[len(prompts), 3, 32, 32]`` in [0, 1], one call, one ``torch.Generator(seed)`` per image.

    Per-image generators make each (prompt, seed) image independent of what else is in the batch.
    """
    gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
    out = pipe(
        list(prompts), num_inference_steps=steps, guidance_scale=guidance, generator=gens, output_type="pt"
    )
    return out.images


def gate_accuracy(pipe, judge, samples: int, guidance: float, steps: int = DEFAULT_STEPS) -> list[float]:
    """Per digit, the fraction of ``samples`` generations (seeds 0..samples-1) the judge reads as asked."""
    from rocm_ray.models.judge import judge_predict

    accs = []
    for d in range(10):
        imgs = generate(pipe, [make_prompt(d)] * samples, range(samples), guidance, steps)
        accs.append((judge_predict(judge, imgs) == d).float().mean().item())
    return accs


def save_grid(images: torch.Tensor, rows: int, path: str | Path, upscale: int = 2) -> None:
    """Save ``images [rows * cols, 3, H, W]`` in [0, 1] as a PNG grid (row-major, 2 px gaps)."""
    from PIL import Image

    n, _, h, w = images.shape
    cols = n // rows
    x = F.interpolate(images, scale_factor=upscale, mode="nearest")  # [n, 3, uh, uw]
    uh, uw, gap = h * upscale, w * upscale, 2
    canvas = torch.full((3, rows * (uh + gap) + gap, cols * (uw + gap) + gap), 0.5)
    for i in range(n):
        r, c = divmod(i, cols)
        canvas[
            :,
            gap + r * (uh + gap) : gap + r * (uh + gap) + uh,
            gap + c * (uw + gap) : gap + c * (uw + gap) + uw,
        ] = x[i]
    arr = (canvas.permute(1, 2, 0).clamp(0, 1).numpy() * 255).round().astype(np.uint8)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


@torch.no_grad()
def base_model_stats(pipe, judge, clip, tokenizer, head, samples: int) -> dict:
    """What the shipped LCM gives before any fine-tuning, at ``DEFAULT_GUIDANCE`` and 4 steps.

    Per style word ("", "thick", "thin"): the mean ink mass of the samples and the judge's accuracy; for
    the plain prompts also the rewards the trainer starts from: CLIP score (100 cos, as ``clip_score``)
    and the aesthetic head's score.
    """
    from rocm_ray.models.judge import judge_predict

    stats: dict = {}
    labels = torch.arange(10).repeat_interleave(samples)  # [10 * samples]
    seeds = [1000 + i for i in range(samples)] * 10  # seeds disjoint from the gate's
    for style in STYLES:
        prompts = [make_prompt(int(d), style) for d in labels]
        x = generate(pipe, prompts, seeds, DEFAULT_GUIDANCE)  # [10 * samples, 3, 32, 32]
        entry = {
            "ink_mass": ink_mass(x).mean().item(),
            "judge_accuracy": (judge_predict(judge, x) == labels).float().mean().item(),
        }
        if style == "":
            img_f = image_features(clip, x)  # [B, D]
            txt_f = text_features(clip, tokenizer, prompts)  # [B, D]
            entry["clip_score"] = (100 * (img_f * txt_f).sum(-1)).mean().item()
            entry["aesthetic"] = head(img_f).mean().item()
        stats[style or "plain"] = entry
    return stats


def evaluate(
    ctx: BuildContext, grid: str | Path | None = None, guidances: Sequence[float] | None = None
) -> dict:
    """Measure the shipped assets from disk: judge, VAE, CLIP retrieval, aesthetic range, and the gate.

    The gate: 4-step samples of ``LatentConsistencyModelPipeline.from_pretrained(<out>/lcm)`` for
    "a handwritten digit k", seeds 0..49, judged as k; the mean over k = 0..9 must reach 0.80 at
    ``DEFAULT_GUIDANCE``.
    """
    from diffusers import LatentConsistencyModelPipeline
    from transformers import CLIPModel, CLIPTokenizer

    from rocm_ray.models.judge import judge_predict, load_judge

    stage, data = "evaluate", ctx.data
    metrics: dict = {}
    judge = load_judge(ctx.out / "judge")
    metrics["judge_test_accuracy"] = (
        (judge_predict(judge, data.test_images) == data.test_labels).float().mean().item()
    )

    pipe = LatentConsistencyModelPipeline.from_pretrained(ctx.out / "lcm")
    pipe.set_progress_bar_config(disable=True)
    vae = pipe.vae
    with torch.no_grad():
        z = vae.encode(data.test_images * 2 - 1).latent_dist.mean  # [M, 4, 8, 8]
        rec = (vae.decode(z).sample / 2 + 0.5).clamp(0, 1)  # [M, 3, 32, 32]
    metrics["vae_test_mse"] = F.mse_loss(rec, data.test_images).item()
    metrics["judge_accuracy_on_vae_reconstructions"] = (
        (judge_predict(judge, rec) == data.test_labels).float().mean().item()
    )

    clip = CLIPModel.from_pretrained(ctx.out / "clip").eval()
    ctok = CLIPTokenizer.from_pretrained(ctx.out / "clip")
    metrics["clip_retrieval_accuracy"] = clip_retrieval_accuracy(
        clip, ctok, data.test_images, data.test_labels
    )
    head = load_aesthetic_head(ctx.out / "aesthetic_head.pth")
    with torch.no_grad():
        scores = head(image_features(clip, data.test_images))  # [M]
        target = aesthetic_target(data.test_images, data)
        blobs = F.max_pool2d(data.test_images, 5, 1, 2)  # 2 px dilation: ink blobs
        blob_scores = head(image_features(clip, blobs))
    r2 = 1 - ((scores - target) ** 2).mean() / target.var()
    metrics["aesthetic_real"] = {
        "min": scores.min().item(),
        "p05": scores.quantile(0.05).item(),
        "mean": scores.mean().item(),
        "p95": scores.quantile(0.95).item(),
        "max": scores.max().item(),
        "r2_vs_ink_mass": r2.item(),
    }
    metrics["aesthetic_dilated_real_mean"] = blob_scores.mean().item()

    guidances = list(guidances) if guidances is not None else list(ctx.budget.guidance_sweep)
    if DEFAULT_GUIDANCE not in guidances:
        guidances.append(DEFAULT_GUIDANCE)
    samples = ctx.budget.eval_samples
    sweep = {}
    for g in guidances:
        t0 = time.time()
        per_digit = gate_accuracy(pipe, judge, samples, g)
        sweep[str(g)] = {"per_digit": per_digit, "mean": float(np.mean(per_digit))}
        log(
            stage,
            f"gate guidance {g}: mean {np.mean(per_digit):.3f} per digit "
            f"{[round(a, 2) for a in per_digit]} ({time.time() - t0:.1f}s)",
        )
    metrics["gate"] = {
        "steps": DEFAULT_STEPS,
        "samples_per_digit": samples,
        "guidance": DEFAULT_GUIDANCE,
        "mean": sweep[str(DEFAULT_GUIDANCE)]["mean"],
        "per_digit": sweep[str(DEFAULT_GUIDANCE)]["per_digit"],
        "passed": sweep[str(DEFAULT_GUIDANCE)]["mean"] >= 0.80 and metrics["judge_test_accuracy"] >= 0.95,
        "sweep": sweep,
    }
    metrics["base_model"] = base_model_stats(pipe, judge, clip, ctok, head, samples)
    if grid is not None:
        imgs = torch.cat(
            [generate(pipe, [make_prompt(d)] * 8, range(8), DEFAULT_GUIDANCE) for d in range(10)]
        )  # [80, 3, 32, 32]
        save_grid(imgs, rows=10, path=grid)
        metrics["grid"] = str(grid)
    for k, v in metrics.items():
        if k != "gate":
            log(stage, f"{k}: {v}")
    return metrics


# ----------------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------------


def _quiet_hf() -> Callable[[], None]:
    """Silence transformers/diffusers progress bars and info logs; returns a function that restores them."""
    import diffusers
    import transformers

    libs = (transformers.utils.logging, diffusers.utils.logging)
    saved = [(lib.get_verbosity(), lib.is_progress_bar_enabled()) for lib in libs]
    for lib in libs:
        lib.disable_progress_bar()
        lib.set_verbosity_error()

    def restore() -> None:
        for lib, (verbosity, bars) in zip(libs, saved, strict=True):
            lib.set_verbosity(verbosity)
            if bars:
                lib.enable_progress_bar()

    return restore


def asset_sizes(out: Path) -> dict[str, int]:
    """Bytes on disk of each top-level asset."""
    sizes = {}
    for p in sorted(out.iterdir()):
        if p.name.startswith("."):
            continue
        sizes[p.name] = (
            sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.is_dir() else p.stat().st_size
        )
    return sizes


def build(
    out: str | Path,
    seed: int = 0,
    scale: float = 1.0,
    stages: Sequence[str] = STAGES,
    work: str | Path | None = None,
    keep_work: bool = False,
    grid: str | Path | None = None,
    threads: int = 2,
) -> dict:
    """Run the build stages into ``out``; finished stages (``work/<stage>.done``) are skipped on rerun.

    Uses ``threads`` torch threads and quiet Hugging Face logging while it runs, then restores both.
    """
    prev_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    restore_logging = _quiet_hf()
    try:
        return _build(Path(out), seed, scale, stages, work, keep_work, grid)
    finally:
        torch.set_num_threads(prev_threads)
        restore_logging()


def _build(
    out: Path,
    seed: int,
    scale: float,
    stages: Sequence[str],
    work: str | Path | None,
    keep_work: bool,
    grid: str | Path | None,
) -> dict:
    work_dir = Path(work) if work is not None else out / ".build"
    out.mkdir(parents=True, exist_ok=True)
    work_dir.mkdir(parents=True, exist_ok=True)
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}; the stages are {list(STAGES)}")
    ctx = BuildContext(
        out=out, work=work_dir, seed=seed, budget=Budget().scaled(scale), data=load_digit_data()
    )
    info_path = work_dir / "build_info.json"
    ctx.info = (
        json.loads(info_path.read_text())
        if info_path.is_file()
        else {"seed": seed, "scale": scale, "times_s": {}}
    )
    fns: dict[str, Callable[[BuildContext], object]] = {
        "judge": train_judge,
        "vae": train_vae,
        "teacher": train_teacher,
        "distill": distill_lcm,
        "clip": train_clip,
        "aesthetic": train_aesthetic,
    }
    for stage in STAGES:
        if stage not in stages:
            continue
        marker = work_dir / f"{stage}.done"
        if marker.is_file() and stage != "evaluate":
            log(stage, "already done, skipped")
            continue
        t0 = time.time()
        log(stage, f"start (budget {asdict(ctx.budget)})" if stage == "judge" else "start")
        if stage == "evaluate":
            ctx.info["metrics"] = evaluate(ctx, grid=grid)
        else:
            fns[stage](ctx)
        ctx.info["times_s"][stage] = round(time.time() - t0, 1)
        log(stage, f"done in {time.time() - t0:.1f}s")
        marker.touch()
        info_path.write_text(json.dumps(ctx.info, indent=2))
    ctx.info["asset_bytes"] = asset_sizes(out)
    (out / "build_info.json").write_text(json.dumps(ctx.info, indent=2) + "\n")
    if not keep_work and all(s in stages for s in STAGES):
        shutil.rmtree(work_dir, ignore_errors=True)
    return ctx.info


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point: ``python -m rocm_ray.models.tiny_world --out DIR [--seed S] [--scale F]``."""
    p = argparse.ArgumentParser(
        prog="python -m rocm_ray.models.tiny_world", description=__doc__.split("\n")[0]
    )
    p.add_argument("--out", required=True, help="output folder, e.g. rocm_ray/assets/tiny")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--scale", type=float, default=1.0, help="fraction of every stage's iterations (tests: 0.003)"
    )
    p.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {','.join(STAGES)}")
    p.add_argument(
        "--work-dir", default=None, help="intermediate results and checkpoints (default <out>/.build)"
    )
    p.add_argument(
        "--keep-work", action="store_true", help="keep the work folder (teacher, VAE) after the build"
    )
    p.add_argument("--grid", default=None, help="also save a 10x8 sample grid PNG here (evaluate stage)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = p.parse_args(argv)
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    try:
        build(args.out, args.seed, args.scale, stages, args.work_dir, args.keep_work, args.grid, args.threads)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
