"""ImageReward: BLIP (ViT-L vision encoder + BERT text encoder with cross-attention) + an MLP head.

The official scorer (THUDM/ImageReward, ``ImageReward.score``) tokenizes the prompt with BLIP's
``bert-base-uncased`` tokenizer (``padding='max_length', max_length=35``), encodes the image with the BLIP
ViT, runs the BERT text encoder with cross-attention to the image tokens, takes the ``[CLS]`` hidden state
(768), applies the MLP head ``768 -> 1024 -> 128 -> 64 -> 16 -> 1`` (dropouts between, no activations;
keys ``mlp.layers.{0,2,4,6,7}``) and standardizes: ``(r - 0.16717362830052426) / 1.0333394966054072``.
Scores are roughly standard normal over generated images (typical -2 .. 2).

We do not import the ``image-reward`` package (it imports torchvision and breaks with transformers 5).
The BLIP towers are transformers' ``BlipVisionModel`` and ``BlipTextModel`` (the same modules as BLIP's
``med.py`` BERT, with cross-attention); ``imagereward_to_transformers`` maps ``ImageReward.pt``'s original
BLIP key names onto them (only the vision tower needs renaming; the BERT names are identical).

Preprocessing follows ImageReward's ``_transform(224)``: Resize(224, bicubic) on the shorter side,
CenterCrop(224) (torchvision's rounding), ToTensor, CLIP mean/std.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from rocm_ray.rewards.aesthetic import build_mlp_head
from rocm_ray.rewards.base import (
    check_batch,
    freeze,
    load_error,
    load_torch_file,
    locate_file,
    locate_folder,
)
from rocm_ray.rewards.hps import unwrap_state_dict
from rocm_ray.rewards.preprocess import ImagePreprocessConfig, preprocess_images

if TYPE_CHECKING:
    from transformers import BlipTextConfig, BlipVisionConfig

IMAGEREWARD_REPO = "THUDM/ImageReward"
IMAGEREWARD_FILE = "ImageReward.pt"
IMAGEREWARD_MEAN = 0.16717362830052426
IMAGEREWARD_STD = 1.0333394966054072
IMAGEREWARD_SOURCE = "ImageReward.pt (and med_config.json) from the THUDM/ImageReward Hugging Face repo"
TOKENIZER_SOURCE = "the bert-base-uncased Hugging Face repo (vocab.txt / tokenizer.json), as BLIP uses"
MAX_TEXT_LENGTH = 35

_VIT_BLOCK = {  # BLIP/timm ViT block -> transformers BlipEncoderLayer
    "norm1": "layer_norm1",
    "attn.qkv": "self_attn.qkv",
    "attn.proj": "self_attn.projection",
    "norm2": "layer_norm2",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}
_VIT = {
    "cls_token": "embeddings.class_embedding",
    "pos_embed": "embeddings.position_embedding",
    "patch_embed.proj.weight": "embeddings.patch_embedding.weight",
    "patch_embed.proj.bias": "embeddings.patch_embedding.bias",
    "norm.weight": "post_layernorm.weight",
    "norm.bias": "post_layernorm.bias",
}
_VISION_PREFIX, _TEXT_PREFIX, _MLP_PREFIX = "blip.visual_encoder.", "blip.text_encoder.", "mlp."


def imagereward_to_transformers(state_dict: Mapping[str, Tensor]) -> tuple[dict, dict, dict]:
    """Split and rename an ``ImageReward.pt`` state dict -> (BlipVisionModel, BlipTextModel, head) dicts.

    Keys outside the three used modules (``blip.vision_proj``, ``blip.text_proj``, ... which the official
    loader also ignores with ``strict=False``) and BERT's ``position_ids`` buffer are dropped.
    Unknown keys inside the vision encoder raise ``KeyError``.
    """
    vision, text, head = {}, {}, {}
    for key, value in state_dict.items():
        if key.startswith(_VISION_PREFIX):
            k = key[len(_VISION_PREFIX) :]
            if k in _VIT:
                vision[_VIT[k]] = value
                continue
            m = re.match(r"blocks\.(\d+)\.(.+)\.(weight|bias)$", k)
            if not m or m.group(2) not in _VIT_BLOCK:
                raise KeyError(f"BLIP vision key {key!r} has no transformers BlipVisionModel counterpart")
            vision[f"encoder.layers.{m.group(1)}.{_VIT_BLOCK[m.group(2)]}.{m.group(3)}"] = value
        elif key.startswith(_TEXT_PREFIX):
            k = key[len(_TEXT_PREFIX) :]
            if not k.endswith("position_ids"):
                text[k] = value  # med.py BERT and transformers' BlipTextModel share key names
        elif key.startswith(_MLP_PREFIX):
            head[key[len(_MLP_PREFIX) :]] = value
    return vision, text, head


def transformers_to_imagereward(
    vision: Mapping[str, Tensor], text: Mapping[str, Tensor], head: Mapping[str, Tensor]
) -> dict[str, Tensor]:
    """The inverse of ``imagereward_to_transformers``: write an ``ImageReward.pt``-format state dict."""
    inv_vit = {v: k for k, v in _VIT.items()}
    inv_block = {v: k for k, v in _VIT_BLOCK.items()}
    out: dict[str, Tensor] = {}
    for key, value in vision.items():
        if key in inv_vit:
            out[_VISION_PREFIX + inv_vit[key]] = value
            continue
        m = re.match(r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$", key)
        if not m:
            raise KeyError(f"transformers BLIP vision key {key!r} has no BLIP counterpart")
        out[f"{_VISION_PREFIX}blocks.{m.group(1)}.{inv_block[m.group(2)]}.{m.group(3)}"] = value
    out.update({_TEXT_PREFIX + k: v for k, v in text.items() if not k.endswith("position_ids")})
    out.update({_MLP_PREFIX + k: v for k, v in head.items()})
    return out


def _count_layers(keys, pattern: str) -> int:
    found = {int(m.group(1)) for k in keys if (m := re.match(pattern, k))}
    return max(found) + 1 if found else 0


def blip_configs_from_state_dicts(
    vision: Mapping[str, Tensor],
    text: Mapping[str, Tensor],
    med_config: Mapping[str, Any] | None = None,
    vision_heads: int | None = None,
) -> tuple[BlipVisionConfig, BlipTextConfig]:
    """Infer ``BlipVisionConfig`` and ``BlipTextConfig`` from the checkpoint's shapes.

    Sizes and layer counts come from the tensors; what shapes cannot tell (attention heads, LayerNorm
    eps) comes from ``med_config`` (BLIP's ``med_config.json``) and BLIP's ViT defaults (head dim 64,
    eps 1e-6): ViT-L/16 -> 16 heads, BERT-base -> 12 heads.
    """
    from transformers import BlipTextConfig, BlipVisionConfig

    med = dict(med_config or {})
    width = int(vision["embeddings.class_embedding"].shape[-1])
    patch = int(vision["embeddings.patch_embedding.weight"].shape[-1])
    num_pos = int(vision["embeddings.position_embedding"].shape[1])
    grid = int(round((num_pos - 1) ** 0.5))
    if grid * grid != num_pos - 1:
        raise ValueError(f"BLIP pos_embed has {num_pos} positions; expected 1 + a square number of patches")
    vision_config = BlipVisionConfig(
        hidden_size=width,
        intermediate_size=int(vision["encoder.layers.0.mlp.fc1.weight"].shape[0]),
        num_hidden_layers=_count_layers(vision, r"encoder\.layers\.(\d+)\."),
        num_attention_heads=vision_heads or max(width // 64, 1),
        image_size=grid * patch,
        patch_size=patch,
        hidden_act="gelu",
        layer_norm_eps=1e-6,
        attention_dropout=0.0,
    )
    hidden = int(text["embeddings.word_embeddings.weight"].shape[1])
    if not any(".crossattention." in k for k in text):
        raise ValueError("the BLIP text encoder has no cross-attention layers; ImageReward needs them")
    text_config = BlipTextConfig(
        vocab_size=int(text["embeddings.word_embeddings.weight"].shape[0]),
        hidden_size=hidden,
        encoder_hidden_size=int(text["encoder.layer.0.crossattention.self.key.weight"].shape[1]),
        intermediate_size=int(text["encoder.layer.0.intermediate.dense.weight"].shape[0]),
        num_hidden_layers=_count_layers(text, r"encoder\.layer\.(\d+)\."),
        num_attention_heads=int(med.get("num_attention_heads", max(hidden // 64, 1))),
        max_position_embeddings=int(text["embeddings.position_embeddings.weight"].shape[0]),
        layer_norm_eps=float(med.get("layer_norm_eps", 1e-12)),
        hidden_act=str(med.get("hidden_act", "gelu")),
        pad_token_id=int(med.get("pad_token_id", 0)),
        bos_token_id=None,
        sep_token_id=None,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        is_decoder=True,  # builds the cross-attention layers; forward runs bidirectional (is_decoder=False)
    )
    return vision_config, text_config


def _strict_load(module: nn.Module, sd: Mapping[str, Tensor], what: str) -> None:
    expected = {k: v for k, v in module.state_dict().items() if not k.endswith("position_ids")}
    missing = sorted(set(expected) - set(sd))
    extra = sorted(set(sd) - set(expected))
    if missing or extra:
        raise KeyError(f"{what}: missing {missing[:6]}, unexpected {extra[:6]}")
    bad = [
        f"{k} {tuple(sd[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items() if sd[k].shape != v.shape
    ]
    if bad:
        raise ValueError(f"{what}: shape mismatch {bad[:4]}")
    module.load_state_dict(dict(sd), strict=False)


class ImageRewardScorer(nn.Module):
    """ImageReward v1.0 score ``[B]`` (standardized; typical -2 .. 2), differentiable in the images.

    ``path``: ``ImageReward.pt`` (or a folder holding it, or ``THUDM/ImageReward`` in the HF cache; ``None``
    = the cache). ``tokenizer_path``: BLIP's ``bert-base-uncased`` tokenizer folder / hub id.
    ``med_config``: BLIP's ``med_config.json`` (path or dict) for the text encoder's head count and eps;
    looked up beside the checkpoint when not given, else BERT-base defaults.
    """

    name = "imagereward"
    differentiable = True

    def __init__(
        self,
        path: str | Path | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        *,
        tokenizer_path: str | Path = "bert-base-uncased",
        med_config: Mapping[str, Any] | str | Path | None = None,
        vision_heads: int | None = None,
        max_length: int = MAX_TEXT_LENGTH,
    ) -> None:
        super().__init__()
        from transformers import BertTokenizer
        from transformers.models.blip.modeling_blip import BlipVisionModel
        from transformers.models.blip.modeling_blip_text import BlipTextModel

        model_name = "ImageReward"
        expected = (
            f"{IMAGEREWARD_FILE}: the ImageReward state dict "
            "(blip.visual_encoder.*, blip.text_encoder.*, mlp.*)"
        )
        ckpt = locate_file(
            path,
            model=model_name,
            filename=IMAGEREWARD_FILE,
            repo_id=IMAGEREWARD_REPO,
            source=IMAGEREWARD_SOURCE,
        )
        tok_folder = locate_folder(
            tokenizer_path,
            model="ImageReward tokenizer (bert-base-uncased)",
            source=TOKENIZER_SOURCE,
            required=(("tokenizer.json", "vocab.txt"),),
        )
        try:
            self.tokenizer = BertTokenizer.from_pretrained(str(tok_folder), local_files_only=True)
        except Exception as exc:
            raise load_error(
                "ImageReward tokenizer", tok_folder, "a BERT tokenizer", TOKENIZER_SOURCE, exc
            ) from exc
        med = self._med_config(med_config, ckpt)

        raw = load_torch_file(ckpt, model=model_name, expected=expected, source=IMAGEREWARD_SOURCE)
        try:
            vision_sd, text_sd, head_sd = imagereward_to_transformers(unwrap_state_dict(raw))
            if not vision_sd or not text_sd or not head_sd:
                raise KeyError("expected blip.visual_encoder.*, blip.text_encoder.* and mlp.* keys")
            vision_config, text_config = blip_configs_from_state_dicts(vision_sd, text_sd, med, vision_heads)
            with _no_init():
                vision = BlipVisionModel(vision_config)
                text = BlipTextModel(text_config, add_pooling_layer=False)
            _strict_load(vision, vision_sd, "BLIP vision encoder")
            _strict_load(text, text_sd, "BLIP text encoder")
            self.head = build_mlp_head(head_sd)
        except (KeyError, ValueError, RuntimeError, IndexError) as exc:
            raise load_error(model_name, ckpt, expected, IMAGEREWARD_SOURCE, exc) from exc
        self.vision = freeze(vision.to(device=device, dtype=dtype))
        self.text = freeze(text.to(device=device, dtype=dtype))
        self.head = freeze(self.head.to(device=device, dtype=torch.float32))  # official: features .float()
        self.device, self.dtype = torch.device(device), dtype
        self.max_length = min(max_length, text_config.max_position_embeddings)
        self.preprocess_config = ImagePreprocessConfig.clip(vision_config.image_size, crop_offset="round")
        self.checkpoint_path = ckpt

    @staticmethod
    def _med_config(med_config: Mapping[str, Any] | str | Path | None, ckpt: Path) -> dict[str, Any]:
        if isinstance(med_config, Mapping):
            return dict(med_config)
        candidate = Path(med_config) if med_config is not None else ckpt.parent / "med_config.json"
        if candidate.is_file():
            try:
                return json.loads(candidate.read_text())
            except Exception as exc:
                raise load_error(
                    "ImageReward med_config", candidate, "a JSON BERT config", IMAGEREWARD_SOURCE, exc
                ) from exc
        if med_config is not None:
            raise FileNotFoundError(f"ImageReward med_config {candidate} does not exist")
        return {}

    def score(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        """ImageReward ``[B]``, float32, on the images' device."""
        check_batch(images, prompts)
        pixels = preprocess_images(images.to(self.device), self.preprocess_config).to(
            self.dtype
        )  # [B, 3, 224, 224]
        image_embeds = self.vision(pixel_values=pixels).last_hidden_state  # [B, 1 + P, Dv]
        tokens = self.tokenizer(
            list(prompts),
            padding="max_length",
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        ).to(self.device)
        image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=self.device)  # [B, 1 + P]
        hidden = self.text(
            input_ids=tokens.input_ids,
            attention_mask=tokens.attention_mask,
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=image_atts,
            is_decoder=False,
        ).last_hidden_state  # [B, L, Dt]
        reward = self.head(hidden[:, 0, :].float()).squeeze(-1)  # [B]
        return ((reward - IMAGEREWARD_MEAN) / IMAGEREWARD_STD).to(images.device)


def _no_init() -> contextlib.AbstractContextManager:
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # pragma: no cover
        return contextlib.nullcontext()
    return no_init_weights()
