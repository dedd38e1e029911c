"""The reward-scorer interface, its errors, the registry and the weighted mixture.

A scorer maps images ``[B, 3, H, W]`` in ``[0, 1]`` and their prompts to one reward per image ``[B]``.
ROCM backpropagates the reward through the whole sampling trajectory, so a scorer used by ROCM must be
differentiable in the images: weights are frozen (``requires_grad_(False)``, ``eval()``), and no scorer
wraps its forward in ``torch.no_grad()``.

This module imports only torch; the scorer modules (transformers, PIL) are imported when a scorer is
built, so the registry and the mixture can be used and tested without them.
"""

from __future__ import annotations

import importlib
import inspect
import json
import pickle
import re
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

__all__ = [
    "RewardScorer",
    "RewardModelNotFoundError",
    "RewardModelLoadError",
    "RewardMixture",
    "available_scorers",
    "build_scorer",
    "require_differentiable",
    "resolve_dtype",
]


@runtime_checkable
class RewardScorer(Protocol):
    """What every reward scorer is: a name, whether it is differentiable, and ``score``."""

    name: str
    differentiable: bool

    def score(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        """Images ``[B, 3, H, W]`` in ``[0, 1]`` and ``B`` prompts -> rewards ``[B]`` (float32)."""
        ...


class RewardModelNotFoundError(FileNotFoundError):
    """A reward model's weights are not where we looked (a local path or the local Hugging Face cache).

    The message names the model, the files expected and where to get them.
    """


class RewardServiceUnavailable(TimeoutError):
    """The RewardService replicas could not be placed or started (the message says which resources to check)."""


class RewardModelLoadError(RuntimeError):
    """A reward model's files exist but cannot be loaded (corrupt, truncated or of another architecture)."""


# ----------------------------------------------------------------------------------------------
# Locating weights: a local file or folder, an `embedded:` asset, or a hub id in the local HF cache.
# ----------------------------------------------------------------------------------------------

_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


def _resolve(path: str | Path) -> str:
    """Resolve ``embedded:...`` through ``rocm_ray.paths`` and expand ``~``."""
    from rocm_ray.paths import resolve_path

    resolved = resolve_path(str(path))
    return str(Path(resolved).expanduser()) if resolved.startswith("~") else resolved


def _looks_like_repo_id(path: str) -> bool:
    return bool(_REPO_ID.match(path)) and not Path(path).exists()


def not_found(model: str, where: str, expected: str, source: str) -> RewardModelNotFoundError:
    """Build the one error message all scorers use when weights are missing."""
    return RewardModelNotFoundError(
        f"{model} weights not found: looked for {where}. Expected {expected}. "
        f"Get them from {source}, then pass the local path (a folder or file) as the reward's `path`, "
        "or put the Hugging Face repo in the local Hugging Face cache (HF_HOME / HF_HUB_CACHE; "
        "e.g. `hf download <repo> <file>`); nothing is downloaded at run time."
    )


def load_error(
    model: str, where: str | Path, expected: str, source: str, cause: BaseException
) -> RewardModelLoadError:
    """Build the one error message all scorers use when weights exist but do not load."""
    return RewardModelLoadError(
        f"{model} weights at {where} could not be loaded ({type(cause).__name__}: {cause}). "
        f"Expected {expected}; the file may be truncated or corrupt, or of another model. "
        f"Get a fresh copy from {source}."
    )


def locate_file(
    path: str | Path | None,
    *,
    model: str,
    filename: str,
    repo_id: str | None,
    source: str,
) -> Path:
    """Find one weights file: a local file, a folder holding ``filename``, or a hub id in the local cache.

    ``path=None`` looks for ``filename`` in ``repo_id`` in the local Hugging Face cache. Never downloads.
    """
    expected = f"the file {filename}"
    if path is None:
        if repo_id is None:
            raise not_found(model, "nothing (no path given)", expected, source)
        return _hub_file(repo_id, filename, model=model, expected=expected, source=source, local=False)
    p = _resolve(path)
    local = Path(p)
    if local.is_file():
        return local
    if local.is_dir():
        if (local / filename).is_file():
            return local / filename
        raise not_found(model, f"{local / filename}", expected, source)
    if _looks_like_repo_id(p):
        return _hub_file(p, filename, model=model, expected=expected, source=source, local=True)
    raise not_found(model, f"{p} (no such file or folder)", expected, source)


def _hub_file(repo_id: str, filename: str, *, model: str, expected: str, source: str, local: bool) -> Path:
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo_id, filename, local_files_only=True))
    except Exception as exc:  # LocalEntryNotFoundError, HFValidationError, ...
        raise not_found(
            model,
            f"{filename} of the Hugging Face repo {repo_id} in the local cache ({type(exc).__name__})"
            + ("; no local file or folder of that name either" if local else ""),
            expected,
            source,
        ) from exc


WEIGHT_FILES = (
    "model.safetensors",
    "pytorch_model.bin",
    "model.safetensors.index.json",
    "pytorch_model.bin.index.json",
)


def locate_folder(
    path: str | Path,
    *,
    model: str,
    source: str,
    required: Sequence[str | tuple[str, ...]] = ("config.json", WEIGHT_FILES),
) -> Path:
    """Find a Hugging Face model folder: a local folder, ``embedded:...``, or a hub id in the local cache.

    ``required`` lists files that must be present; a tuple entry means "any one of these".
    Never downloads.
    """
    expected = "a Hugging Face folder with " + ", ".join(
        r if isinstance(r, str) else " or ".join(r) for r in required
    )
    p = _resolve(path)
    local = Path(p)
    if local.is_dir():
        folder = local
    elif local.is_file():
        raise not_found(model, f"{p} (a file, not a folder)", expected, source)
    elif _looks_like_repo_id(p):
        from huggingface_hub import snapshot_download

        try:
            folder = Path(snapshot_download(p, local_files_only=True))
        except Exception as exc:
            raise not_found(
                model,
                f"the Hugging Face repo {p} in the local cache ({type(exc).__name__}); "
                "no local folder of that name either",
                expected,
                source,
            ) from exc
    else:
        raise not_found(model, f"{p} (no such folder)", expected, source)
    missing = [
        r for r in required if not any((folder / f).is_file() for f in ((r,) if isinstance(r, str) else r))
    ]
    if missing:
        names = ", ".join(m if isinstance(m, str) else " or ".join(m) for m in missing)
        raise not_found(model, f"{folder} (missing {names})", expected, source)
    return folder


def read_json(path: Path, *, model: str, source: str) -> dict[str, Any]:
    """Read a JSON config, turning a corrupt file into a ``RewardModelLoadError``."""
    try:
        return json.loads(path.read_text())
    except Exception as exc:
        raise load_error(model, path, "a JSON file", source, exc) from exc


def _checkpoint_globals() -> list:
    """Plain-data classes official training checkpoints pickle next to the weights (argparse arguments,
    numpy scalars): allowed in a ``weights_only=True`` load, which never runs code from the file."""
    import argparse

    import numpy as np

    core = getattr(np, "_core", None) or np.core
    found = [argparse.Namespace, np.dtype, core.multiarray.scalar]
    found += [getattr(np.dtypes, n) for n in dir(getattr(np, "dtypes", object())) if n.endswith("DType")]
    return found


def load_torch_file(path: Path, *, model: str, expected: str, source: str) -> Any:
    """Load a checkpoint on CPU, tensors and plain data only; any failure becomes ``RewardModelLoadError``.

    Always ``weights_only=True`` (no code from the file runs), with the plain-data classes training
    checkpoints carry (argparse arguments, numpy scalars) allowed; a file that pickles anything else is
    refused with a message saying how to convert it.
    """
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        with torch.serialization.safe_globals(_checkpoint_globals()):
            return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        line = next((ln.strip() for ln in str(exc).splitlines() if "Unsupported global" in ln), "")
        raise load_error(model, path, expected, source, RuntimeError(
            f"it pickles Python objects besides tensors ({line or 'not plain data'}); rocm_ray loads checkpoints "
            "with torch.load(weights_only=True) only: save its state_dict with safetensors (or torch.save of the "
            "tensors) from a trusted environment and point the recipe at that file")) from exc
    except Exception as exc:
        raise load_error(model, path, expected, source, exc) from exc


# ----------------------------------------------------------------------------------------------
# Small helpers shared by the scorers.
# ----------------------------------------------------------------------------------------------


def resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """Accept ``torch.float16`` or a recipe string like ``"bfloat16"`` / ``"fp16"``."""
    if isinstance(dtype, torch.dtype):
        return dtype
    aliases = {
        "fp32": "float32",
        "fp16": "float16",
        "half": "float16",
        "bf16": "bfloat16",
        "float": "float32",
    }
    name = aliases.get(str(dtype), str(dtype)).removeprefix("torch.")
    value = getattr(torch, name, None)
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise ValueError(f"unknown reward dtype {dtype!r}; use float32, float16 or bfloat16")
    return value


def check_batch(images: Tensor, prompts: Sequence[str]) -> None:
    """Validate the scorer contract: images ``[B, 3, H, W]`` and exactly ``B`` prompts."""
    if not isinstance(images, Tensor) or images.ndim != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"reward scorers take images [B, 3, H, W] in [0, 1]; got {shape}")
    if isinstance(prompts, str) or len(prompts) != images.shape[0]:
        n = "a single string" if isinstance(prompts, str) else len(prompts)
        raise ValueError(f"reward scorers take one prompt per image: {images.shape[0]} images, {n} prompts")


def freeze(module: torch.nn.Module) -> torch.nn.Module:
    """Freeze a reward network: eval mode and no parameter gradients (image gradients still flow)."""
    module.eval()
    module.requires_grad_(False)
    return module


# ----------------------------------------------------------------------------------------------
# Registry.
# ----------------------------------------------------------------------------------------------

# name -> ("module:factory", fixed keyword arguments). Modules are imported on first build.
_REGISTRY: dict[str, tuple[str, dict[str, Any]]] = {
    "clip_score": ("rocm_ray.rewards.clip:CLIPScorer", {}),
    "pickscore": ("rocm_ray.rewards.clip:PickScoreScorer", {}),
    "hpsv2": ("rocm_ray.rewards.hps:HPSScorer", {"version": "v2.0"}),
    "hpsv21": ("rocm_ray.rewards.hps:HPSScorer", {"version": "v2.1"}),
    "imagereward": ("rocm_ray.rewards.imagereward:ImageRewardScorer", {}),
    "aesthetic": ("rocm_ray.rewards.aesthetic:AestheticScorer", {}),
    "jpeg_compressibility": ("rocm_ray.rewards.jpeg:JpegScorer", {"compressibility": True}),
    "jpeg_incompressibility": ("rocm_ray.rewards.jpeg:JpegScorer", {"compressibility": False}),
    # weight-free toy rewards for debugging runs and tests
    "toy_brightness": ("rocm_ray.rewards.toy:BrightnessReward", {}),
    "toy_redness": ("rocm_ray.rewards.toy:RednessReward", {}),
}

# Which registered rewards are differentiable (known without importing them).
_DIFFERENTIABLE = ("clip_score", "pickscore", "hpsv2", "hpsv21", "imagereward", "aesthetic", "toy_brightness",
                   "toy_redness")


def differentiable_names() -> tuple[str, ...]:
    """The registered rewards that are differentiable in the images (ROCM can use them)."""
    return _DIFFERENTIABLE


def is_differentiable_name(name: str) -> bool:
    """Whether the registered reward ``name`` is differentiable in the images (without building it)."""
    return name in _DIFFERENTIABLE


def available_scorers() -> list[str]:
    """The registry names ``build_scorer`` accepts."""
    return list(_REGISTRY)


def _factory(name: str) -> tuple[Callable[..., RewardScorer], dict[str, Any]]:
    if name not in _REGISTRY:
        raise ValueError(f"unknown reward {name!r}; choose one of: {', '.join(_REGISTRY)}")
    target, fixed = _REGISTRY[name]
    module_name, attr = target.split(":")
    return getattr(importlib.import_module(module_name), attr), fixed


def scorer_options(name: str) -> list[str]:
    """The keyword options a registered reward accepts beyond ``path``, ``device`` and ``dtype``."""
    factory, fixed = _factory(name)
    params = inspect.signature(factory).parameters
    return [p for p in params if p not in ("self", "path", "device", "dtype", *fixed)]


def build_scorer(
    name: str,
    path: str | Path | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str = torch.float32,
    **options: Any,
) -> RewardScorer:
    """Build a registered scorer by name, loading its weights once.

    ``path`` is a local file/folder, an ``embedded:...`` asset, or a Hugging Face id found in the local
    cache; ``None`` means the scorer's official default. ``options`` are the scorer's own keyword
    arguments (see ``scorer_options(name)``); an unknown one is an error that lists the allowed ones.
    """
    factory, fixed = _factory(name)
    allowed = scorer_options(name)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(
            f"reward {name!r} got unknown option(s) {', '.join(unknown)}; "
            f"allowed: {', '.join(allowed) or 'none'}"
        )
    return factory(path=path, device=device, dtype=resolve_dtype(dtype), **fixed, **options)


def require_differentiable(scorer: RewardScorer, algorithm: str = "rocm") -> None:
    """Raise a clear ``ValueError`` when a scorer cannot be backpropagated through.

    ROCM (and any reward-backprop method) needs d reward / d image; policy-gradient baselines do not.
    """
    if getattr(scorer, "differentiable", False):
        return
    culprits = [
        n for n, s in getattr(scorer, "components", {}).items() if not getattr(s, "differentiable", False)
    ] or [scorer.name]
    raise ValueError(
        f"reward {', '.join(repr(c) for c in culprits)} is not differentiable: "
        f"{algorithm.upper()} backpropagates through the reward; "
        f"use it with the policy-gradient baseline (algorithm.name: ppo) or choose one of "
        f"{', '.join(_DIFFERENTIABLE)}"
    )


# ----------------------------------------------------------------------------------------------
# Mixture.
# ----------------------------------------------------------------------------------------------


class RewardMixture:
    """A weighted sum of scorers, itself a scorer: ``r = sum_k w_k r_k``.

    Differentiable iff every part is. ``score_components`` returns each part's own (unweighted) reward,
    for logging; ``score`` the weighted sum. Weights are plain floats (not trained).
    """

    def __init__(self, parts: Iterable[tuple[RewardScorer, float]], name: str | None = None) -> None:
        parts = [(scorer, float(weight)) for scorer, weight in parts]
        if not parts:
            raise ValueError("RewardMixture needs at least one (scorer, weight) pair")
        names = [s.name for s, _ in parts]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(
                f"RewardMixture parts must have distinct names; repeated: {', '.join(duplicates)}"
            )
        self.parts = parts
        self.components = {s.name: s for s, _ in parts}
        self.weights = {s.name: w for s, w in parts}
        self.name = name or "+".join(f"{w:g}*{s.name}" for s, w in parts)
        self.differentiable = all(bool(s.differentiable) for s, _ in parts)

    def score_components(self, images: Tensor, prompts: Sequence[str]) -> dict[str, Tensor]:
        """Each part's reward ``[B]``, unweighted, keyed by the part's name."""
        check_batch(images, prompts)
        return {s.name: s.score(images, prompts) for s, _ in self.parts}

    def combine(self, components: dict[str, Tensor]) -> Tensor:
        """The weighted sum of already-computed components ``[B]``."""
        return sum(self.weights[n] * components[n].float() for n in self.weights)  # type: ignore[return-value]

    def score(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        """The weighted sum of the parts' rewards ``[B]``."""
        return self.combine(self.score_components(images, prompts))

    def __repr__(self) -> str:
        return f"RewardMixture({self.name!r}, differentiable={self.differentiable})"
