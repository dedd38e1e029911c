"""JPEG (in)compressibility, DDPO's prompt-free rewards: the JPEG file size of each image in kB.

As in DDPO (``ddpo_pytorch/rewards.py``): images -> uint8 (``(x * 255).round().clamp(0, 255)``), PIL JPEG
at quality 95, size = bytes / 1000. ``jpeg_incompressibility`` is the size, ``jpeg_compressibility`` its
negative. A file size has no gradient, so these scorers are ``differentiable = False``: they serve the
policy-gradient baseline, and ROCM refuses them (``require_differentiable``).
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from rocm_ray.rewards.base import check_batch


def jpeg_size_kb(images: Tensor, quality: int = 95) -> Tensor:
    """JPEG size in kB (1 kB = 1000 bytes) of each image ``[B, 3, H, W]`` in ``[0, 1]`` -> ``[B]`` float32."""
    from PIL import Image

    arr = (images.detach().float() * 255).round().clamp(0, 255).to(torch.uint8).cpu().numpy()  # [B, 3, H, W]
    arr = np.ascontiguousarray(arr.transpose(0, 2, 3, 1))  # [B, H, W, 3]
    sizes = []
    for image in arr:
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
        sizes.append(buffer.tell() / 1000.0)
    return torch.tensor(sizes, dtype=torch.float32, device=images.device)


class JpegScorer:
    """``jpeg_compressibility`` (``-kB``) or ``jpeg_incompressibility`` (``+kB``); not differentiable."""

    differentiable = False

    def __init__(
        self,
        path: str | Path | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        *,
        compressibility: bool = True,
        quality: int = 95,
    ) -> None:
        if path is not None:
            raise ValueError("JPEG rewards have no weights; leave the reward's path empty")
        self.compressibility = compressibility
        self.quality = int(quality)
        self.name = "jpeg_compressibility" if compressibility else "jpeg_incompressibility"

    def score(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        """Signed JPEG size in kB ``[B]`` (no gradient)."""
        check_batch(images, prompts)
        size = jpeg_size_kb(images, self.quality)
        return -size if self.compressibility else size
