"""Finding and loading what a run produced: run folders, model folders, LoRA files, base pipelines.

Shared by ``rocm-ray sample`` / ``eval`` (:mod:`rocm_ray.use`), ``rocm-ray export`` (:mod:`rocm_ray.export`)
and the Python API (``rocm_ray.load_model``), so that neither command module imports the other.

A *run folder* (what ``rocm-ray train`` writes: ``recipe.json`` + ``weights/``) is loaded as its base model
(``recipe.json`` ``model.pretrained``; a ``random:<seed>`` base is rebuilt from its seed) plus its LoRA
(``pipe.load_lora_weights(<run>/weights/lora)``) or its fully fine-tuned UNet (``<run>/weights/unet``).
A *model folder* is a diffusers pipeline folder (``model_index.json``, e.g. ``rocm-ray export --merge``) or
a LoRA export (``pytorch_lora_weights.safetensors`` + ``rocm_ray_export.json``).
"""

from __future__ import annotations

import contextlib
import json
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

RUN_RECIPE = "recipe.json"
RUN_SUMMARY = "summary.json"
RUN_LORA = Path("weights") / "lora"
RUN_UNET = Path("weights") / "unet"
LORA_FILE = "pytorch_lora_weights.safetensors"
EXPORT_INFO = "rocm_ray_export.json"
EXPORT_BASE = "base"  # a LoRA export of a random:<seed> base carries the base pipeline here
MODEL_LABELS = ("base", "fine-tuned")


class UseError(ValueError):
    """Bad input to sample / eval / export (a missing folder, no prompts, an occupied output folder).

    The CLI prints the message as one ``error:`` line and exits with code 2.
    """


# ------------------------------------------------------------------------------------------- locating


@dataclass
class ModelSource:
    """What a run or model folder holds, and how to rebuild its base model."""

    path: Path
    kind: Literal["lora", "full", "pipeline"]
    weights: Path  # the LoRA folder, the UNet folder, or the pipeline folder itself
    base: str | None  # load_pipeline spec of the base model (None: unknown)
    base_options: dict[str, Any] = field(default_factory=dict)  # revision, cache_dir, dtype
    recipe: dict | None = None  # the training recipe (recipe.json, or recorded by an export)
    summary: dict | None = None  # the run's summary.json (or recorded by an export)
    is_run: bool = False

    @property
    def model_cfg(self) -> dict:
        return (self.recipe or {}).get("model", {})

    @property
    def algorithm_cfg(self) -> dict:
        return (self.recipe or {}).get("algorithm", {})


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UseError(f"cannot read {path}: {e}") from None


def _base_of(recipe: dict | None) -> tuple[str | None, dict[str, Any]]:
    model = (recipe or {}).get("model", {})
    opts = {k: model[k] for k in ("revision", "cache_dir", "dtype") if model.get(k) is not None}
    return model.get("pretrained"), opts


def describe_source(path: str | Path) -> ModelSource:
    """Classify ``path`` as a run or model folder; else raise :class:`UseError` saying what is expected."""
    p = Path(path)
    if not p.exists():
        raise UseError(f"{p}: no such run or model folder (give a folder written by `rocm-ray train`, "
                       "`rocm-ray export`, or a diffusers pipeline folder with model_index.json)")
    if not p.is_dir():
        raise UseError(f"{p} is a file; expected a run folder or a model folder")
    summary = _read_json(p / RUN_SUMMARY) if (p / RUN_SUMMARY).is_file() else None
    if (p / RUN_RECIPE).is_file():
        recipe = _read_json(p / RUN_RECIPE)
        base, opts = _base_of(recipe)
        if (p / RUN_LORA / LORA_FILE).is_file():
            kind, weights = "lora", p / RUN_LORA
        elif (p / RUN_UNET / "config.json").is_file():
            kind, weights = "full", p / RUN_UNET
        else:
            raise UseError(f"run folder {p} has no weights yet ({RUN_LORA / LORA_FILE} or {RUN_UNET}/): "
                           "training has not finished or was interrupted before saving")
        if not base:
            raise UseError(f"{p / RUN_RECIPE} does not name the base model (model.pretrained)")
        return ModelSource(p, kind, weights, base, opts, recipe, summary, is_run=True)
    info = _read_json(p / EXPORT_INFO) if (p / EXPORT_INFO).is_file() else {}
    recipe = info.get("recipe")
    summary = info.get("summary", summary)
    base, opts = _base_of(recipe)
    if (p / "model_index.json").is_file():
        return ModelSource(p, "pipeline", p, base, opts, recipe, summary)
    if (p / LORA_FILE).is_file():
        if (p / EXPORT_BASE / "model_index.json").is_file():
            base, opts = str(p / EXPORT_BASE), {}
        if not base:
            raise UseError(f"{p} holds a LoRA but not which base model it belongs to ({EXPORT_INFO} is "
                           "missing or has no recipe.model.pretrained)")
        return ModelSource(p, "lora", p, base, opts, recipe, summary)
    raise UseError(f"{p} is neither a run folder ({RUN_RECIPE} + weights/) nor a model folder "
                   f"(model_index.json, or {LORA_FILE} + {EXPORT_INFO})")


# ------------------------------------------------------------------------------------------- loading


@contextlib.contextmanager
def quiet_hf() -> Iterator[None]:
    """Mute diffusers / transformers warnings and progress bars while loading and saving.

    Loading a UNet-only LoRA makes diffusers warn that the text encoder got none, and every
    (re)load or save draws progress bars: noise around commands whose own output is one line.
    """
    import diffusers.utils.logging as dl
    import transformers.utils.logging as tl

    saved = [(m, m.get_verbosity(), m.is_progress_bar_enabled()) for m in (dl, tl)]
    for m, _, _ in saved:
        m.set_verbosity_error()
        m.disable_progress_bar()
    try:
        yield
    finally:
        for m, level, bar in saved:
            m.set_verbosity(level)
            if bar:
                m.enable_progress_bar()


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when available, else ``cpu``; anything else unchanged."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def lora_metadata_from_recipe(model_cfg: dict) -> dict[str, Any]:
    """The peft ``LoraConfig`` fields of a run's adapter, from its recipe (``model.lora_*``)."""
    rank = int(model_cfg.get("lora_rank", 8))
    return {"r": rank, "lora_alpha": float(model_cfg.get("lora_alpha", rank)),
            "target_modules": list(model_cfg.get("lora_targets", ["to_q", "to_k", "to_v", "to_out.0"])),
            "init_lora_weights": "gaussian"}


def read_lora(lora_dir: Path) -> tuple[dict[str, Tensor], dict[str, Any] | None]:
    """The UNet LoRA weights (diffusers names without ``unet.``) and the adapter metadata, if any."""
    from safetensors import safe_open

    file = lora_dir / LORA_FILE
    if not file.is_file():
        raise UseError(f"no LoRA weights at {file}")
    with safe_open(str(file), "pt") as f:
        meta = f.metadata() or {}
        sd = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    unet_sd = {k.removeprefix("unet."): v for k, v in sd.items() if k.startswith("unet.")}
    if len(unet_sd) != len(sd):
        raise UseError(f"{file} holds non-UNet LoRA weights ({len(sd) - len(unet_sd)} tensors); rocm_ray "
                       "trains UNet LoRAs only")
    adapter = None
    if "lora_adapter_metadata" in meta:
        full = json.loads(meta["lora_adapter_metadata"])
        adapter = {k.removeprefix("unet."): v for k, v in full.items() if k.startswith("unet.")} or full
    return unet_sd, adapter


def write_lora(state_dict: dict[str, Tensor], out_dir: Path, adapter_metadata: dict[str, Any]) -> Path:
    """Write a UNet LoRA that ``pipe.load_lora_weights(out_dir)`` loads with the right rank and alpha."""
    from diffusers import LatentConsistencyModelPipeline

    layers = {k: v.contiguous() for k, v in state_dict.items()}
    LatentConsistencyModelPipeline.save_lora_weights(
        str(out_dir), unet_lora_layers=layers, safe_serialization=True,
        unet_lora_adapter_metadata=dict(adapter_metadata))
    return out_dir / LORA_FILE


def load_lora(pipe, src: ModelSource) -> None:
    """``pipe.load_lora_weights`` of the source's LoRA.

    A run saved before LoRA files carried their adapter metadata gets it from its recipe (else diffusers
    would assume alpha = rank and scale the update wrongly).
    """
    sd, meta = read_lora(src.weights)
    with quiet_hf():
        if meta is not None:
            pipe.load_lora_weights(str(src.weights))
            return
        with tempfile.TemporaryDirectory(prefix="rocm_ray_lora_") as tmp:
            write_lora(sd, Path(tmp), lora_metadata_from_recipe(src.model_cfg))
            pipe.load_lora_weights(tmp)


def load_base_pipeline(spec: str, options: dict[str, Any] | None = None, device: str = "cpu"):
    """A base LCM pipeline from a ``model.pretrained`` spec (folder, HF id, ``embedded:``, ``random:<seed>``).
    """
    from rocm_ray.models.policy import load_pipeline

    o = options or {}
    return load_pipeline(spec, o.get("revision"), o.get("cache_dir"), o.get("dtype", "float32"), device)


@dataclass
class LoadedModel:
    """The fine-tuned pipeline of a run or model folder, and access to its base for comparisons."""

    source: ModelSource
    pipe: Any  # the fine-tuned LatentConsistencyModelPipeline
    device: str
    base_spec: str | None  # what the comparison base is (for reports)
    _base_pipe: Any = None
    _lora_toggle: bool = False  # the base is ``pipe`` with its LoRA disabled

    @contextlib.contextmanager
    def base_pipeline(self) -> Iterator[Any]:
        """The base model as a pipeline, for the duration of the ``with`` block."""
        if self._lora_toggle:
            self.pipe.disable_lora()
            try:
                yield self.pipe
            finally:
                self.pipe.enable_lora()
            return
        if self._base_pipe is None:
            if self.base_spec is None:
                raise UseError(f"{self.source.path}: the base model is unknown (a diffusers folder without "
                               f"{EXPORT_INFO}); give it as base_model=<folder, HF id or embedded:...>")
            opts = self.source.base_options if self.base_spec == self.source.base else {}
            self._base_pipe = load_base_pipeline(self.base_spec, opts, self.device)
        yield self._base_pipe


def load_model(path: str | Path | ModelSource, device: str = "cpu", base_model: str = "auto") -> LoadedModel:
    """Load a run or model folder as a fine-tuned pipeline (see the module docstring).

    ``base_model``: ``auto`` compares against the run's own base (or what an export recorded); any other
    value is a pipeline spec to compare against instead.
    """
    from diffusers import LatentConsistencyModelPipeline, UNet2DConditionModel

    from rocm_ray.models.policy import DTYPES, load_pipeline

    src = path if isinstance(path, ModelSource) else describe_source(path)
    device = resolve_device(device)
    explicit = base_model not in ("auto", "", None)
    base_spec = base_model if explicit else src.base
    if src.kind == "lora":
        pipe = load_base_pipeline(src.base, src.base_options, device)
        load_lora(pipe, src)
        return LoadedModel(src, pipe, device, base_spec, _lora_toggle=not explicit)
    if src.kind == "full":
        base = load_base_pipeline(src.base, src.base_options, device)
        dtype = DTYPES[src.base_options.get("dtype", "float32")]
        unet = UNet2DConditionModel.from_pretrained(str(src.weights), dtype=dtype).to(device).eval()
        parts = {**base.components, "unet": unet, "requires_safety_checker": False}
        pipe = LatentConsistencyModelPipeline(**parts)
        pipe.set_progress_bar_config(disable=True)
        return LoadedModel(src, pipe, device, base_spec, _base_pipe=None if explicit else base)
    pipe = load_pipeline(str(src.weights), dtype=src.base_options.get("dtype", "float32"), device=device)
    return LoadedModel(src, pipe, device, base_spec)
