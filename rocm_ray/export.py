"""``rocm-ray export``: turn a run folder into something plain diffusers loads, with a model card.

* LoRA run, default: a LoRA folder, ``pipe.load_lora_weights(DIR)`` on the base pipeline. The adapter's
  rank, alpha and targets travel in the safetensors metadata. A base that only rocm_ray can build
  (``random:<seed>``, ``embedded:...``) is tiny and is shipped alongside in ``DIR/base/``, so the export
  loads without rocm_ray.
* LoRA run, ``--merge``: the whole pipeline (``save_pretrained``) with the LoRA fused into the UNet
  (``pipe.fuse_lora(); pipe.unload_lora_weights()``), verified: the fused UNet and the UNet reloaded from
  the folder must give the LoRA UNet's output on a fixed probe input.
* Full fine-tune: the whole pipeline with the fine-tuned UNet (``--merge`` changes nothing).
* LoRA run, ``--format kohya``: one ``<run name>.safetensors`` in the kohya key layout that ComfyUI,
  AUTOMATIC1111 / Forge, SD.Next and InvokeAI load (``lora_unet_<module>.lora_down/.lora_up/.alpha``),
  converted with diffusers' own ``convert_unet_state_dict_to_peft`` + ``convert_state_dict_to_kohya``; the
  ``.alpha`` tensors carry the run's ``lora_alpha`` (diffusers' converter writes alpha = rank, which would
  change the LoRA's scale). Verified: diffusers' kohya loader must read the file back to the same tensors,
  and the base UNet with the file loaded must give the run's UNet output on a fixed probe input.

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

from rocm_ray.loading import (
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
    quiet_hf,
    read_lora,
    resolve_device,
    write_lora,
)

ROCM_RAY_ONLY_BASES = ("random:", "embedded:")  # bases that plain diffusers cannot load by name
FORMATS = ("diffusers", "kohya")


@dataclass
class ExportResult:
    path: Path
    kind: str  # "lora" | "merged" | "full" | "kohya"
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


# ------------------------------------------------------------------------------------------- kohya


def to_kohya(unet_lora: dict[str, Tensor], alpha: float) -> dict[str, Tensor]:
    """A UNet LoRA (diffusers names, as :func:`read_lora` returns) in the kohya layout the UIs load.

    ``lora_unet_down_blocks_0_..._to_q.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha`` (ComfyUI and
    A1111/Forge map these diffusers module names to their own). The conversion is diffusers' own; only the
    ``.alpha`` values are set here, to the run's ``lora_alpha`` (kohya scales the update by alpha / rank).
    """
    from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya, convert_unet_state_dict_to_peft

    peft_sd = convert_unet_state_dict_to_peft(dict(unet_lora))  # ...to_q.lora_A.weight
    kohya = convert_state_dict_to_kohya({f"unet.{k}": v for k, v in peft_sd.items()})
    out: dict[str, Tensor] = {}
    for k, v in kohya.items():
        out[k] = torch.tensor(float(alpha), dtype=torch.float32) if k.endswith(".alpha") else v.contiguous()
    if not any(k.startswith("lora_unet_") for k in out):
        raise RuntimeError("kohya conversion produced no lora_unet_ keys; the run's LoRA layout is not supported")
    return out


def from_kohya(path: str | Path) -> tuple[dict[str, Tensor], dict[str, float]]:
    """Read a kohya LoRA file back with diffusers' own kohya loader: (peft-named UNet LoRA, alpha per module).

    Used to verify an export (and by the round-trip test); the tensors are as the file holds them.
    """
    from diffusers import LatentConsistencyModelPipeline
    from diffusers.utils.state_dict_utils import convert_unet_state_dict_to_peft

    with quiet_hf():
        sd, alphas = LatentConsistencyModelPipeline.lora_state_dict(str(path))
    unet_sd = {k.removeprefix("unet."): v for k, v in sd.items() if k.startswith("unet.")}
    peft_sd = convert_unet_state_dict_to_peft(unet_sd)  # processor.to_q_lora.down -> to_q.lora_A (the UNet's)
    module_alpha = {}
    for k, a in (alphas or {}).items():
        name = convert_unet_state_dict_to_peft({k.removeprefix("unet.").removesuffix(".alpha"): torch.zeros(1)})
        module_alpha[next(iter(name)).removesuffix(".lora_A.weight")] = float(a)
    return peft_sd, module_alpha


def _kohya_metadata(src: ModelSource, meta: dict[str, Any]) -> dict[str, str]:
    """The safetensors header fields kohya's sd-scripts write that UIs show (strings only)."""
    info = {"ss_network_module": "networks.lora", "ss_network_dim": str(int(meta["r"])),
            "ss_network_alpha": str(float(meta["lora_alpha"])), "ss_output_name": src.path.name,
            "ss_training_comment": f"rocm_ray: ROCM fine-tune of {src.base}"}
    if src.base and not src.base.startswith(ROCM_RAY_ONLY_BASES):
        info["ss_sd_model_name"] = src.base
    return info


def _export_kohya(src: ModelSource, tmp: Path, device: str, verify: dict[str, float]) -> str:
    """Write ``<run name>.safetensors`` (kohya layout) into ``tmp``, verified; returns the file name."""
    from safetensors.torch import save_file

    sd, meta = read_lora(src.weights)
    meta = meta or lora_metadata_from_recipe(src.model_cfg)
    kohya = to_kohya(sd, float(meta["lora_alpha"]))
    name = f"{src.path.name}.safetensors"
    save_file(kohya, str(tmp / name), metadata=_kohya_metadata(src, meta))
    # 1) the file reads back (diffusers' kohya loader) to exactly the run's tensors and alpha
    back, alphas = from_kohya(tmp / name)
    from diffusers.utils.state_dict_utils import convert_unet_state_dict_to_peft

    ref = convert_unet_state_dict_to_peft(dict(sd))
    if set(back) != set(ref) or any(not torch.equal(back[k], ref[k]) for k in ref):
        raise RuntimeError("kohya export verification failed: the file does not read back to the run's LoRA")
    if any(a != float(meta["lora_alpha"]) for a in alphas.values()) or len(alphas) != len(ref) // 2:
        raise RuntimeError(f"kohya export verification failed: alphas {sorted(set(alphas.values()))} != "
                           f"lora_alpha {meta['lora_alpha']}")
    verify["kohya_readback"] = 0.0
    # 2) the base UNet with the kohya file loaded gives the run's UNet output (alpha / rank honoured)
    pipe = load_base_pipeline(src.base, src.base_options, device)
    load_lora(pipe, src)
    want = unet_probe(pipe.unet)
    pipe.unload_lora_weights()
    with quiet_hf():
        pipe.load_lora_weights(str(tmp / name))
    _check("kohya_vs_run", unet_probe(pipe.unet), want, pipe.unet.dtype, verify)
    return name


def export_run(run: str | Path, out: str | Path, merge: bool = False, force: bool = False,
               device: str = "cpu", format: str = "diffusers") -> ExportResult:
    """Export the run folder ``run`` to ``out`` (see the module docstring).

    ``format``: ``diffusers`` (a LoRA folder for ``load_lora_weights``, or with ``merge`` a pipeline) or
    ``kohya`` (one LoRA file for ComfyUI / A1111 / Forge).
    """
    if format not in FORMATS:
        raise UseError(f"--format {format!r}: expected one of {', '.join(FORMATS)}")
    src = describe_source(run)
    if not src.is_run:
        raise UseError(f"{src.path} is a model folder, not a run folder: export takes what `rocm-ray train` "
                       "wrote (recipe.json + weights/)")
    if format == "kohya" and (merge or src.kind != "lora"):
        raise UseError(f"--format kohya writes a LoRA file; {'--merge' if merge else 'a full fine-tune'} makes a "
                       "whole pipeline: drop --format kohya (diffusers) or export a LoRA run without --merge")
    out = Path(out)
    check_target(out, force)
    device = resolve_device(device)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    verify: dict[str, float] = {}
    kohya_file = None
    try:
        if format == "kohya":
            kind = "kohya"
            kohya_file = _export_kohya(src, tmp, device, verify)
        elif src.kind == "lora" and not merge:
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
        if kohya_file:
            info["file"] = kohya_file
        (tmp / EXPORT_INFO).write_text(json.dumps(info, indent=2) + "\n")
        (tmp / "README.md").write_text(model_card(src, kind, out, verify, (tmp / EXPORT_BASE).is_dir(), kohya_file))
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


def model_card(src: ModelSource, kind: str, out: Path, verify: dict[str, float], base_in_folder: bool,
               kohya_file: str | None = None) -> str:
    """README.md of an export: what the model is, how it was trained, its final metrics, how to load it."""
    recipe = src.recipe or {}
    model, alg = recipe.get("model", {}), recipe.get("algorithm", {})
    train, reward = recipe.get("train", {}), recipe.get("reward", {})
    summary = src.summary or {}
    base = src.base or "unknown"
    portable_base = not base.startswith(ROCM_RAY_ONLY_BASES) and not Path(base).exists()
    tags = ["latent-consistency-model", "lcm", "rlhf", "rocm", "rocm_ray"]
    tags += ["lora"] if kind in ("lora", "kohya") else []
    front = {"library_name": "diffusers", "tags": tags}
    if portable_base:
        front["base_model"] = base
    name = recipe.get("name", src.path.name)
    if kind in ("lora", "kohya"):
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
    if kind == "kohya":
        load = (f"pipe = LatentConsistencyModelPipeline.from_pretrained(\"{base}\")\n"
                f'pipe.load_lora_weights("{folder}/{kohya_file}")  # diffusers reads the kohya layout too')
    elif kind == "lora":
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
             "kohya": f"- `{kohya_file}`: the UNet LoRA in the kohya layout: copy it into ComfyUI's "
                      "`models/loras/` or A1111/Forge's `models/Lora/` and use it with the base model above\n",
             "merged": f"{parts} (`save_pretrained`) with the LoRA fused\n",
             "full": f"{parts} (`save_pretrained`) with the fine-tuned UNet\n"}[kind]
    sample_src = src.path if kind == "kohya" else folder  # rocm-ray sample reads the run, not a kohya file
    same_seed = (f"The same seed gives the same image as `rocm-ray sample {sample_src} --prompt \"...\" --seed 0 "
                 f"--steps {steps}`.")
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

{same_seed}

## Files

{files}- `rocm_ray_export.json`: the training recipe and summary (read by `rocm-ray sample` / `rocm-ray eval`)
- `README.md`: this card
{checks}
## Training recipe

```yaml
{_yaml(recipe)}
```
"""


# ------------------------------------------------------------------------------------------- CLI


def cmd_export(args) -> int:
    with quiet_hf():
        res = export_run(args.run, args.out, merge=args.merge, force=args.force, device=args.device,
                         format=args.format)
    checks = ", ".join(f"{k} {v:.2e}" for k, v in res.verify.items())
    print(f"rocm-ray export: {res.kind} -> {res.path}/" + (f" (verified, max abs diff: {checks})" if checks else ""),
          flush=True)
    return 0


def register_cli(subparsers) -> None:
    """Add ``export`` to the ``rocm-ray`` command line."""
    x = subparsers.add_parser("export", help="a LoRA for diffusers or ComfyUI/A1111 (kohya), or a merged pipeline")
    x.add_argument("run", help="run folder (outputs/<name>)")
    x.add_argument("--out", required=True, help="output folder (must be empty or absent unless --force)")
    x.add_argument("--format", choices=FORMATS, default="diffusers",
                   help="diffusers: load_lora_weights folder (default); kohya: one .safetensors for ComfyUI, "
                        "A1111/Forge")
    x.add_argument("--merge", action="store_true", help="fuse the LoRA into the UNet, save a pipeline")
    x.add_argument("--force", action="store_true", help="replace a non-empty output folder")
    x.add_argument("--device", default="cpu", help="device for merging and verifying (cpu | cuda | auto)")
    x.set_defaults(func=cmd_export)
