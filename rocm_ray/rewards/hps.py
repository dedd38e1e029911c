"""HPSv2 / HPSv2.1: open_clip ViT-H-14 fine-tuned on human preferences, rebuilt as a transformers CLIPModel.

The official scorer (``hpsv2`` package) runs a bundled open_clip: ``create_model_and_transforms('ViT-H-14')``,
``model.load_state_dict(torch.load('HPS_v2_compressed.pt')['state_dict'])``, then
``score = image_features @ text_features.T`` with both features L2-normalized (open_clip's forward
normalizes): a plain cosine, no logit scale, typically 0.20-0.35. We do not import open_clip / hpsv2
(they import torchvision): the same architecture is a ``transformers.CLIPModel`` (pre-LN ViT with
``ln_pre``, exact GELU, LayerNorm eps 1e-5, class-token pooling, EOT pooling for text, causal text
attention), and ``open_clip_to_transformers`` maps the checkpoint's open_clip key names onto it.

Preprocessing follows HPSv2's evaluation transform: ToTensor, then open_clip ``ResizeMaxSize`` (longest
side -> 224 bicubic on the tensor, zero-pad to 224x224), then CLIP mean/std. Square images (the usual
case for generated images) are simply resized to 224x224.
"""

from __future__ import annotations

import contextlib
import copy
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rocm_ray.rewards.base import (
    check_batch,
    freeze,
    load_error,
    load_torch_file,
    locate_file,
    locate_folder,
)
from rocm_ray.rewards.clip import load_clip_tokenizer
from rocm_ray.rewards.preprocess import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    ImagePreprocessConfig,
    preprocess_images,
)

if TYPE_CHECKING:
    from transformers import CLIPConfig, CLIPModel

HPS_REPO = "xswu/HPSv2"
HPS_FILES = {"v2.0": "HPS_v2_compressed.pt", "v2.1": "HPS_v2.1_compressed.pt"}
HPS_NAMES = {"v2.0": "hpsv2", "v2.1": "hpsv21"}
HPS_TOKENIZER = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"

# open_clip's model_configs/ViT-H-14.json (the architecture of both HPS checkpoints).
VIT_H_14: dict[str, Any] = {
    "embed_dim": 1024,
    "vision_cfg": {"image_size": 224, "layers": 32, "width": 1280, "head_width": 80, "patch_size": 14},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 1024, "heads": 16, "layers": 24},
}

# Buffers that some open_clip versions save and that carry no weights.
_IGNORED_OPEN_CLIP_KEYS = ("attn_mask", "visual.attn_mask")


# ----------------------------------------------------------------------------------------------
# open_clip config -> transformers CLIPConfig
# ----------------------------------------------------------------------------------------------


def clip_config_from_open_clip(
    cfg: Mapping[str, Any],
    *,
    eos_token_id: int | None = None,
    bos_token_id: int | None = None,
    pad_token_id: int | None = None,
) -> CLIPConfig:
    """An open_clip model config (``embed_dim``, ``vision_cfg``, ``text_cfg``) -> ``transformers.CLIPConfig``.

    Only the plain ``CLIP`` tower layout is supported (no layer scale, no attentional pooler, no custom
    text tower), which covers ViT-B/L/H/g open_clip models and both HPS checkpoints.
    """
    from transformers import CLIPConfig

    v, t = dict(cfg["vision_cfg"]), dict(cfg["text_cfg"])
    unsupported = [
        k
        for k in ("ls_init_value", "attentional_pool", "hf_model_name", "timm_model_name")
        if v.get(k) or t.get(k)
    ]
    if unsupported:
        raise ValueError(
            f"open_clip config options not supported by the transformers CLIP port: {unsupported}"
        )
    act = "quick_gelu" if cfg.get("quick_gelu", False) else "gelu"
    v_width, t_width = int(v["width"]), int(t["width"])
    text = {
        "vocab_size": int(t.get("vocab_size", 49408)),
        "hidden_size": t_width,
        "intermediate_size": int(t_width * float(t.get("mlp_ratio", 4.0))),
        "num_hidden_layers": int(t["layers"]),
        "num_attention_heads": int(t.get("heads", 8)),
        "max_position_embeddings": int(t.get("context_length", 77)),
        "hidden_act": act,
        "layer_norm_eps": 1e-5,
        "projection_dim": int(cfg["embed_dim"]),
    }
    for key, value in (
        ("eos_token_id", eos_token_id),
        ("bos_token_id", bos_token_id),
        ("pad_token_id", pad_token_id),
    ):
        if value is not None:
            text[key] = int(value)
    vision = {
        "hidden_size": v_width,
        "intermediate_size": int(v_width * float(v.get("mlp_ratio", 4.0))),
        "num_hidden_layers": int(v["layers"]),
        "num_attention_heads": v_width // int(v.get("head_width", 64)),
        "image_size": int(v["image_size"]),
        "patch_size": int(v["patch_size"]),
        "hidden_act": act,
        "layer_norm_eps": 1e-5,
        "projection_dim": int(cfg["embed_dim"]),
    }
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=int(cfg["embed_dim"]))


# ----------------------------------------------------------------------------------------------
# open_clip <-> transformers state-dict mapping
# ----------------------------------------------------------------------------------------------

_BLOCK = {  # open_clip residual-block key -> transformers CLIPEncoderLayer key (besides in_proj)
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "attn.out_proj": "self_attn.out_proj",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}
_VISION = {
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",
    "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "visual.ln_post.weight": "vision_model.post_layernorm.weight",
    "visual.ln_post.bias": "vision_model.post_layernorm.bias",
}
_TEXT = {
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
    "logit_scale": "logit_scale",
}
_TRANSPOSED = {"visual.proj": "visual_projection.weight", "text_projection": "text_projection.weight"}
_TOWERS = (
    ("visual.transformer.resblocks.", "vision_model.encoder.layers."),
    ("transformer.resblocks.", "text_model.encoder.layers."),
)


def unwrap_state_dict(checkpoint: Any) -> dict[str, Tensor]:
    """A training checkpoint (``{'state_dict': ...}``, maybe ``module.`` prefixes) -> a flat state dict."""
    sd = checkpoint
    for key in ("state_dict", "model", "module"):
        if isinstance(sd, Mapping) and key in sd and isinstance(sd[key], Mapping):
            sd = sd[key]
    if not isinstance(sd, Mapping) or not all(isinstance(v, Tensor) for v in sd.values()):
        raise ValueError("not a state dict (expected a mapping of parameter names to tensors)")
    prefix = "module."
    if sd and all(k.startswith(prefix) for k in sd):
        sd = {k[len(prefix) :]: v for k, v in sd.items()}
    return dict(sd)


def open_clip_to_transformers(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rename an open_clip ``CLIP`` state dict to ``transformers.CLIPModel`` keys.

    ``attn.in_proj_weight [3W, W]`` is split into q/k/v (rows in that order, as ``nn.MultiheadAttention``
    packs them); ``visual.proj`` and ``text_projection`` (``x @ P``) become ``Linear`` weights ``P.T``.
    Unknown keys raise ``KeyError`` naming them, so a checkpoint of another layout is not half-loaded.
    """
    out: dict[str, Tensor] = {}
    unknown = []
    for key, value in state_dict.items():
        if key in _IGNORED_OPEN_CLIP_KEYS:
            continue
        if key in _VISION:
            out[_VISION[key]] = value
        elif key in _TEXT:
            out[_TEXT[key]] = value
        elif key in _TRANSPOSED:
            out[_TRANSPOSED[key]] = value.t().contiguous()
        else:
            for src, dst in _TOWERS:
                if key.startswith(src):
                    layer, rest = key[len(src) :].split(".", 1)
                    base = f"{dst}{layer}."
                    if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
                        kind = rest.rsplit("_", 1)[1]  # weight | bias
                        for name, part in zip(("q", "k", "v"), value.chunk(3, dim=0), strict=True):
                            out[f"{base}self_attn.{name}_proj.{kind}"] = part.contiguous()
                    else:
                        module, _, param = rest.rpartition(".")
                        if module not in _BLOCK:
                            unknown.append(key)
                            break
                        out[f"{base}{_BLOCK[module]}.{param}"] = value
                    break
            else:
                unknown.append(key)
    if unknown:
        shown = ", ".join(unknown[:8]) + (" ..." if len(unknown) > 8 else "")
        raise KeyError(f"{len(unknown)} open_clip keys have no transformers CLIP counterpart: {shown}")
    return out


def transformers_to_open_clip(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The inverse of ``open_clip_to_transformers`` (q/k/v fused back, projections transposed back).

    Used by the tests to write open_clip-format checkpoints, and handy to export a fine-tuned scorer.
    """
    inv_vision = {v: k for k, v in _VISION.items()}
    inv_text = {v: k for k, v in _TEXT.items()}
    inv_t = {v: k for k, v in _TRANSPOSED.items()}
    inv_block = {v: k for k, v in _BLOCK.items()}
    out: dict[str, Tensor] = {}
    qkv: dict[str, dict[str, Tensor]] = {}
    for key, value in state_dict.items():
        if key.endswith("position_ids"):
            continue
        if key in inv_vision:
            out[inv_vision[key]] = value
        elif key in inv_text:
            out[inv_text[key]] = value
        elif key in inv_t:
            out[inv_t[key]] = value.t().contiguous()
        else:
            for src, dst in _TOWERS:
                if key.startswith(dst):
                    layer, rest = key[len(dst) :].split(".", 1)
                    base = f"{src}{layer}."
                    if rest.startswith("self_attn.") and rest.split(".")[1] in ("q_proj", "k_proj", "v_proj"):
                        _, proj, kind = rest.split(".")
                        qkv.setdefault(f"{base}attn.in_proj_{kind}", {})[proj[0]] = value
                    else:
                        module, _, param = rest.rpartition(".")
                        out[f"{base}{inv_block[module]}.{param}"] = value
                    break
            else:
                raise KeyError(f"transformers CLIP key {key!r} has no open_clip counterpart")
    for key, parts in qkv.items():
        out[key] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return out


def _new_clip_model(config: CLIPConfig) -> CLIPModel:
    from transformers import CLIPModel

    try:  # skip the random init of ~1B parameters that the checkpoint overwrites anyway
        from transformers.initialization import no_init_weights
    except ImportError:  # pragma: no cover - older transformers
        no_init_weights = contextlib.nullcontext
    with no_init_weights():
        return CLIPModel(config)


def load_open_clip_state_dict(model: nn.Module, open_clip_sd: Mapping[str, Tensor]) -> None:
    """Map and load an open_clip state dict into a transformers ``CLIPModel``, strictly.

    Raises ``KeyError`` / ``ValueError`` naming missing, unknown or mis-shaped keys.
    """
    mapped = open_clip_to_transformers(open_clip_sd)
    expected = {k: v for k, v in model.state_dict().items() if not k.endswith("position_ids")}
    missing = sorted(set(expected) - set(mapped))
    if missing:
        shown = ", ".join(missing[:8]) + (" ..." if len(missing) > 8 else "")
        raise KeyError(f"{len(missing)} weights missing from the checkpoint: {shown}")
    extra = sorted(set(mapped) - set(expected))
    if extra:
        raise KeyError(f"checkpoint has weights the configured model lacks (wrong layer count?): {extra[:8]}")
    bad = [
        f"{k}: checkpoint {tuple(mapped[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if tuple(mapped[k].shape) != tuple(v.shape)
    ]
    if bad:
        raise ValueError(
            "checkpoint shapes do not match the model config (pass model_config): " + "; ".join(bad[:4])
        )
    model.load_state_dict(mapped, strict=False)


def hps_preprocess_config(image_size: int) -> ImagePreprocessConfig:
    """HPSv2's evaluation transform: longest side -> ``image_size`` (bicubic, antialiased), zero-pad."""
    return ImagePreprocessConfig(
        layout="longest_edge_pad",
        size=image_size,
        crop_size=None,
        mean=OPENAI_CLIP_MEAN,
        std=OPENAI_CLIP_STD,
        interpolation="bicubic",
        clamp=False,
        pad_value=0.0,
    )


class HPSScorer(nn.Module):
    """Human Preference Score v2 / v2.1: ``cos(image, prompt)`` of the HPS-tuned ViT-H-14 (typical 0.2-0.35).

    ``path``: the ``.pt`` checkpoint (or a folder holding it, or ``xswu/HPSv2`` in the HF cache; ``None``
    = the cache). ``tokenizer_path``: a folder / hub id with the CLIP BPE tokenizer (open_clip's ViT-H-14
    uses OpenAI's vocabulary; LAION's HF repo ships it). ``model_config``: an open_clip model config
    (dict or JSON path) when the checkpoint is not ViT-H-14 (tests use a tiny one).
    """

    differentiable = True

    def __init__(
        self,
        path: str | Path | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        *,
        version: str = "v2.0",
        tokenizer_path: str | Path = HPS_TOKENIZER,
        model_config: Mapping[str, Any] | str | Path | None = None,
    ) -> None:
        super().__init__()
        if version not in HPS_FILES:
            raise ValueError(f"unknown HPS version {version!r}; choose one of {', '.join(HPS_FILES)}")
        self.name = HPS_NAMES[version]
        self.version = version
        filename = HPS_FILES[version]
        model_name = f"HPS {version}"
        source = f"{filename} from the {HPS_REPO} Hugging Face repo"
        expected = f"{filename}: an open_clip ViT-H-14 state dict (optionally under 'state_dict')"
        ckpt = locate_file(path, model=model_name, filename=filename, repo_id=HPS_REPO, source=source)
        tok_source = (
            f"the tokenizer files of {HPS_TOKENIZER} (Hugging Face), or any OpenAI-CLIP BPE tokenizer folder"
        )
        tok_folder = locate_folder(
            tokenizer_path,
            model=f"{model_name} tokenizer",
            source=tok_source,
            required=(("tokenizer.json", "vocab.json"),),
        )
        self.tokenizer = load_clip_tokenizer(tok_folder, model=f"{model_name} tokenizer", source=tok_source)

        if model_config is None:
            cfg = copy.deepcopy(VIT_H_14)
        elif isinstance(model_config, Mapping):
            cfg = copy.deepcopy(dict(model_config))
        else:
            cfg = json.loads(Path(model_config).read_text())
        self.open_clip_config = cfg
        config = clip_config_from_open_clip(
            cfg,
            eos_token_id=self.tokenizer.eos_token_id,
            bos_token_id=self.tokenizer.bos_token_id,
            pad_token_id=self.tokenizer.pad_token_id,
        )
        raw = load_torch_file(ckpt, model=model_name, expected=expected, source=source)
        try:
            model = _new_clip_model(config)
            load_open_clip_state_dict(model, unwrap_state_dict(raw))
        except (KeyError, ValueError, RuntimeError) as exc:
            raise load_error(model_name, ckpt, expected, source, exc) from exc
        self.model = freeze(model.to(device=device, dtype=dtype))
        self.device, self.dtype = torch.device(device), dtype
        self.context_length = int(cfg["text_cfg"].get("context_length", 77))
        self.preprocess_config = hps_preprocess_config(int(cfg["vision_cfg"]["image_size"]))
        self.checkpoint_path = ckpt

    def image_features(self, images: Tensor) -> Tensor:
        """Unit-norm image embeddings ``[B, D]``, differentiable in ``images``."""
        pixels = preprocess_images(images.to(self.device), self.preprocess_config).to(
            self.dtype
        )  # [B, 3, 224, 224]
        pooled = self.model.vision_model(pixel_values=pixels).pooler_output  # [B, W]
        return F.normalize(self.model.visual_projection(pooled).float(), dim=-1)  # [B, D]

    def text_features(self, prompts: Sequence[str]) -> Tensor:
        """Unit-norm text embeddings ``[B, D]`` (open_clip: causal text tower, EOT pooling)."""
        tokens = self.tokenize(prompts)
        pooled = self.model.text_model(input_ids=tokens).pooler_output  # [B, W]
        return F.normalize(self.model.text_projection(pooled).float(), dim=-1)  # [B, D]

    def tokenize(self, prompts: Sequence[str]) -> Tensor:
        """Token ids ``[B, context_length]`` as open_clip's tokenizer gives them: the prompts are cleaned
        like open_clip does before its BPE (ftfy, HTML unescape, whitespace, lower case; rewards/text.py)."""
        from rocm_ray.rewards.text import open_clip_clean_all

        return self.tokenizer(
            open_clip_clean_all(prompts),
            padding="max_length",
            truncation=True,
            max_length=self.context_length,
            return_tensors="pt",
        ).input_ids.to(self.device)  # [B, context_length]

    def score(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        """HPS ``[B]``: the cosine of the normalized image and prompt features, float32."""
        check_batch(images, prompts)
        return (self.image_features(images) * self.text_features(prompts)).sum(-1).to(images.device)  # [B]
