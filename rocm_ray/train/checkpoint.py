"""Checkpoints that cannot tear, and resumes that honour a changed recipe.

A checkpoint folder (Ray: ``<location>/ray/<name>/checkpoint_<step>/``; in-process:
``<location>/checkpoints/checkpoint_<step>/``) holds ``state.json`` (step, metrics rows, the recipe and its
fingerprint), ``trainable.safetensors`` (the full trainable weights), ``optimizer.safetensors`` (the full
AdamW moments by parameter name: independent of the number of workers and the ZeRO stage), the DeepSpeed
``engine/`` shards (Ray only), RNG states, and one ``manifest_rank<r>.json`` per rank listing the files
that rank wrote with their sizes.

A checkpoint counts only when it is **complete**: on the Ray path it must be registered in Ray Train's
``checkpoint_manager_snapshot.json`` (Ray writes that only after every worker reported it), and every
rank's manifest must be present with every listed file at its size; in-process the manifest is written
last. So a folder that rank 0 wrote alone, a checkpoint being uploaded when the driver died, or one with a
rank's files removed is never picked.

Resume: :func:`check_resume` compares the recipe with the checkpoint's. Keys that change what the state
means (the model, LoRA shape, the regularizer and the sampler's shape) are refused; every other change
(lr, betas, weight decay, clipping, beta, steps, workers, ZeRO stage, ...) is applied and printed.
"""

from __future__ import annotations

import hashlib
import json
import re
import tempfile
from pathlib import Path
from typing import Any

import torch

from rocm_ray.config import Recipe
from rocm_ray.train.storage import RunStorage, StorageError

STATE_FILE = "state.json"
WEIGHTS_FILE = "trainable.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train V2's registry of reported checkpoints
INPROCESS_DIR = "checkpoints"

# keys a resume cannot honour: the trained state would mean something else
INCOMPATIBLE = ("model.pretrained", "model.revision", "model.dtype", "model.lora_rank", "model.lora_alpha",
                "model.lora_targets", "algorithm.regularizer", "algorithm.reduction", "algorithm.terminal",
                "algorithm.num_inference_steps")
# keys that never matter to a resume (where and how it is run / logged)
IGNORED_PREFIXES = ("name", "train.output_dir", "ray.", "tune.", "logging.", "train.max_failures",
                    "train.cpu_threads", "train.checkpoint_every")


def checkpoint_dir_name(step: int) -> str:
    return f"checkpoint_{step:06d}"


def is_checkpoint_name(name: str) -> bool:
    """A checkpoint folder's name (``checkpoint_000004``; not Ray's ``checkpoint_manager_snapshot.json``)."""
    return re.fullmatch(r"checkpoint_\d+", name) is not None


def manifest_name(rank: int) -> str:
    return f"manifest_rank{rank}.json"


def _flat(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and k not in ("reward_resources", "worker_resources", "search_space"):
            out.update(_flat(v, key + "."))
        else:
            out[key] = v
    return out


def recipe_keys(recipe: Recipe) -> dict[str, Any]:
    """The recipe as flat ``dotted.key -> value``, without the keys that never matter to a resume."""
    return {k: v for k, v in _flat(recipe.to_dict()).items() if not k.startswith(IGNORED_PREFIXES)}


def fingerprint(recipe: Recipe) -> str:
    """A hash of the keys a resume cannot change (:data:`INCOMPATIBLE`)."""
    flat = recipe_keys(recipe)
    blob = json.dumps({k: flat.get(k) for k in INCOMPATIBLE}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def check_resume(recipe: Recipe, state: dict, where: str) -> list[str]:
    """Refuse a resume that cannot be honoured; return (and print) the changes that will be applied."""
    old = state.get("recipe") or {}
    new = recipe_keys(recipe)
    bad = [k for k in INCOMPATIBLE if k in old and old[k] != new.get(k)]
    if bad:
        raise StorageError(recipe.source, (
            f"cannot resume from {where}: the checkpoint was trained with "
            + ", ".join(f"{k}={old[k]!r}" for k in bad) + ", this recipe has "
            + ", ".join(f"{k}={new.get(k)!r}" for k in bad)
            + ". These change what the trained state means; restore them, or start a new run "
              "(another name or train.output_dir, or --force to replace this one)"), key=bad[0])
    changes = [f"{k}: {old[k]!r} -> {v!r}" for k, v in new.items() if k in old and old[k] != v]
    if changes:
        print("rocm-ray: resume applies the recipe's new values: " + "; ".join(changes), flush=True)
    return changes


# ------------------------------------------------------------------------------------ completeness


def write_manifest(directory: Path, rank: int) -> None:
    """This rank's files in ``directory`` (every file but other ranks' manifests) with their sizes."""
    files = {str(p.relative_to(directory)): p.stat().st_size for p in sorted(directory.rglob("*"))
             if p.is_file() and not p.name.startswith("manifest_rank")}
    (directory / manifest_name(rank)).write_text(json.dumps({"rank": rank, "files": files}))


def is_complete(storage: RunStorage, rel: str) -> dict | None:
    """``state.json`` of the checkpoint folder ``rel`` if every rank's manifest and files are there."""
    listing = storage.files(rel)
    if STATE_FILE not in listing:
        return None
    try:
        state = json.loads(storage.read_text(f"{rel}/{STATE_FILE}"))
    except (OSError, json.JSONDecodeError):
        return None
    for rank in range(int(state.get("world_size", 1))):
        if manifest_name(rank) not in listing:
            return None
        try:
            files = json.loads(storage.read_text(f"{rel}/{manifest_name(rank)}"))["files"]
        except (OSError, json.JSONDecodeError, KeyError):
            return None
        if any(listing.get(name) != size for name, size in files.items()):
            return None
    return state


def is_complete_dir(directory: str | Path) -> dict | None:
    """:func:`is_complete` of a local folder (a downloaded checkpoint)."""
    return is_complete(RunStorage(str(directory)), "")


def registered_checkpoints(storage: RunStorage, run_rel: str) -> list[str]:
    """The checkpoint folder names Ray Train registered for the run folder ``run_rel`` (from its snapshot)."""
    if not storage.is_file(f"{run_rel}/{RAY_SNAPSHOT}"):
        return []
    snap = json.loads(storage.read_text(f"{run_rel}/{RAY_SNAPSHOT}"))
    names = [r["checkpoint_dir_name"] for r in snap.get("checkpoint_results", [])]
    latest = snap.get("latest_checkpoint_result")
    if latest:
        names.append(latest["checkpoint_dir_name"])
    return sorted(set(names))


def latest_complete(storage: RunStorage, parent_rel: str, names: list[str]) -> tuple[str, dict] | None:
    """The highest-step complete checkpoint among ``names`` under ``parent_rel``: (rel path, state)."""
    best: tuple[int, str, dict] | None = None
    for name in names:
        rel = f"{parent_rel}/{name}"
        state = is_complete(storage, rel)
        if state is None:
            print(f"rocm-ray: skipping checkpoint {storage.uri(rel)}: incomplete (a rank's files are missing)",
                  flush=True)
            continue
        if best is None or int(state["step"]) > best[0]:
            best = (int(state["step"]), rel, state)
    return (best[1], best[2]) if best else None


# ------------------------------------------------------------------------------------ optimizer state


def _base_optimizer(optimizer):
    """The torch optimizer that holds the state (DeepSpeed's ZeRO optimizers wrap one)."""
    return getattr(optimizer, "optimizer", optimizer)


def full_optimizer_state(named: list[tuple[str, torch.nn.Parameter]], optimizer, zero: int) -> dict[str, torch.Tensor]:
    """AdamW ``exp_avg`` / ``exp_avg_sq`` of every trainable parameter, whole, by name (CPU fp32).

    ZeRO 1-3: DeepSpeed's ``safe_get_full_optimizer_state`` (a collective: every rank calls it).
    Empty before the first step (no moments yet).
    """
    out: dict[str, torch.Tensor] = {}
    if zero == 0:
        for n, p in named:
            st = optimizer.state.get(p, {})
            for key in ("exp_avg", "exp_avg_sq"):
                if key in st:
                    out[f"{key}/{n}"] = st[key].detach().float().cpu().clone()
        return out
    from deepspeed.utils import safe_get_full_optimizer_state

    if zero == 3 or not _has_moments(optimizer):  # ZeRO-3: no elastic resume (see set_full_state)
        return out
    for n, p in named:
        for key in ("exp_avg", "exp_avg_sq"):
            v = safe_get_full_optimizer_state(p, key)
            if v is not None:
                out[f"{key}/{n}"] = v.detach().float().cpu().reshape(p.shape).clone()
    return out


def _has_moments(optimizer) -> bool:
    return any("exp_avg" in st for st in _base_optimizer(optimizer).state.values())


def optimizer_step_count(optimizer) -> int:
    """AdamW's step counter (bias correction), 0 before the first step."""
    for st in _base_optimizer(optimizer).state.values():
        if "step" in st:
            return int(float(st["step"]))
    return 0


def set_full_state(named: list[tuple[str, torch.nn.Parameter]], optimizer, zero: int,
                   weights: dict[str, torch.Tensor], moments: dict[str, torch.Tensor], step: int) -> None:
    """Load whole weights and AdamW moments into an engine of any world size and ZeRO stage (elastic resume).

    ZeRO 1-3 through DeepSpeed's ``safe_set_full_fp32_param`` / ``safe_set_full_optimizer_state``; the
    AdamW step counter of every parameter group is set to ``step``.
    """
    if zero == 0:
        for n, p in named:
            with torch.no_grad():
                p.copy_(weights[n].to(p.device, p.dtype))
            if f"exp_avg/{n}" in moments:
                optimizer.state[p] = {
                    "step": torch.tensor(float(step)),
                    "exp_avg": moments[f"exp_avg/{n}"].to(p.device, p.dtype).clone(),
                    "exp_avg_sq": moments[f"exp_avg_sq/{n}"].to(p.device, p.dtype).clone()}
        return
    if zero == 3:
        raise ValueError("an elastic resume (another train.num_workers) is not supported under ZeRO-3")
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    base = _base_optimizer(optimizer)
    if moments and not _has_moments(optimizer):  # a fresh engine: AdamW creates its state at the first step
        for flat in getattr(optimizer, "single_partition_of_fp32_groups", []):
            base.state[flat] = {"step": torch.tensor(float(step)), "exp_avg": torch.zeros_like(flat),
                                "exp_avg_sq": torch.zeros_like(flat)}
        optimizer._hp_optimizer_states_linked = False
    if hasattr(optimizer, "_lazy_init_hp_params_optimizer_state"):  # DeepSpeed links them after a first step
        optimizer._lazy_init_hp_params_optimizer_state()
    for n, p in named:
        with torch.no_grad():
            p.data.copy_(weights[n].to(p.device, p.dtype))  # the module's copy (a view of ZeRO's flat buffer)
        safe_set_full_fp32_param(p, weights[n].to(torch.float32))  # this rank's fp32 partition
        for key in ("exp_avg", "exp_avg_sq"):
            if f"{key}/{n}" in moments:
                safe_set_full_optimizer_state(p, moments[f"{key}/{n}"].to(torch.float32), key)
    for st in base.state.values():
        if "step" in st:
            st["step"] = torch.tensor(float(step)) if torch.is_tensor(st["step"]) else step


def apply_hyperparameters(optimizer, recipe: Recipe) -> None:
    """Set the recipe's lr / betas / weight decay on every parameter group (a restored optimizer keeps the
    checkpoint's otherwise). Clipping and beta are read from the recipe at every step anyway."""
    t = recipe.train
    groups = list(optimizer.param_groups)
    base = _base_optimizer(optimizer)
    if base is not optimizer:
        groups += list(base.param_groups)
    for g in groups:
        g["lr"] = t.lr
        g["betas"] = tuple(t.adam_betas)
        g["weight_decay"] = t.weight_decay


# ------------------------------------------------------------------------------ in-process checkpoints


def save_inprocess(storage: RunStorage, step: int, named: list[tuple[str, torch.nn.Parameter]], optimizer,
                   recipe: Recipe, rows: list[dict], keep: int = 2) -> str:
    """Write ``checkpoints/checkpoint_<step>/`` (weights, AdamW moments, state, manifest last); keep ``keep``."""
    from safetensors.torch import save_file

    rel = f"{INPROCESS_DIR}/{checkpoint_dir_name(step)}"
    with tempfile.TemporaryDirectory(prefix="rocm_ray_ckpt_") as tmp:
        d = Path(tmp)
        save_file({n: p.detach().float().cpu().contiguous() for n, p in named}, str(d / WEIGHTS_FILE))
        save_file(full_optimizer_state(named, optimizer, 0), str(d / OPTIMIZER_FILE))
        state = checkpoint_state(recipe, step, 1, 0, rows, optimizer_step_count(optimizer))
        (d / STATE_FILE).write_text(json.dumps(state))
        write_manifest(d, 0)
        manifest = (d / manifest_name(0)).read_bytes()
        (d / manifest_name(0)).unlink()
        storage.delete(rel)  # a torn earlier attempt at this step
        storage.upload(d, rel)
        storage.write_bytes(f"{rel}/{manifest_name(0)}", manifest)  # last: the checkpoint is complete now
    names = sorted(n for n in storage.listdir(INPROCESS_DIR) if is_checkpoint_name(n))
    for old in names[:-keep]:
        storage.delete(f"{INPROCESS_DIR}/{old}")
    return rel


def checkpoint_state(recipe: Recipe, step: int, world: int, zero: int, rows: list[dict], opt_steps: int,
                     **extra: Any) -> dict:
    return {"step": step, "world_size": world, "zero_stage": zero, "name": recipe.name,
            "optimizer_steps": opt_steps, "fingerprint": fingerprint(recipe), "recipe": recipe_keys(recipe),
            "metrics": rows, **extra}


def load_inprocess(storage: RunStorage, rel: str, named: list[tuple[str, torch.nn.Parameter]],
                   optimizer, recipe: Recipe) -> dict:
    """Restore :func:`save_inprocess` into the policy and optimizer, then the recipe's hyperparameters."""
    from safetensors.torch import load as load_bytes

    state = json.loads(storage.read_text(f"{rel}/{STATE_FILE}"))
    weights = load_bytes(storage.read_bytes(f"{rel}/{WEIGHTS_FILE}"))
    moments = load_bytes(storage.read_bytes(f"{rel}/{OPTIMIZER_FILE}"))
    set_full_state(named, optimizer, 0, weights, moments, int(state.get("optimizer_steps", state["step"])))
    apply_hyperparameters(optimizer, recipe)
    return state


def latest_inprocess(storage: RunStorage) -> tuple[str, dict] | None:
    names = [n for n in storage.listdir(INPROCESS_DIR) if is_checkpoint_name(n)]
    return latest_complete(storage, INPROCESS_DIR, names)


class InprocessRun:
    """The in-process trainer's location: checkpoints every ``train.checkpoint_every`` steps (and at the
    end), ``--resume`` from the newest complete one, ``--force`` to replace a run, and outputs staged
    locally and committed to a URI location (metrics.csv per step)."""

    def __init__(self, recipe: Recipe, resume: bool = False, force: bool = False):
        from rocm_ray.train.storage import Staging, run_location

        self.recipe = recipe
        self.storage = RunStorage(run_location(recipe))
        found = latest_inprocess(self.storage)
        has_any = any(is_checkpoint_name(n) for n in self.storage.listdir(INPROCESS_DIR))
        if not resume and has_any and not force:
            raise StorageError(recipe.source, (
                f"a run already exists at {self.storage.uri(INPROCESS_DIR)}: pass --resume to continue it, or "
                "--force to delete it and start afresh (or choose another name / train.output_dir)"))
        if force and not resume:
            self.storage.delete(INPROCESS_DIR)
        self.resume_from = found if resume else None
        if resume and found is None:
            raise StorageError(recipe.source, (
                f"--resume: no complete checkpoint in {self.storage.uri(INPROCESS_DIR)} (train.output_dir "
                f"{recipe.train.output_dir}, name {recipe.name}): run without --resume to start from step 0"))
        if self.resume_from is not None:
            check_resume(recipe, self.resume_from[1], self.storage.uri(self.resume_from[0]))
        self.stage = Staging(self.storage)
        self.out_dir = self.stage.dir

    def restore(self, named: list[tuple[str, torch.nn.Parameter]], optimizer) -> tuple[int, list[dict]]:
        """(start step, metrics rows up to it): 0 and [] for a fresh run."""
        if self.resume_from is None:
            return 0, []
        rel = self.resume_from[0]
        state = load_inprocess(self.storage, rel, named, optimizer, self.recipe)
        print(f"rocm-ray: resumed from {self.storage.uri(rel)} at step {state['step']}", flush=True)
        return int(state["step"]), [r for r in state["metrics"] if r["step"] <= state["step"]]

    def after_step(self, step: int, named: list[tuple[str, torch.nn.Parameter]], optimizer, rows: list[dict]) -> None:
        """Per step: metrics.csv to a URI location; a checkpoint every ``train.checkpoint_every`` and at the end."""
        from rocm_ray.train.storage import METRICS_FILE

        if not self.storage.is_local:
            self.storage.write_bytes(METRICS_FILE, (self.out_dir / METRICS_FILE).read_bytes())
        every, last = self.recipe.train.checkpoint_every, self.recipe.train.steps
        if every and (step % every == 0 or step == last):
            save_inprocess(self.storage, step, named, optimizer, self.recipe, rows)
