"""LAION aesthetic predictor v2: a linear-ish MLP on L2-normalized CLIP ViT-L/14 image embeddings.

Official inference (christophschuhmann/improved-aesthetic-predictor, ``simple_inference.py``):
``clip.load("ViT-L/14")`` image features (768-d, projected), L2-normalized, then ``MLP(768)`` =
``Linear(768, 1024), Dropout, Linear(1024, 128), Dropout, Linear(128, 64), Dropout, Linear(64, 16),
Linear(16, 1)`` (no activations; state-dict keys ``layers.0/2/4/6/7``) loaded from
``sac+logos+ava1-l14-linearMSE.pth``. Scores are on the AVA 1-10 scale (typical 4.5-6.5 for SD images).

The CLIP tower is the transformers port ``openai/clip-vit-large-patch14`` (same weights as OpenAI's
ViT-L/14), loaded from one folder by the same code as ``clip_score``; the head's layer sizes are read
from the checkpoint, so a tiny CLIP with a small projection dim works with a head of the same layout
(the embedded ``tiny/aesthetic_head.pth``). The prompt is ignored.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path

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
from rocm_ray.rewards.preprocess import preprocess_images

AESTHETIC_HEAD_FILE = "sac+logos+ava1-l14-linearMSE.pth"
AESTHETIC_SOURCE = (
    f"{AESTHETIC_HEAD_FILE} from the christophschuhmann/improved-aesthetic-predictor repo "
    "(GitHub), with the CLIP ViT-L/14 of the openai/clip-vit-large-patch14 Hugging Face repo"
)
# The official Sequential: Linear, Dropout(0.2), Linear, Dropout(0.2), Linear, Dropout(0.1), Linear, Linear.
_DROPOUT_AFTER = (0.2, 0.2, 0.1)


class MLPHead(nn.Module):
    """The official ``MLP`` module: a ``layers`` Sequential, so state-dict keys are ``layers.N.*``."""

    def __init__(self, layers: nn.Sequential) -> None:
        super().__init__()
        self.layers = layers

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)


def build_mlp_head(state_dict: Mapping[str, Tensor]) -> MLPHead:
    """Rebuild the LAION / ImageReward MLP head from its state dict (keys ``layers.N.weight/bias``).

    Linear layers sit at the indices found in the checkpoint with Dropouts in between (official:
    0, 2, 4, 6, 7); sizes come from the weights. No activations, as in the official code.
    """
    sd = {k.removeprefix("module."): v for k, v in state_dict.items()}
    indices = sorted({int(m.group(1)) for k in sd if (m := re.match(r"layers\.(\d+)\.weight$", k))})
    if not indices:
        raise KeyError("no 'layers.N.weight' keys: not a LAION-format MLP head")
    modules: list[nn.Module] = []
    dropouts = iter(_DROPOUT_AFTER)
    prev_out = None
    for i in indices:
        while len(modules) < i:
            modules.append(nn.Dropout(next(dropouts, 0.0)))
        weight = sd[f"layers.{i}.weight"]
        if weight.ndim != 2 or (prev_out is not None and weight.shape[1] != prev_out):
            raise ValueError(f"layers.{i}.weight has shape {tuple(weight.shape)}; does not chain")
        linear = nn.Linear(weight.shape[1], weight.shape[0], bias=f"layers.{i}.bias" in sd)
        modules.append(linear)
        prev_out = weight.shape[0]
    head = MLPHead(nn.Sequential(*modules))
    if prev_out != 1:
        raise ValueError(f"the head ends in {prev_out} outputs; expected 1")
    head.load_state_dict(sd, strict=True)
    return head


class AestheticScorer(nn.Module):
    """LAION aesthetic score ``[B]`` (AVA 1-10 scale) from a CLIP folder and a LAION-format head ``.pth``.

    ``path``: the CLIP folder (default ``openai/clip-vit-large-patch14`` from the HF cache).
    ``head_path``: the head ``.pth``; default: ``sac+logos+ava1-l14-linearMSE.pth`` in the CLIP folder.
    """

    name = "aesthetic"
    differentiable = True

    def __init__(
        self,
        path: str | Path | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        *,
        head_path: str | Path | None = None,
    ) -> None:
        super().__init__()
        from rocm_ray.rewards.clip import PROCESSOR_FILES, load_clip_model, load_preprocess_config

        model_name = "LAION aesthetic predictor"
        folder = locate_folder(
            path or "openai/clip-vit-large-patch14", model=f"{model_name} CLIP", source=AESTHETIC_SOURCE
        )
        locate_folder(folder, model=f"{model_name} CLIP", source=AESTHETIC_SOURCE, required=PROCESSOR_FILES)
        head_file = locate_file(
            head_path if head_path is not None else folder,
            model=f"{model_name} head",
            filename=AESTHETIC_HEAD_FILE,
            repo_id=None,
            source=AESTHETIC_SOURCE,
        )
        expected = "a LAION-format MLP head state dict (layers.0/2/4/6/7.weight/bias)"
        raw = load_torch_file(
            head_file, model=f"{model_name} head", expected=expected, source=AESTHETIC_SOURCE
        )
        try:
            if not isinstance(raw, Mapping):
                raise TypeError(f"expected a state dict, got {type(raw).__name__}")
            head = build_mlp_head(raw.get("state_dict", raw))
        except (KeyError, ValueError, RuntimeError, TypeError) as exc:
            raise load_error(f"{model_name} head", head_file, expected, AESTHETIC_SOURCE, exc) from exc
        self.model = load_clip_model(
            folder, model=f"{model_name} CLIP", source=AESTHETIC_SOURCE, device=device, dtype=dtype
        )
        in_features = head.layers[0].in_features
        if in_features != self.model.config.projection_dim:
            raise load_error(
                f"{model_name} head",
                head_file,
                expected,
                AESTHETIC_SOURCE,
                ValueError(
                    f"head takes {in_features}-d embeddings; the CLIP projects to "
                    f"{self.model.config.projection_dim}"
                ),
            )
        self.head = freeze(head.to(device=device, dtype=torch.float32))
        # OpenAI CLIP's own transform (which the official predictor uses) crops with torchvision's rounding.
        self.preprocess_config = load_preprocess_config(
            folder, model=model_name, source=AESTHETIC_SOURCE
        ).with_(crop_offset="round")
        self.device, self.dtype = torch.device(device), dtype
        self.model_folder, self.head_path = folder, head_file

    def image_embeddings(self, images: Tensor) -> Tensor:
        """L2-normalized CLIP image embeddings ``[B, D]``, differentiable in ``images``."""
        pixels = preprocess_images(images.to(self.device), self.preprocess_config).to(
            self.dtype
        )  # [B, 3, h, w]
        pooled = self.model.vision_model(pixel_values=pixels).pooler_output  # [B, Dv]
        return F.normalize(self.model.visual_projection(pooled).float(), dim=-1)  # [B, D]

    def score(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        """Aesthetic score ``[B]``, float32, on the images' device (prompts are ignored)."""
        check_batch(images, prompts)
        return self.head(self.image_embeddings(images)).squeeze(-1).to(images.device)  # [B]
