"""The Ray Train loop: one DeepSpeed engine per worker, the reward from the RewardService.

Every worker builds the same policy as the in-process trainer (``torch.manual_seed(train.seed)`` then
:func:`build_policy`), takes its contiguous shard of :func:`step_batch` (a pure function of seed and
step), and runs the shared :func:`rocm_step` with the engine as the policy's forward and
``engine.backward`` as the backward; DeepSpeed averages (ZeRO 0-2 all-reduce / reduce-scatter, ZeRO-3
partitions) the gradients, clips and steps. With equal shards the averaged gradient is the gradient of
the global-batch mean, so W workers compute the same update as one process with the whole batch.

Per step, every worker calls ``ray.train.report`` with the metrics (global means of loss, reward and
divergence by ``all_reduce``, plus rank 0's own values). Every ``train.checkpoint_every`` steps and at
the end it also reports a checkpoint: the DeepSpeed engine state (optimizer, ZeRO shards, trainable
weights), the gathered trainable weights (``trainable.safetensors``), each rank's RNG states, and
``state.json`` with the step and the metrics so far. A (re)started worker resumes from the newest of
``ray.train.get_checkpoint()`` (a restart after a failure, or Ray's own restore of the run folder) and
the ``resume_from`` checkpoint the driver found (``rocm-ray train --resume``).

This function runs in Ray Train worker processes; it lives in an importable module, never __main__.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from rocm_ray.train.checkpoint import STATE_FILE, WEIGHTS_FILE, checkpoint_dir_name, is_complete_dir
from rocm_ray.train.nonfinite import (
    InjectedReward,
    NonFiniteGuard,
    all_ranks_agree,
    guarded_step,
    skipped_row,
    stop_on_nonfinite,
)
from rocm_ray.train.ppo_step import group_of
from rocm_ray.train.step import NonFiniteError, shard, step_batch

SAMPLES_FILE = "samples.pt"
__all__ = ["STATE_FILE", "WEIGHTS_FILE", "SAMPLES_FILE", "checkpoint_dir_name", "read_state", "train_loop_per_worker"]


def read_state(directory: str | Path) -> dict | None:
    """``state.json`` of a checkpoint folder (a local path or a URI), or None if it has none."""
    from rocm_ray.train.storage import RunStorage

    try:
        return json.loads(RunStorage(str(directory)).read_text(STATE_FILE))
    except (OSError, FileNotFoundError, json.JSONDecodeError):
        return None


def save_rng_state(path: Path) -> None:
    """This process's torch / CUDA / numpy / Python RNG states as safetensors + JSON metadata (no pickle)."""
    from safetensors.torch import save_file

    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    tensors = {"torch": torch.get_rng_state(), "numpy_keys": torch.from_numpy(keys.astype(np.int64))}
    if torch.cuda.is_available():
        tensors.update({f"cuda_{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    version, internal, gauss_next = random.getstate()
    meta = {"numpy": json.dumps([kind, int(pos), int(has_gauss), float(gauss)]),
            "python": json.dumps([version, list(internal), gauss_next])}
    save_file(tensors, str(path), metadata=meta)


def load_rng_state(path: Path) -> None:
    """Restore what :func:`save_rng_state` wrote."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        t = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
    torch.set_rng_state(t["torch"])
    kind, pos, has_gauss, gauss = json.loads(meta["numpy"])
    np.random.set_state((kind, t["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = json.loads(meta["python"])
    random.setstate((version, tuple(internal), gauss_next))
    cuda = [t[f"cuda_{i}"] for i in range(len(t)) if f"cuda_{i}" in t]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def _global_means(values: list[float], device: torch.device, world: int) -> list[float]:
    import torch.distributed as dist

    v = torch.tensor(values, dtype=torch.float64, device=device)  # [M]
    if world > 1:
        dist.all_reduce(v, op=dist.ReduceOp.SUM)
        v /= world
    return v.cpu().tolist()


def _progress(row: dict, total: int, rank0: dict) -> str:
    from rocm_ray.train.progress import format_line

    return format_line(row, total, f"rank 0 reward {rank0['reward']:.4f}")


def _pick_checkpoint(config: dict, stack: contextlib.ExitStack) -> Path | None:
    """The newest of Ray's checkpoint (restart / run-folder restore) and the driver's ``resume_from``.

    Ray's checkpoint folder stays available until ``stack`` closes. The same answer on every rank.
    """
    import ray.train

    best_step, best = -1, None
    resume_from = config.get("resume_from")
    candidates = [ray.train.get_checkpoint()]
    if resume_from:  # a URI or a path the driver checked complete and Ray-registered
        candidates.append(ray.train.Checkpoint(resume_from))
    for ckpt in candidates:
        if ckpt is None:
            continue
        d = Path(stack.enter_context(ckpt.as_directory()))
        state = is_complete_dir(d)  # every rank's manifest and files present
        if state is not None and int(state["step"]) > best_step:
            best_step, best = int(state["step"]), d
    return best


def _restore(engine, ckpt_dir: Path, rank: int, world: int, stage: int, recipe) -> tuple:
    """Load a checkpoint into ``engine`` and this rank's RNGs; returns (step, rows, samples, timing)."""
    from rocm_ray.train.ds_engine import load_engine

    state = read_state(ckpt_dir)
    if state["world_size"] == world and state["zero_stage"] == stage:
        load_engine(engine, ckpt_dir)  # exact: DeepSpeed's own shards
    else:  # elastic: the whole weights and AdamW moments, re-partitioned for this world size / stage
        from safetensors.torch import load_file

        from rocm_ray.train.checkpoint import OPTIMIZER_FILE, set_full_state

        if stage == 3 or state["zero_stage"] == 3 or not (ckpt_dir / OPTIMIZER_FILE).is_file():
            raise ValueError(
                f"cannot resume from {ckpt_dir}: it was written by {state['world_size']} worker(s) at ZeRO "
                f"stage {state['zero_stage']}, this run has {world} at stage {stage}; changing "
                "train.num_workers / train.zero_stage on resume works for ZeRO 0-2, not ZeRO-3: resume with "
                "the same train.num_workers and train.zero_stage")
        named = [(n, p) for n, p in engine.module.named_parameters() if p.requires_grad]
        set_full_state(named, engine.optimizer, stage, load_file(str(ckpt_dir / WEIGHTS_FILE)),
                       load_file(str(ckpt_dir / OPTIMIZER_FILE)), int(state.get("optimizer_steps", state["step"])))
        if rank == 0:
            print(f"rocm-ray: elastic resume: {state['world_size']} worker(s) ZeRO {state['zero_stage']} -> "
                  f"{world} worker(s) ZeRO {stage}", flush=True)
    from rocm_ray.train.checkpoint import apply_hyperparameters

    apply_hyperparameters(engine.optimizer, recipe)  # the recipe's lr / betas / weight decay, not the checkpoint's
    rng_file = ckpt_dir / f"rng_rank{rank}.safetensors"
    if rng_file.is_file():
        load_rng_state(rng_file)
    samples = []
    if rank == 0 and (ckpt_dir / SAMPLES_FILE).is_file():
        samples = torch.load(ckpt_dir / SAMPLES_FILE, weights_only=True)
    if rank == 0:
        print(f"rocm-ray: resumed from {ckpt_dir} at step {state['step']}", flush=True)
    return int(state["step"]), list(state["metrics"]), samples, list(state.get("timing", []))


def train_loop_per_worker(config: dict) -> None:
    """Ray Train worker entry point. ``config``: recipe, prompts, reward_client, resume_from,
    deepspeed (config overrides), fail_at_step (tests: raise once at that step when not resumed)."""
    t_enter = time.perf_counter()
    import ray.train
    import ray.train.torch
    import torch.distributed as dist

    from rocm_ray._quiet import quiet_library_warnings
    from rocm_ray.train.builders import build_policy
    from rocm_ray.train.ds_engine import (
        build_engine,
        grad_norm,
        partition_reference,
        save_engine,
        trainable_state_dict,
        worker_config,
    )
    from rocm_ray.train.inprocess import metrics_row, step_kwargs
    from rocm_ray.train.micro import PhaseClock, micro_batch_step, time_gradient_allreduce, worker_reward

    quiet_library_warnings()
    logging.getLogger("ray.train.v2._internal.execution.context").setLevel(logging.WARNING)  # per-step INFO
    recipe = config["recipe"]
    prompts: list[str] = config["prompts"]
    t = recipe.train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device() if t.use_gpu else torch.device("cpu")
    if t.batch_size % world:
        raise ValueError(f"train.batch_size ({t.batch_size}) must be divisible by the {world} workers")

    t_imports = time.perf_counter()
    torch.manual_seed(t.seed)  # exactly as train_inprocess: the same LoRA init on every worker
    policy = build_policy(recipe, device)
    t_policy = time.perf_counter()
    ds_cfg = worker_config(recipe, world, policy, config.get("deepspeed"))
    engine = build_engine(policy.unet, t.lr, tuple(t.adam_betas), t.weight_decay, ds_cfg)
    ref_engine = partition_reference(policy, ds_cfg)  # ZeRO-3 full fine-tuning: the reference partitioned
    t_engine = time.perf_counter()
    stage = int(ds_cfg["zero_optimization"]["stage"])
    reward = worker_reward(config, rank, device)
    clock = PhaseClock(device)
    time_gradient_allreduce(engine, clock)

    kwargs = step_kwargs(recipe, device)
    ppo = recipe.algorithm.name == "ppo"
    if ppo:  # RLCM-style PPO: inner updates stepped through the engine
        from rocm_ray.train.ppo_step import engine_optimizer_step, ppo_step

        kwargs["optimizer_step"] = engine_optimizer_step(engine, stage)
    nodes: list[str] = [""] * world
    dist.all_gather_object(nodes, ray.get_runtime_context().get_node_id())

    rows: list[dict] = []
    samples: list[dict] = []
    timing: list[dict] = []  # rank 0's seconds per step: compute, reward round trip, total with report
    start = 0
    with contextlib.ExitStack() as stack:
        ckpt_dir = _pick_checkpoint(config, stack)
        if ckpt_dir is not None:
            start, rows, samples, timing = _restore(engine, ckpt_dir, rank, world, stage, recipe)
    if ckpt_dir is None and rank == 0:
        n = sum(p.numel() for p in policy.trainable_parameters())
        print(f"rocm-ray[ray]: {recipe.name}: {world} worker(s), ZeRO {stage}, {n:,} trainable parameters, "
              f"{t.steps} steps x {t.batch_size} images ({t.batch_size // world} per worker)", flush=True)
    live = _live_metrics(config, start) if rank == 0 else None  # metrics.csv / TensorBoard / W&B, per step
    hooks = config.get("test_hooks") or {}
    if rank == 0:
        print(f"rocm-ray[ray]: worker start-up {time.perf_counter() - t_enter:.1f} s (imports "
              f"{t_imports - t_enter:.1f} s, policy {t_policy - t_imports:.1f} s, DeepSpeed "
              f"{t_engine - t_policy:.1f} s)", flush=True)

    named = [(n, p) for n, p in engine.module.named_parameters() if p.requires_grad]

    def save_and_report(step: int, metrics: dict, state_update: dict | None = None) -> None:
        from ray.train import Checkpoint
        from safetensors.torch import save_file

        from rocm_ray.train.checkpoint import (
            OPTIMIZER_FILE,
            checkpoint_state,
            full_optimizer_state,
            optimizer_step_count,
            write_manifest,
        )

        with tempfile.TemporaryDirectory(prefix="rocm_ray_ckpt_") as tmp:
            d = Path(tmp)
            save_engine(engine, d)
            weights = trainable_state_dict(engine)  # collective under ZeRO-3
            moments = full_optimizer_state(named, engine.optimizer, stage)  # collective under ZeRO 1-2
            save_rng_state(d / f"rng_rank{rank}.safetensors")
            if rank == 0:
                save_file(weights, str(d / WEIGHTS_FILE))
                if moments:
                    save_file(moments, str(d / OPTIMIZER_FILE))
                torch.save(samples, d / SAMPLES_FILE)
                state = checkpoint_state(recipe, step, world, stage, rows, optimizer_step_count(engine.optimizer),
                                         worker_nodes=nodes, timing=timing, attempt_start=start)
                state.update(state_update or {})
                (d / STATE_FILE).write_text(json.dumps(state))
            write_manifest(d, rank)  # this rank's files: a checkpoint missing any of them is never resumed
            stall = hooks.get("stall_save")  # test hook [rank, step, seconds]: this rank uploads late
            upload = _slow_upload(recipe.name, config["location"], stall[2]) \
                if stall and stall[0] == rank and stall[1] == step else None
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp),
                             checkpoint_dir_name=checkpoint_dir_name(step), checkpoint_upload_fn=upload)

    guard = NonFiniteGuard.from_rows(t.max_nonfinite_steps, rows)
    agree = all_ranks_agree(device, world)
    nonfinite_at: dict = config.get("nonfinite_at") or {}
    if nonfinite_at:  # test hook: this kind of non-finite value at these steps
        reward = InjectedReward(reward, nonfinite_at, lambda: current[0])
    current = [0]
    fail_at = config.get("fail_at_step")
    every = t.checkpoint_every
    for step in range(start + 1, t.steps + 1):
        if fail_at is not None and step == fail_at and start == 0:
            raise RuntimeError(f"injected failure at step {step} (test hook fail_at_step)")

        t0 = time.perf_counter()
        current[0] = step
        clock.times = type(clock.times)()
        ps, seeds = step_batch(prompts, t.batch_size, step, t.seed, group=group_of(recipe))
        ps, seeds = shard(ps, rank, world), shard(seeds, rank, world)
        micro_steps = engine.micro_steps
        if ppo:  # the rollout scored without reward gradients, then the inner PPO updates
            res, skip = guarded_step(lambda bw, ps=ps, seeds=seeds: ppo_step(
                policy, ps, seeds, lambda images, p: reward.submit(images, p, grad=False).result(),
                eps_fn=policy.eps_fn(engine), backward=bw, **kwargs), engine.backward, agree)
        else:
            res, skip = guarded_step(lambda bw, ps=ps, seeds=seeds: micro_batch_step(
                policy, ps, seeds, reward, engine, t.micro_batch_size, clock, ref_engine=ref_engine, backward=bw,
                **kwargs), engine.backward, agree)
        gn = math.nan
        if skip is None:
            gn = grad_norm(engine) if stage == 0 else None  # stage 0: before step() zeroes the gradients
            if gn is None or math.isfinite(gn):  # ZeRO 1-3: DeepSpeed itself skips a non-finite update
                t_opt = clock.now()
                engine.step()
                clock.add("optimizer", t_opt)
            gn = gn if gn is not None else grad_norm(engine)
        elif not ppo and engine.micro_steps != micro_steps:  # skipped after some micro-batches were accumulated
            if stage:
                raise NonFiniteError(f"step {step}: {skip} after {engine.micro_steps - micro_steps} accumulated "
                                     "micro-batch(es) under ZeRO >= 1, which cannot be rolled back; run without "
                                     "train.micro_batch_size or with train.zero_stage=0")
            engine.micro_steps = micro_steps  # stage 0: the gradients are zeroed below (stop_on_nonfinite)
        if skip is not None or not math.isfinite(gn):  # skipped on every rank: weights and optimizer unchanged
            stopped = stop_on_nonfinite(guard, step, skip or f"the gradient norm is {gn}", engine, rows, timing, t0,
                                        skipped_row(step, rows[-1] if rows else None, res, gn,
                                                    time.perf_counter() - t0, t.batch_size, t.lr),
                                        save_and_report, world, step == t.steps or bool(every and step % every == 0))
            if live is not None:
                live.log(rows[-1])  # the skipped step's row, live like the others
            if stopped:
                break
            continue
        _maybe_kill(hooks, rank, step, config.get("location"))  # test hook: SIGKILL mid-step, once per run
        guard.ok()
        local = metrics_row(step, res, gn, 1.0, t.batch_size, engine.optimizer.param_groups[0]["lr"])  # my shard
        keys = [k for k in local if k not in ("step", "grad_norm", "images_per_s", "it_per_s", "lr")]
        t_comm = clock.now()
        means = _global_means([float(local[k]) for k in keys], device, world)
        clock.add("communication", t_comm)
        dt = time.perf_counter() - t0
        row = guard.annotate({**local, **dict(zip(keys, means, strict=True)), "images_per_s": t.batch_size / dt,
                              "it_per_s": 1.0 / dt}, skipped=False)
        rows.append(row)
        if live is not None:
            live.log(row)  # before the report: a crash after this step keeps its row
        if recipe.logging.sample_every and step % recipe.logging.sample_every == 0 and step != t.steps \
                and rank == 0:
            samples.append({"step": step, "prompts": ps, "seeds": seeds, "images": res.images,
                            "rewards": res.rewards, "components": res.components,
                            "divergences": res.sample_divergences})
        if rank == 0 and (step % recipe.logging.log_every == 0 or step == t.steps):
            print(_progress(row, t.steps, local) + "\n  " + clock.describe(), flush=True)
        metrics = {**row, "rank0_loss": local["loss"], "rank0_reward": local["reward"],
                   "rank0_divergence": local["divergence"], "world_size": world, **clock.times.as_metrics()}
        timing.append({"step": step, "compute_s": dt, "reward_s": clock.times.reward_wait,
                       **clock.times.as_metrics()})  # rank 0's breakdown -> timing.csv
        if step == t.steps or (every and step % every == 0):
            save_and_report(step, metrics)
        else:
            ray.train.report(metrics)
        timing[-1]["total_s"] = time.perf_counter() - t0  # with the report (and checkpoint)
    if live is not None:
        live.close()
    if start >= t.steps and rank == 0:
        print(f"rocm-ray: nothing to do, the checkpoint is already at step {start} of {t.steps}", flush=True)


def _live_metrics(config: dict, start: int):
    """Rank 0's :class:`LiveMetrics` at the run location (None when the driver gave none)."""
    from rocm_ray.train.storage import LiveMetrics, RunStorage

    recipe, location = config["recipe"], config.get("location")
    if not location:
        return None
    lg = recipe.logging
    return LiveMetrics(RunStorage(location), resume_step=start, tensorboard=lg.tensorboard,
                       wandb_project=lg.wandb_project if lg.wandb else None, run_name=recipe.name,
                       config=recipe.to_dict())


def _maybe_kill(hooks: dict, rank: int, step: int, location: str | None) -> None:
    """Test hook ``kill_rank_at: [rank, step]``: that rank SIGKILLs its own process mid-step, once per run
    (a marker at the run location remembers it across Ray Train's restart)."""
    kill = hooks.get("kill_rank_at")
    if not kill or kill[0] != rank or kill[1] != step or not location:
        return
    import os
    import signal

    from rocm_ray.train.storage import RunStorage

    storage = RunStorage(location)
    if storage.exists(".test_hooks/killed"):
        return
    storage.write_text(".test_hooks/killed", f"rank {rank} step {step}\n")
    os.kill(os.getpid(), signal.SIGKILL)


def _slow_upload(name: str, location: str, seconds: float):
    """Test hook ``stall_save``: a ``checkpoint_upload_fn`` that waits ``seconds`` before uploading this rank's
    files (after Ray Train's barrier: the other ranks' files of the checkpoint are uploaded meanwhile)."""
    import ray.train

    from rocm_ray.train.storage import RunStorage

    def upload(checkpoint, dir_name: str):
        time.sleep(seconds)
        storage = RunStorage(location)
        storage.upload(checkpoint.path, f"ray/{name}/{dir_name}")
        return ray.train.Checkpoint(storage.uri("ray", name, dir_name))

    return upload
