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


MAX_BUCKET = 50_000_000  # elements: the most one ZeRO communication bucket holds (200 MB in fp32)
WHOLE_BUCKET = 2_000_000  # up to this many trainable parameters (LoRA adapters) reduce in one bucket


def bucket_size(trainable: int) -> int:
    """ZeRO bucket elements for ``trainable`` parameters: never larger than what there is to reduce.

    DeepSpeed's defaults (5e8 elements = 1.86 GiB of fp32 reduce buffer per rank at stage 1/2) were
    sized for billion-parameter models; a LoRA adapter has a few thousand to a few million parameters
    and reduces in one bucket of exactly its size. Larger models (full fine-tuning) get an eighth of
    their size (at least 2e6, at most 5e7 elements), so a bucket never rivals the partition it saves.
    """
    if trainable <= WHOLE_BUCKET:
        return int(max(1, trainable))
    return int(min(max(trainable // 8, WHOLE_BUCKET), MAX_BUCKET))


def zero_config(stage: int, trainable: int) -> dict[str, Any]:
    """``zero_optimization`` of stage ``stage`` with buffers sized from the trainable parameter count."""
    b = bucket_size(trainable)
    cfg: dict[str, Any] = {"stage": stage}
    if stage in (1, 2):
        cfg.update(reduce_bucket_size=b, allgather_bucket_size=b)
    if stage == 3:
        # sub_group_size bounds the optimizer's flat working set: AdamW's temporaries and the flattened
        # gradient of a sub-group (DeepSpeed's default, 1e9 elements, makes them half the model at 2 ranks)
        cfg.update(reduce_bucket_size=b, stage3_prefetch_bucket_size=b, stage3_max_live_parameters=b,
                   stage3_max_reuse_distance=b, sub_group_size=b)
    return cfg


def check_recipe(recipe) -> None:
    """Refuse DeepSpeed set-ups that cannot work (a RecipeError naming the key and the fix)."""
    from rocm_ray.config import RecipeError

    t, m = recipe.train, recipe.model
    if m.lora_rank == 0 and m.dtype != "float32":
        raise RecipeError(recipe.source, "model.dtype",
                          f"full fine-tuning (model.lora_rank: 0) with model.dtype {m.dtype} would train a "
                          f"{m.dtype} copy of the UNet (fp32 engines, no master weights): use model.dtype "
                          "float32 (train.mixed_precision: bf16 for bf16 compute on GPU) or LoRA")
    if m.dtype == "float16" and not t.use_gpu and t.num_workers:
        raise RecipeError(recipe.source, "model.dtype", "float16 weights on CPU workers are not supported by "
                          "torch's CPU kernels: use float32 or bfloat16")


def worker_config(recipe, world: int, policy, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The DeepSpeed config of a Ray worker: micro-batches (gradient accumulation), ZeRO sized to the model."""
    t = recipe.train
    per_worker = t.batch_size // world
    micro = t.micro_batch_size or per_worker
    trainable = sum(p.numel() for p in policy.trainable_parameters())
    user = dict(overrides or {})
    zero = {**zero_config(t.zero_stage, trainable), **user.pop("zero_optimization", {})}
    return deepspeed_config(micro, t.zero_stage, t.max_grad_norm,
                            {"gradient_accumulation_steps": per_worker // micro, "zero_optimization": zero, **user})


def build_engine(unet: torch.nn.Module, lr: float, betas: tuple[float, float], weight_decay: float,
                 config: dict[str, Any]):
    """A DeepSpeed engine over ``unet`` (trainable = ``requires_grad``) with torch AdamW."""
    avoid_shm_comm_build()
    import deepspeed

    params = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay)
    engine, _, _, _ = deepspeed.initialize(model=unet, optimizer=opt, config=config,
                                           dist_init_required=False)
    alias_zero3_master(engine)
    release_after_every_backward(engine)
    return engine


def release_after_every_backward(engine) -> int:
    """ZeRO-3: release a module's gathered parameters after the backward of *each* call through it.

    DeepSpeed 0.19 counts, per module, the inputs of its *last* forward call that need a gradient
    (``ds_grads_remaining``, reset by every call) and releases the module's gathered parameters when that
    count reaches 0 in the backward. A consistency trajectory calls the UNet (policy and reference) at every
    sampling step before one backward: the backward of every call but the last gathers the module again
    (the pre-backward fetch) and the count goes negative, so nothing is released and by the end of the
    backward every module is whole on every rank (measured: ZeRO-3 full fine-tuning at 0.98x ZeRO-0's
    peak with a 4-step trajectory). Here each call's inputs get their own count: the module is released
    when the backward of that call has produced the gradients of all of them. Returns how many modules
    were given the per-call count (0 when the engine is not ZeRO-3).
    """
    if zero_stage(engine) != 3:
        return 0
    opt = engine.optimizer
    offload = getattr(opt, "parameter_offload", opt)  # the policy's optimizer, or a ZeRO-3 inference engine
    n = 0
    for module in engine.module.modules():
        if "post_bwd_fn" in module.__dict__:
            module.post_bwd_fn = _per_call_post_backward(module, offload)
            n += 1
    return n


def _per_call_post_backward(module: torch.nn.Module, offload):
    """The autograd function DeepSpeed's forward pre-hook applies to each input of ``module`` (see above)."""

    class PostBackwardPerCall(torch.autograd.Function):
        @staticmethod
        def forward(tensor):
            return tensor.detach()

        @staticmethod
        def setup_context(ctx, inputs, output):
            (tensor,) = inputs
            ctx.pending = None
            if not tensor.requires_grad:
                return
            if module.ds_grads_remaining == 0:  # DeepSpeed's pre-hook reset it: the first input of a new call
                module.rocm_ray_call = [0]
            module.ds_grads_remaining += 1
            ctx.pending = module.rocm_ray_call
            ctx.pending[0] += 1

        @staticmethod
        def backward(ctx, *grads):
            if ctx.pending is not None:
                ctx.pending[0] -= 1
                if ctx.pending[0] == 0:  # this call's backward is complete
                    offload.post_sub_module_backward_function(module)
            return grads

    return PostBackwardPerCall


def alias_zero3_master(engine) -> int:
    """ZeRO-3 with fp32 parameters: let the optimizer update the parameter partitions in place.

    DeepSpeed 0.19 keeps a separate fp32 master copy of every parameter partition even when the partitions
    are fp32 already (it compares the partition's ``torch.device`` with the device *name*, a string, so its
    own "no second copy needed" branch never runs): half the model per rank at 2 ranks, for nothing.
    Here each master becomes the parameter partition it copies (the state DeepSpeed's branch would have
    built: ``fp32_partitioned_groups_flat[i] is fp16_partitioned_groups_flat[i]``), its optimizer state
    moves with it, and the copy is freed. Returns the bytes freed on this rank (0 when nothing applies:
    other stages, offload, NVMe swapping, or master weights in another dtype).
    """
    opt = engine.optimizer
    if zero_stage(engine) != 3 or getattr(opt, "offload_optimizer", True) or getattr(opt, "swap_optimizer", True):
        return 0
    freed = 0
    for i, (part, master) in enumerate(zip(opt.fp16_partitioned_groups_flat, opt.fp32_partitioned_groups_flat,
                                           strict=True)):
        if part is None or master is part or part.dtype != master.dtype or part.device != master.device:
            continue
        if not torch.equal(part, master):  # never expected right after initialize: leave it as it is
            continue
        part.ds_id = master.ds_id
        part.requires_grad = True  # as DeepSpeed marks its masters
        state = opt.optimizer.state.pop(master, None)
        if state is not None:
            opt.optimizer.state[part] = state
        opt.fp32_partitioned_groups_flat[i] = part
        freed += master.numel() * master.element_size()
    return freed


def partition_reference(policy, config: dict[str, Any]):
    """Full fine-tuning under ZeRO-3: partition the frozen reference UNet like the policy.

    A second DeepSpeed engine without an optimizer (ZeRO-3 inference) over ``policy.ref_unet``: each rank
    keeps 1/W of the reference's weights and gathers a module's parameters for its forward (and the
    backward through it: the divergence's gradient flows through the reference's output into x_n).
    Calling ``policy.ref_unet`` directly goes through the engine's hooks, so nothing else changes. Keep
    the returned engine alive for the run. None when there is nothing to partition (LoRA: the reference
    is the policy's own base weights with the adapter off; ZeRO 0-2: parameters are not partitioned).
    """
    if policy.lora or policy.ref_unet is None or int(config["zero_optimization"]["stage"]) != 3:
        return None
    avoid_shm_comm_build()
    import deepspeed

    cfg = {k: v for k, v in config.items() if k not in ("gradient_clipping", "zero_allow_untested_optimizer")}
    # release every gathered module after use (no reuse-distance caching: that would keep it whole)
    cfg["zero_optimization"] = {**cfg["zero_optimization"], "stage3_max_reuse_distance": 0}
    engine, _, _, _ = deepspeed.initialize(model=policy.ref_unet, config=cfg, dist_init_required=False)
    release_after_every_backward(engine)
    return engine


def release_reference(ref_engine) -> None:
    """Re-partition the reference after a backward (ZeRO-3). DeepSpeed 0.19.8 does not release a module
    without trainable parameters after the backward runs through it (its post-backward hook does not
    fire), so without this the whole reference would stay gathered from the first backward on."""
    if ref_engine is not None:
        ref_engine.optimizer.get_param_coordinator().release_and_reset_all(ref_engine.module)


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
    if zero_stage(engine) != 3:
        return {n: p.detach().float().cpu().clone() for n, p in named}
    out: dict[str, torch.Tensor] = {}
    for group in gather_groups(named, MAX_BUCKET):  # a group at a time: one group's full size alive at once
        with deepspeed.zero.GatheredParameters([p for _, p in group], modifier_rank=None):
            out.update({n: p.detach().float().cpu().clone() for n, p in group})
    return out


def gather_groups(named: list[tuple[str, torch.nn.Parameter]], max_elements: int) -> list[list]:
    """Consecutive parameters in groups of at most ``max_elements`` (ZeRO-3 full sizes: ``ds_numel``)."""
    groups: list[list] = [[]]
    size = 0
    for n, p in named:
        k = int(getattr(p, "ds_numel", p.numel()))
        if groups[-1] and size + k > max_elements:
            groups.append([])
            size = 0
        groups[-1].append((n, p))
        size += k
    return [g for g in groups if g]


def save_engine(engine, directory: Path) -> None:
    """Optimizer state, trainable weights and engine counters (each rank writes its own ZeRO shards)."""
    engine.save_checkpoint(str(directory), tag=ENGINE_TAG, exclude_frozen_parameters=True)


def load_engine(engine, directory: Path) -> None:
    """Restore what :func:`save_engine` wrote (same world size and ZeRO stage)."""
    path, _ = engine.load_checkpoint(str(directory), tag=ENGINE_TAG, load_module_strict=False,
                                     load_optimizer_states=True, load_lr_scheduler_states=False)
    if path is None:
        raise FileNotFoundError(f"no DeepSpeed checkpoint '{ENGINE_TAG}' in {directory}")
