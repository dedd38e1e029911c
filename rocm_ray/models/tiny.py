"""Tiny models built offline: a CLIP tokenizer written from a small vocabulary and a random LCM pipeline.

These are the real diffusers/transformers classes at toy sizes. Tests and ``recipes/tiny_debug.yaml``
use them; the embedded default (``rocm_ray.models.tiny_world``) trains models of the same kind.
"""

from __future__ import annotations

import json
import string
from collections.abc import Iterable
from pathlib import Path

import torch

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"

# Words of the prompts the tiny world uses; any other word falls back to characters.
DEFAULT_WORDS = (
    "a handwritten digit zero one two three four five six seven eight nine "
    "0 1 2 3 4 5 6 7 8 9 thin thick bold light dark small large centered left right top bottom "
    "photo of the number picture drawing with stroke in an and , ."
).split()


def write_clip_tokenizer(out_dir: str | Path, words: Iterable[str] = DEFAULT_WORDS, model_max_length: int = 16):
    """Write a byte-pair ``CLIPTokenizer`` (vocab.json + merges.txt) whose merges spell ``words`` whole.

    Every character of ``string.printable`` is in the vocabulary (plain and word-final), so any text
    tokenizes; the listed words become single tokens where their merges are not pre-empted by another's.
    Returns the loaded ``transformers.CLIPTokenizer``.
    """
    from transformers import CLIPTokenizer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    chars = sorted({c for c in string.ascii_lowercase + string.digits + string.punctuation})
    vocab: dict[str, int] = {}

    def add(token: str) -> None:
        if token not in vocab:
            vocab[token] = len(vocab)

    for c in chars:
        add(c)
    for c in chars:
        add(c + "</w>")
    merges: list[tuple[str, str]] = []
    for word in dict.fromkeys(w.lower() for w in words):
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        left = symbols[0]
        for right in symbols[1:]:
            if (left, right) not in merges:
                merges.append((left, right))
            left = left + right
            add(left)
    add(BOS)
    add(EOS)
    (out / "vocab.json").write_text(json.dumps(vocab, indent=0))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n")
    tok = CLIPTokenizer(
        str(out / "vocab.json"),
        str(out / "merges.txt"),
        bos_token=BOS,
        eos_token=EOS,
        unk_token=EOS,
        pad_token=EOS,
        model_max_length=model_max_length,
    )
    tok.save_pretrained(str(out))
    return tok


def tiny_scheduler_config() -> dict:
    """The LCMScheduler settings of LCM Dreamshaper v7 (scaled-linear betas, 50 original steps)."""
    return dict(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=True,
        original_inference_steps=50,
        timestep_scaling=10.0,
        prediction_type="epsilon",
    )


def build_random_pipeline(tmp_dir: str | Path, seed: int = 0, sample_size: int = 8):
    """A random-weight ``LatentConsistencyModelPipeline`` at toy size (images 2*sample_size square).

    Each component is seeded on its own (like diffusers' own pipeline tests), so the result depends on
    ``seed`` only. ``tmp_dir`` receives the tokenizer files.
    """
    from diffusers import AutoencoderKL, LatentConsistencyModelPipeline, LCMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = write_clip_tokenizer(Path(tmp_dir) / "tokenizer")
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(8, 16),
        layers_per_block=1,
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=16,
        attention_head_dim=4,
        norm_num_groups=4,
        time_cond_proj_dim=16,
    )
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(
        block_out_channels=(8, 16),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=4,
        sample_size=2 * sample_size,
    )
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            hidden_size=16,
            intermediate_size=32,
            num_attention_heads=2,
            num_hidden_layers=2,
            vocab_size=len(tokenizer),
            max_position_embeddings=tokenizer.model_max_length,
            projection_dim=16,
        )
    )
    scheduler = LCMScheduler(**tiny_scheduler_config())
    pipe = LatentConsistencyModelPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
