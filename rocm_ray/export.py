"""``rocm-ray export``: turn a run folder into something plain diffusers loads, with a model card.

* LoRA run, default: a LoRA folder, ``pipe.load_lora_weights(DIR)`` on the base pipeline. The adapter's
  rank, alpha and targets travel in the safetensors metadata. A base that only rocm_ray can build
  (``random:<seed>``, ``embedded:...``) is tiny and is shipped alongside in ``DIR/base/``, so the export
  loads without rocm_ray.
* LoRA run, ``--merge``: the whole pipeline (``save_pretrained``) with the LoRA fused into the UNet
  (``pipe.fuse_lora(); pipe.unload_lora_weights()``), verified: the fused UNet and the UNet reloaded from
  the folder must give the LoRA UNet's output on a fixed probe input.
* Full fine-tune: the whole pipeline with the fine-tuned UNet (``--merge`` changes nothing).

Every export has ``README.md`` (a model card: base, recipe, rewards, regularizer, beta, steps, final
metrics, how to load) and ``rocm_ray_export.json`` (the recipe and summary, so ``rocm-ray sample`` and
``rocm-ray eval`` can use the folder and find its base). The folder is written to a temporary sibling and
renamed into place; a non-empty ``--out`` is refused unless ``--force``.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from rocm_ray.use import (
    EXPORT_BASE,
    EXPORT_INFO,
    LORA_FILE,
    ModelSource,
    UseError,
    describe_source,
    load_base_pipeline,
    load_lora,
    load_model,
    lora_metadata_from_recipe,
    read_lora,
    resolve_device,
    write_lora,
)

ROCM_RAY_ONLY_BASES = ("random:", "embedded:")  # bases that plain diffusers cannot load by name


@dataclass
class ExportResult:
    path: Path
    kind: str  # "lora" | "merged" | "full"
    verify: dict[str, float] = field(default_factory=dict)  # max abs differences of the probe checks


def check_target(out: Path, force: bool) -> None:
    """Refuse a file, or a non-empty folder without ``force``."""
    if out.exists() and not out.is_dir():
        raise UseError(f"--out {out} is a file; give a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise UseError(f"--out {out} is not empty; choose another folder or pass --force to replace it")


def _finalize(tmp: Path, out: Path, force: bool) -> None:
    """Move the finished temporary folder into place (the old folder is removed only afterwards)."""
    check_target(out, force)
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


@torch.no_grad()
def unet_probe(unet, seed: int = 0) -> Tensor:
    """The UNet's output on a fixed random input at its native size: a cheap, exact check of its weights."""
    cfg = unet.config
    g = torch.Generator().manual_seed(seed)
    size = cfg.sample_size if isinstance(cfg.sample_size, int) else tuple(cfg.sample_size)[0]
    p = next(unet.parameters())
    x = torch.randn(1, cfg.in_channels, size, size, generator=g)  # [1, C, h, w]
    text = torch.randn(1, 8, cfg.cross_attention_dim, generator=g)  # [1, L, E]
    cond = torch.randn(1, cfg.time_cond_proj_dim, generator=g) if cfg.time_cond_proj_dim else None  # [1, D]
    cond = None if cond is None else cond.to(p.device, p.dtype)
    text = text.to(p.device, p.dtype)
    x = x.to(p.device, p.dtype)
    out = unet(x, 499, timestep_cond=cond, encoder_hidden_states=text, return_dict=False)[0]
    return out.float().cpu()  # [1, C, h, w]


def _tolerance(ref: Tensor, dtype: torch.dtype) -> float:
    rel = 1e-4 if dtype == torch.float32 else 2e-2
    return rel * max(1.0, float(ref.abs().max()))


def _check(name: str, got: Tensor, ref: Tensor, dtype: torch.dtype, verify: dict[str, float]) -> None:
    diff = float((got - ref).abs().max())
    verify[name] = diff
    if not diff <= _tolerance(ref, dtype):
        raise RuntimeError(f"export verification failed: {name}: max abs difference {diff:.3g} of the UNet "
                           f"output exceeds {_tolerance(ref, dtype):.3g}; the exported weights do not "
                           "reproduce the run")


def export_run(run: str | Path, out: str | Path, merge: bool = False, force: bool = False,
               device: str = "cpu") -> ExportResult:
    """Export the run folder ``run`` to ``out`` (see the module docstring)."""
    src = describe_source(run)
    if not src.is_run:
        raise UseError(f"{src.path} is a model folder, not a run folder: export takes what `rocm-ray train` "
                       "wrote (recipe.json + weights/)")
    out = Path(out)
    check_target(out, force)
    device = resolve_device(device)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    verify: dict[str, float] = {}
    try:
        if src.kind == "lora" and not merge:
            kind = "lora"
            sd, meta = read_lora(src.weights)
            write_lora(sd, tmp, meta or lora_metadata_from_recipe(src.model_cfg))
            if src.base.startswith(ROCM_RAY_ONLY_BASES):
                load_base_pipeline(src.base, src.base_options, device).save_pretrained(
                    str(tmp / EXPORT_BASE), safe_serialization=True)
        elif src.kind == "lora":
            kind = "merged"
            pipe = load_base_pipeline(src.base, src.base_options, device)
            load_lora(pipe, src)
            dtype = pipe.unet.dtype
            ref = unet_probe(pipe.unet)  # the run's model: base + LoRA
            pipe.fuse_lora(components=["unet"], lora_scale=1.0)
            pipe.unload_lora_weights()
            leftover = [n for n, _ in pipe.unet.named_parameters() if "lora" in n]
            if leftover:
                raise RuntimeError(f"LoRA layers remain after fuse + unload: {leftover[:3]}")
            _check("fused_vs_lora", unet_probe(pipe.unet), ref, dtype, verify)
            pipe.save_pretrained(str(tmp), safe_serialization=True)
            _check_reload(tmp, ref, dtype, device, verify)
        else:
            kind = "full"
            loaded = load_model(src, device)
            dtype = loaded.pipe.unet.dtype
            ref = unet_probe(loaded.pipe.unet)
            loaded.pipe.save_pretrained(str(tmp), safe_serialization=True)
            _check_reload(tmp, ref, dtype, device, verify)
        info = {"format": "rocm_ray export 1", "kind": kind, "run": str(src.path.resolve()),
                "base_model": src.base, "base_options": src.base_options,
                "base_in_folder": (tmp / EXPORT_BASE).is_dir(), "verify": verify,
                "recipe": src.recipe, "summary": src.summary}
        (tmp / EXPORT_INFO).write_text(json.dumps(info, indent=2) + "\n")
        (tmp / "README.md").write_text(model_card(src, kind, out, verify, (tmp / EXPORT_BASE).is_dir()))
        _finalize(tmp, out, force)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ExportResult(out, kind, verify)


def _check_reload(folder: Path, ref: Tensor, dtype: torch.dtype, device: str,
                  verify: dict[str, float]) -> None:
    """Reload the saved pipeline with plain diffusers and compare its UNet with the reference."""
    from diffusers import LatentConsistencyModelPipeline

    pipe = LatentConsistencyModelPipeline.from_pretrained(str(folder), dtype=dtype).to(device)
    _check("reloaded_vs_lora" if "fused_vs_lora" in verify else "reloaded_vs_run", unet_probe(pipe.unet), ref,
           dtype, verify)


# ------------------------------------------------------------------------------------------- model card


def _yaml(data: Any) -> str:
    import yaml

    return yaml.safe_dump(data, sort_keys=False, default_flow_style=None, width=100).rstrip()


def model_card(src: ModelSource, kind: str, out: Path, verify: dict[str, float], base_in_folder: bool) -> str:
    """README.md of an export: what the model is, how it was trained, its final metrics, how to load it."""
    recipe = src.recipe or {}
    model, alg = recipe.get("model", {}), recipe.get("algorithm", {})
    train, reward = recipe.get("train", {}), recipe.get("reward", {})
    summary = src.summary or {}
    base = src.base or "unknown"
    portable_base = not base.startswith(ROCM_RAY_ONLY_BASES) and not Path(base).exists()
    tags = ["latent-consistency-model", "lcm", "rlhf", "rocm", "rocm_ray"]
    tags += ["lora"] if kind == "lora" else []
    front = {"library_name": "diffusers", "tags": tags}
    if portable_base:
        front["base_model"] = base
    name = recipe.get("name", src.path.name)
    if kind == "lora":
        adapt = (f"LoRA rank {model.get('lora_rank')}, alpha {model.get('lora_alpha')}, on "
                 f"{', '.join(model.get('lora_targets', []))} of the UNet")
    elif kind == "merged":
        adapt = (f"LoRA rank {model.get('lora_rank')}, alpha {model.get('lora_alpha')}, fused into the UNet "
                 "(this folder is the whole pipeline)")
    else:
        adapt = "full fine-tuning of the UNet (this folder is the whole pipeline)"
    rewards = reward.get("models", [])
    reward_lines = "\n".join(
        f"  - `{m.get('name')}` weight {m.get('weight')}" + (f", path `{m['path']}`" if m.get("path") else "")
        + (f", head `{m['head_path']}`" if m.get("head_path") else "") for m in rewards) or "  - unknown"
    steps, guidance = alg.get("num_inference_steps", 4), alg.get("guidance_scale", 8.0)
    if base.startswith("random:"):
        base_note = (f"`{base}`: a random-weight toy LCM that rocm_ray rebuilds from its seed "
                     "(`rocm_ray.models.policy.load_pipeline`)")
    elif base.startswith("embedded:"):
        base_note = f"`{base}`: the tiny LCM that ships inside rocm_ray (rocm_ray/assets/)"
    else:
        base_note = f"`{base}`"
    folder = str(out)
    if kind == "lora":
        base_load = f'"{folder}/{EXPORT_BASE}"' if base_in_folder else f'"{base}"'
        load = (f"pipe = LatentConsistencyModelPipeline.from_pretrained({base_load})"
                + ("  # the base, shipped in this folder" if base_in_folder else "") + "\n"
                f'pipe.load_lora_weights("{folder}")')
    else:
        load = f'pipe = LatentConsistencyModelPipeline.from_pretrained("{folder}")'
    metrics = "\n".join(f"| {k} | {v:.6g} |" if isinstance(v, float) else f"| {k} | {v} |"
                        for k, v in summary.items()) or "| (no summary.json) | |"
    checks = "\n".join(f"- {k}: max abs difference {v:.2e} of the UNet output on a fixed probe input"
                       for k, v in verify.items())
    checks = f"\n## Verification\n\n{checks}\n" if checks else ""
    parts = "- `model_index.json`, `unet/`, `vae/`, `text_encoder/`, `tokenizer/`, `scheduler/`: the pipeline"
    shipped = f"- `{EXPORT_BASE}/`: the base pipeline (`save_pretrained`)\n" if base_in_folder else ""
    files = {"lora": f"- `{LORA_FILE}`: the UNet LoRA (diffusers naming; rank, alpha in its metadata)\n"
                     f"{shipped}",
             "merged": f"{parts} (`save_pretrained`) with the LoRA fused\n",
             "full": f"{parts} (`save_pretrained`) with the fine-tuned UNet\n"}[kind]
    reg = (f"`{alg.get('regularizer')}`, beta {alg.get('beta')} ({alg.get('reduction')} reduction, "
           f"terminal step: {alg.get('terminal')})")
    training = (f"{train.get('steps')} steps x {train.get('batch_size')} images, lr {train.get('lr')}, "
                f"seed {train.get('seed')}")
    return f"""---
{_yaml(front)}
---

# {name}: a latent consistency model fine-tuned with regularized ROCM

Fine-tuned with rocm_ray by direct reward optimization through the whole
{steps}-step consistency sampling trajectory (ROCM, Shekhar & Zhang, arXiv 2503.06171), regularized by a
divergence between the fine-tuned and the frozen base model's step kernels.

| | |
|---|---|
| base model | {base_note} |
| adaptation | {adapt} |
| regularizer | {reg} |
| training | {training} |
| sampling | {steps} steps, guidance scale {guidance}, truncated backprop: {alg.get('truncate_steps')} |
| reward scale | {reward.get('scale')} |

Reward model(s):
{reward_lines}

## Final metrics (summary.json)

| metric | value |
|---|---|
{metrics}

## How to load it in diffusers

```python
import torch
from diffusers import LatentConsistencyModelPipeline

{load}
image = pipe("a handwritten digit 7", num_inference_steps={steps}, guidance_scale={guidance},
             generator=torch.Generator().manual_seed(0)).images[0]
```

The same seed gives the same image as `rocm-ray sample {folder} --prompt "..." --seed 0 --steps {steps}`.

## Files

{files}- `rocm_ray_export.json`: the training recipe and summary (read by `rocm-ray sample` / `rocm-ray eval`)
- `README.md`: this card
{checks}
## Training recipe

```yaml
{_yaml(recipe)}
```
"""
