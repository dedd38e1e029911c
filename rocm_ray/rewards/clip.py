"""CLIP score and PickScore: image-text similarity from a Hugging Face ``CLIPModel`` folder.

* ``clip_score``: ``scale * cos(image, prompt)`` with ``scale = 100`` (torchmetrics' CLIPScore convention,
  without its ``max(., 0)`` clip, which would zero the gradient of badly aligned images). Default weights:
  ``openai/clip-vit-large-patch14``. The embedded tiny CLIP (``embedded:tiny/clip``) loads through the
  same code.
* ``pickscore``: ``exp(logit_scale) * cos(image, prompt)``, exactly the official PickScore inference code
  (``yuvalkirstain/PickScore_v1`` with the processor of ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``).

The model, the tokenizer and ``preprocessor_config.json`` are read from one folder (or, for PickScore,
the processor from a second one). Images are preprocessed in torch (``preprocess.py``) so that
d score / d image exists.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rocm_ray.rewards.base import (
    check_batch,
    freeze,
    load_error,
    locate_folder,
    read_json,
)
from rocm_ray.rewards.preprocess import ImagePreprocessConfig, preprocess_images

if TYPE_CHECKING:
    from transformers import CLIPModel, CLIPTokenizer

CLIP_SOURCE = "the openai/clip-vit-large-patch14 Hugging Face repo (or any CLIPModel folder)"
PICKSCORE_SOURCE = (
    "the yuvalkirstain/PickScore_v1 Hugging Face repo (model), with processor "
    "laion/CLIP-ViT-H-14-laion2B-s32B-b79K (tokenizer + preprocessor_config.json)"
)
PROCESSOR_FILES: tuple[str | tuple[str, ...], ...] = (
    "preprocessor_config.json",
    ("tokenizer.json", "vocab.json"),
)


def load_clip_model(
    folder: Path, *, model: str, source: str, device: str | torch.device, dtype: torch.dtype
) -> CLIPModel:
    """``CLIPModel.from_pretrained`` on a local folder, frozen; failures become ``RewardModelLoadError``."""
    from transformers import CLIPModel

    try:
        clip = CLIPModel.from_pretrained(str(folder), local_files_only=True, dtype=dtype)
    except Exception as exc:
        raise load_error(
            model, folder, "a transformers CLIPModel folder (config.json + weights)", source, exc
        ) from exc
    return freeze(clip.to(device))


def load_clip_tokenizer(folder: Path, *, model: str, source: str) -> CLIPTokenizer:
    """The CLIP BPE tokenizer saved in ``folder`` (``tokenizer.json`` or ``vocab.json`` + ``merges.txt``)."""
    from transformers import CLIPTokenizer

    try:
        return CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as exc:
        raise load_error(
            model, folder, "a CLIP tokenizer (tokenizer.json or vocab.json + merges.txt)", source, exc
        ) from exc


def load_preprocess_config(folder: Path, *, model: str, source: str) -> ImagePreprocessConfig:
    """The torch preprocessing equivalent of ``folder/preprocessor_config.json``."""
    path = folder / "preprocessor_config.json"
    try:
        return ImagePreprocessConfig.from_hf_dict(read_json(path, model=model, source=source))
    except ValueError as exc:
        raise load_error(model, path, "a CLIP image-processor config", source, exc) from exc


def has_processor(folder: Path) -> bool:
    """Whether a folder carries its own tokenizer and image-processor config."""
    return all(
        any((folder / f).is_file() for f in ((r,) if isinstance(r, str) else r)) for r in PROCESSOR_FILES
    )


def _processor_or_tokenizer(
    processor_path: str | Path | None, tokenizer_path: str | Path | None
) -> str | Path | None:
    """``tokenizer_path`` is accepted as another name for ``processor_path`` (a folder with both)."""
    if (
        processor_path is not None
        and tokenizer_path is not None
        and str(processor_path) != str(tokenizer_path)
    ):
        raise ValueError(
            "give processor_path or tokenizer_path (the same folder: tokenizer + image processor), not both"
        )
    return processor_path if processor_path is not None else tokenizer_path


class _CLIPSimilarity(nn.Module):
    """Shared body: a frozen CLIPModel, its tokenizer and torch preprocessing -> scaled cosine."""

    name = "clip"
    differentiable = True

    def __init__(
        self,
        model_path: str | Path,
        processor_path: str | Path | None,
        *,
        model_name: str,
        source: str,
        device: str | torch.device,
        dtype: torch.dtype,
        max_length: int = 77,
    ) -> None:
        super().__init__()
        folder = locate_folder(model_path, model=model_name, source=source)
        proc_folder = locate_folder(
            folder if processor_path is None else processor_path,
            model=model_name,
            source=source,
            required=PROCESSOR_FILES,
        )
        self.model = load_clip_model(folder, model=model_name, source=source, device=device, dtype=dtype)
        self.tokenizer = load_clip_tokenizer(proc_folder, model=model_name, source=source)
        self.preprocess_config = load_preprocess_config(proc_folder, model=model_name, source=source)
        self.device = torch.device(device)
        self.dtype = dtype
        self.max_length = min(max_length, self.model.config.text_config.max_position_embeddings)
        self.model_folder, self.processor_folder = folder, proc_folder

    def image_features(self, images: Tensor) -> Tensor:
        """Unit-norm image embeddings ``[B, D]``, differentiable in ``images``."""
        pixels = preprocess_images(images.to(self.device), self.preprocess_config).to(
            self.dtype
        )  # [B, 3, h, w]
        pooled = self.model.vision_model(pixel_values=pixels).pooler_output  # [B, Dv]
        return F.normalize(self.model.visual_projection(pooled).float(), dim=-1)  # [B, D]

    def text_features(self, prompts: Sequence[str]) -> Tensor:
        """Unit-norm text embeddings ``[B, D]``."""
        tokens = self.tokenizer(
            list(prompts), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        ).to(self.device)
        pooled = self.model.text_model(
            input_ids=tokens.input_ids, attention_mask=tokens.attention_mask
        ).pooler_output
        return F.normalize(self.model.text_projection(pooled).float(), dim=-1)  # [B, D]

    def cosine(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        """``cos(image_b, prompt_b)`` for each pair ``[B]``."""
        check_batch(images, prompts)
        return (self.image_features(images) * self.text_features(prompts)).sum(-1)  # [B]


class CLIPScorer(_CLIPSimilarity):
    """CLIP score: ``scale * cos(image, prompt)`` (``scale=100``, as torchmetrics; CLIP L/14: ~15-35)."""

    name = "clip_score"
    differentiable = True

    def __init__(
        self,
        path: str | Path | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        *,
        processor_path: str | Path | None = None,
        tokenizer_path: str | Path | None = None,
        scale: float = 100.0,
        max_length: int = 77,
    ) -> None:
        super().__init__(
            path or "openai/clip-vit-large-patch14",
            _processor_or_tokenizer(processor_path, tokenizer_path),
            model_name="CLIP score (CLIPModel)",
            source=CLIP_SOURCE,
            device=device,
            dtype=dtype,
            max_length=max_length,
        )
        self.scale = float(scale)

    def score(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        """``scale * cos`` per image ``[B]``, float32, on the images' device."""
        return (self.scale * self.cosine(images, prompts)).to(images.device)


class PickScoreScorer(_CLIPSimilarity):
    """PickScore: ``exp(logit_scale) * cos(image, prompt)`` as the official inference code (typical 18-24)."""

    name = "pickscore"
    differentiable = True

    def __init__(
        self,
        path: str | Path | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        *,
        processor_path: str | Path | None = None,
        tokenizer_path: str | Path | None = None,
        max_length: int = 77,
    ) -> None:
        model_path = path or "yuvalkirstain/PickScore_v1"
        processor_path = _processor_or_tokenizer(processor_path, tokenizer_path)
        if processor_path is None:
            # The official PickScore repo ships no processor: use the model folder's own if it has one,
            # else the LAION ViT-H-14 processor as the official code does.
            folder = locate_folder(model_path, model="PickScore", source=PICKSCORE_SOURCE)
            processor_path = None if has_processor(folder) else "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
            model_path = folder
        super().__init__(
            model_path,
            processor_path,
            model_name="PickScore",
            source=PICKSCORE_SOURCE,
            device=device,
            dtype=dtype,
            max_length=max_length,
        )

    def score(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        """``exp(logit_scale) * cos`` per image ``[B]``, float32, on the images' device."""
        scale = self.model.logit_scale.float().exp()
        return (scale * self.cosine(images, prompts)).to(images.device)
