"""DeepSpeed set-up for the Ray Train workers: the engine over the policy's UNet, and its checkpoints.

The engine wraps the UNet only (the VAE and text encoder are frozen and stay plain modules) with a
torch AdamW, so no DeepSpeed op is compiled (``cpu_adam``/``fused_adam`` are not used). ZeRO 0/1/2/3
comes from ``train.zero_stage``; clipping is DeepSpeed's (``gradient_clipping = train.max_grad_norm``).
Precision: fp32 engines everywhere; on GPU ``train.mixed_precision=bf16`` autocasts the forward (the same
switch as the in-process trainer), keeping fp32 master weights and optimizer state.

The process group is Ray Train's (gloo on CPU, NCCL on GPU): the engine is built with
``dist_init_required=False`` and DeepSpeed adopts the existing group.

DeepSpeed's CPU shared-memory comm op: on the CPU accelerator, DeepSpeed's ``TorchBackend`` (created by
the first ``deepspeed.initialize`` in a process) calls ``build_shm_op()``, which probes every op builder
and JIT-compiles ``deepspeed_shm_comm`` with ninja into ``~/.cache/torch_extensions`` (about 60-130 s
on 2 cores). That op serves only ``inference_all_reduce`` (AutoTP inference); training collectives go
through ``torch.distributed``. :func:`avoid_shm_comm_build` therefore turns the build off on CPU-only
processes (set ``ROCM_RAY_DS_SHM_OP=1`` to keep DeepSpeed's default).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import torch

ENGINE_TAG = "engine"  # the DeepSpeed checkpoint tag inside every Ray checkpoint


def avoid_shm_comm_build() -> bool:
    """Stop DeepSpeed from JIT-building its CPU shm comm op (unused in training). Returns whether it did."""
    if os.environ.get("ROCM_RAY_DS_SHM_OP", "0") == "1" or torch.cuda.is_available():
        return False
    import deepspeed.comm.torch  # noqa: F401  (registers the module)

    # ``deepspeed.comm.torch`` the attribute is torch itself (star import); patch the module object
    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
    return True


def deepspeed_config(micro_batch: int, zero_stage: int, max_grad_norm: float,
                     overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The engine's config: one micro-batch per step, fp32, ZeRO ``zero_stage``, DeepSpeed clipping."""
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": float(max_grad_norm),
        "zero_optimization": {"stage": zero_stage},
        "zero_allow_untested_optimizer": True,  # a torch AdamW: nothing to compile
        "fp16": {"enabled": False},
        "bf16": {"enabled": False},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    for key, value in (overrides or {}).items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict):
            cfg[key] = {**cfg[key], **value}
        else:
            cfg[key] = value
    return cfg


def build_engine(unet: torch.nn.Module, lr: float, betas: tuple[float, float], weight_decay: float,
                 config: dict[str, Any]):
    """A DeepSpeed engine over ``unet`` (trainable = ``requires_grad``) with torch AdamW."""
    avoid_shm_comm_build()
    import deepspeed

    params = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay)
    engine, _, _, _ = deepspeed.initialize(model=unet, optimizer=opt, config=config,
                                           dist_init_required=False)
    return engine


def zero_stage(engine) -> int:
    return int(engine.zero_optimization_stage())


def grad_norm(engine) -> float:
    """The global gradient norm of the last step (before clipping).

    ZeRO 1-3 record it in the optimizer; at stage 0 (plain torch optimizer) DeepSpeed does not, so it is
    computed from the all-reduced gradients. Call after ``engine.backward`` and before/after ``step``
    accordingly: at stage 0 before ``engine.step()`` (which zeroes the gradients).
    """
    norm = engine.get_global_grad_norm()
    if norm is not None:
        return float(norm)
    grads = [p.grad.detach().float() for p in engine.module.parameters() if p.grad is not None]
    if not grads:
        return 0.0
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))


def trainable_state_dict(engine) -> dict[str, torch.Tensor]:
    """The full (gathered) trainable weights, by parameter name, as CPU fp32 tensors; on every rank.

    Under ZeRO-3 the parameters are partitioned: every rank must call this (it all-gathers them).
    """
    import deepspeed

    named = [(n, p) for n, p in engine.module.named_parameters() if p.requires_grad]
    if zero_stage(engine) == 3:
        with deepspeed.zero.GatheredParameters([p for _, p in named], modifier_rank=None):
            return {n: p.detach().float().cpu().clone() for n, p in named}
    return {n: p.detach().float().cpu().clone() for n, p in named}


def save_engine(engine, directory: Path) -> None:
    """Optimizer state, trainable weights and engine counters (each rank writes its own ZeRO shards)."""
    engine.save_checkpoint(str(directory), tag=ENGINE_TAG, exclude_frozen_parameters=True)


def load_engine(engine, directory: Path) -> None:
    """Restore what :func:`save_engine` wrote (same world size and ZeRO stage)."""
    path, _ = engine.load_checkpoint(str(directory), tag=ENGINE_TAG, load_module_strict=False,
                                     load_optimizer_states=True, load_lr_scheduler_states=False)
    if path is None:
        raise FileNotFoundError(f"no DeepSpeed checkpoint '{ENGINE_TAG}' in {directory}")
