"""Differentiable image preprocessing for CLIP / BLIP / open_clip reward models, in torch.

The official pipelines resize with PIL (Hugging Face image processors, torchvision on PIL images) or with
torchvision on tensors (HPSv2). Neither keeps an autograd graph, so every scorer preprocesses here instead:
``F.interpolate(..., antialias=True)`` is the same antialiased bicubic/bilinear filter as PIL's
(torch's antialias kernels were written to match PIL), then the same crop / pad and normalization.

Three layouts cover the reward models we support:

* ``shortest_edge``: resize the shorter side to ``size`` (aspect kept), center-crop ``crop_size``
  (CLIPImageProcessor; OpenAI CLIP's and ImageReward's torchvision transforms).
* ``exact``: resize to ``(height, width)`` (BlipImageProcessor).
* ``longest_edge_pad``: resize the longer side to ``size``, zero-pad to a square (open_clip's
  ``ResizeMaxSize``, which HPSv2's evaluation transform uses).

Residual differences from the official PIL path: PIL works on uint8 images and rounds the resized
pixels to uint8 (at most 0.5/255 per pixel, i.e. ~0.008 after CLIP normalization); we do not quantize,
so the gradient stays informative. See docs/rewards.md for measured discrepancies.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# PIL resample codes as stored in Hugging Face preprocessor_config.json ("resample": 3).
_PIL_RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic"}
# Processor types whose integer `size` means a square (HF `default_to_square=True`).
_SQUARE_PROCESSORS = ("Blip",)

Layout = Literal["shortest_edge", "exact", "longest_edge_pad"]


@dataclass(frozen=True)
class ImagePreprocessConfig:
    """Everything the preprocessing needs, read from an image-processor config or set by hand.

    ``crop_offset`` picks how an odd crop margin is split: ``"floor"`` as Hugging Face processors do
    (``(h - ch) // 2``), ``"round"`` as torchvision's ``CenterCrop`` does (``round((h - ch) / 2)``).
    ``clamp`` clips resized pixels to ``[0, 1]`` as a PIL (uint8) pipeline does; the tensor pipeline of
    HPSv2 does not clip.
    """

    layout: Layout = "shortest_edge"
    size: tuple[int, int] | int = 224
    crop_size: tuple[int, int] | None = (224, 224)
    mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    std: tuple[float, float, float] = OPENAI_CLIP_STD
    interpolation: Literal["bicubic", "bilinear", "nearest"] = "bicubic"
    antialias: bool = True
    crop_offset: Literal["floor", "round"] = "floor"
    clamp: bool = True
    do_resize: bool = True
    do_normalize: bool = True
    input_scale: float = 1.0  # multiply [0, 1] images by this first (255 * rescale_factor in HF terms)
    pad_value: float = 0.0

    @property
    def output_size(self) -> tuple[int, int]:
        """The ``(height, width)`` of the preprocessed images."""
        if self.layout == "shortest_edge" and self.crop_size is not None:
            return self.crop_size
        if isinstance(self.size, int):
            return (self.size, self.size)
        return self.size

    def with_(self, **changes: Any) -> ImagePreprocessConfig:
        """A copy with some fields changed."""
        return replace(self, **changes)

    @classmethod
    def clip(cls, size: int = 224, **changes: Any) -> ImagePreprocessConfig:
        """OpenAI CLIP's transform: shortest edge -> ``size`` bicubic, center crop, CLIP mean/std."""
        return cls(layout="shortest_edge", size=size, crop_size=(size, size), **changes)

    @classmethod
    def from_hf_dict(
        cls, config: dict[str, Any], default_to_square: bool | None = None
    ) -> ImagePreprocessConfig:
        """Read a Hugging Face ``preprocessor_config.json`` (CLIPImageProcessor, BlipImageProcessor, ...).

        An integer ``size`` means the shortest edge for CLIP-like processors and a square for BLIP, as in
        transformers' ``get_size_dict(default_to_square=...)``; pass ``default_to_square`` to override.
        """
        kind = str(config.get("image_processor_type") or config.get("feature_extractor_type") or "")
        if default_to_square is None:
            default_to_square = any(kind.startswith(p) for p in _SQUARE_PROCESSORS)
        do_resize = bool(config.get("do_resize", True))
        size = config.get("size", 224)
        layout: Layout
        if isinstance(size, int):
            layout, size_v = ("exact", (size, size)) if default_to_square else ("shortest_edge", size)
        elif "shortest_edge" in size:
            layout, size_v = "shortest_edge", int(size["shortest_edge"])
        elif "height" in size and "width" in size:
            layout, size_v = "exact", (int(size["height"]), int(size["width"]))
        else:
            raise ValueError(
                f"unsupported image-processor size {size!r} (want shortest_edge or height/width)"
            )
        crop: tuple[int, int] | None = None
        if config.get("do_center_crop", layout == "shortest_edge"):
            c = config.get("crop_size", size_v)
            if isinstance(c, int):
                crop = (c, c)
            elif isinstance(c, dict):
                crop = (int(c["height"]), int(c["width"]))
            else:
                crop = tuple(c)  # type: ignore[assignment]
        if layout == "exact" and crop is not None and crop != size_v:
            raise ValueError("center crop after an exact resize is not supported")
        if layout == "exact":
            crop = None
        if layout == "shortest_edge" and crop is None:
            raise ValueError(
                "a shortest-edge resize without a center crop gives ragged batches; not supported"
            )
        resample = config.get("resample", 3)
        if resample not in _PIL_RESAMPLE:
            raise ValueError(
                f"unsupported resample {resample!r}; supported PIL codes: {sorted(_PIL_RESAMPLE)}"
            )
        mean = config.get("image_mean", OPENAI_CLIP_MEAN)
        std = config.get("image_std", OPENAI_CLIP_STD)
        mean = tuple(float(m) for m in (mean if isinstance(mean, (list, tuple)) else [mean] * 3))
        std = tuple(float(s) for s in (std if isinstance(std, (list, tuple)) else [std] * 3))
        do_rescale = bool(config.get("do_rescale", True))
        rescale = float(config.get("rescale_factor", 1 / 255)) if do_rescale else 1.0
        return cls(
            layout=layout,
            size=size_v,
            crop_size=crop,
            mean=mean,  # type: ignore[arg-type]
            std=std,  # type: ignore[arg-type]
            interpolation=_PIL_RESAMPLE[resample],  # type: ignore[arg-type]
            crop_offset="floor",
            clamp=True,
            do_resize=do_resize,
            do_normalize=bool(config.get("do_normalize", True)),
            input_scale=255.0 * rescale,
        )

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> ImagePreprocessConfig:
        """Read ``preprocessor_config.json`` from a model folder."""
        return cls.from_hf_dict(json.loads((Path(folder) / "preprocessor_config.json").read_text()))


def _resize(x: Tensor, size: tuple[int, int], cfg: ImagePreprocessConfig) -> Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    if cfg.interpolation == "nearest":
        return F.interpolate(x, size=size, mode="nearest")
    return F.interpolate(x, size=size, mode=cfg.interpolation, align_corners=False, antialias=cfg.antialias)


def _offset(margin: int, how: str) -> int:
    return margin // 2 if how == "floor" else int(round(margin / 2.0))


def center_crop(x: Tensor, crop: tuple[int, int], offset: Literal["floor", "round"] = "floor") -> Tensor:
    """Center-crop ``[B, C, H, W]`` to ``crop``; zero-pads first when the image is smaller (as HF does)."""
    ch, cw = crop
    h, w = x.shape[-2:]
    if h < ch or w < cw:
        ph, pw = max(ch - h, 0), max(cw - w, 0)
        x = F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))
        h, w = x.shape[-2:]
    top, left = _offset(h - ch, offset), _offset(w - cw, offset)
    return x[..., top : top + ch, left : left + cw]


def shortest_edge_size(height: int, width: int, size: int) -> tuple[int, int]:
    """Output size of a shortest-edge resize, as transformers and torchvision compute it."""
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = size, int(size * long / short)
    return (new_long, new_short) if width <= height else (new_short, new_long)


def preprocess_images(images: Tensor, cfg: ImagePreprocessConfig) -> Tensor:
    """Images ``[B, 3, H, W]`` in ``[0, 1]`` -> model pixel values ``[B, 3, h, w]``, differentiably."""
    x = images.float()
    h, w = x.shape[-2:]
    if cfg.do_resize:
        if cfg.layout == "shortest_edge":
            assert isinstance(cfg.size, int)
            x = _resize(x, shortest_edge_size(h, w, cfg.size), cfg)  # [B, 3, h', w']
        elif cfg.layout == "exact":
            size = (cfg.size, cfg.size) if isinstance(cfg.size, int) else cfg.size
            x = _resize(x, size, cfg)  # [B, 3, h, w]
        else:
            target = cfg.size if isinstance(cfg.size, int) else max(cfg.size)
            scale = target / float(max(h, w))
            if scale != 1.0:
                new = (round(h * scale), round(w * scale))
                x = _resize(x, new, cfg)  # [B, 3, h', w'], longest side = target
                ph, pw = target - new[0], target - new[1]
                x = F.pad(
                    x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2), value=cfg.pad_value
                )  # [B, 3, S, S]
        if cfg.clamp:
            x = x.clamp(0.0, 1.0)
    if cfg.layout == "shortest_edge" and cfg.crop_size is not None:
        x = center_crop(x, cfg.crop_size, cfg.crop_offset)  # [B, 3, ch, cw]
    x = x * cfg.input_scale if cfg.input_scale != 1.0 else x
    if cfg.do_normalize:
        mean = torch.tensor(cfg.mean, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        std = torch.tensor(cfg.std, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        x = (x - mean) / std
    return x
