"""``train_ray``: the distributed ROCM trainer (Ray Train + DeepSpeed workers, a RewardService).

    driver ── RewardService (reward replicas: Ray actors, GPU fractions / custom resource "reward")
       └──── TorchTrainer: train.num_workers workers, each a DeepSpeed engine (rocm_ray.train.ray_worker)
       └──── after training: evaluation and outputs (metrics.csv, curves.png, grid.png, samples.parquet,
             weights/, summary.md/json) through the same code as the in-process trainer

Ray: ``ray.address`` in the recipe, else ``$RAY_ADDRESS`` (a cluster, or the job a ``ray job submit``
runs), else a local Ray bound to 127.0.0.1. Outputs go to ``train.output_dir``; a relative one is put
under ``$ROCM_RAY_OUTPUT_ROOT`` when that is set (a Ray job's working directory is a temporary copy),
else under the current directory. Ray Train's checkpoints live in ``<output_dir>/ray/<name>/`` (on a
multi-node cluster that folder must be on storage every node shares, e.g. NFS/EFS).

Resume: ``--resume`` continues from the newest complete checkpoint in ``<output_dir>/ray/<name>/``;
a fresh run moves an existing one aside to ``<name>.previous`` (Ray Train V2 would otherwise restore
it on its own).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from rocm_ray.config import Recipe, RecipeError, prompts_of
from rocm_ray.preflight import ReplicaWatch, bounded_placement, placement_retries, raise_if_placement_timeout
from rocm_ray.rewards.base import RewardServiceUnavailable
from rocm_ray.train.inprocess import RunResult
from rocm_ray.train.nonfinite import raise_if_stopped
from rocm_ray.train.ray_worker import (
    SAMPLES_FILE,
    STATE_FILE,
    WEIGHTS_FILE,
    read_state,
    train_loop_per_worker,
)
from rocm_ray.train.step import NonFiniteError

OUTPUT_ROOT_ENV = "ROCM_RAY_OUTPUT_ROOT"


def resolve_output_dir(recipe: Recipe) -> Path:
    """The absolute output folder: ``train.output_dir``, under ``$ROCM_RAY_OUTPUT_ROOT`` if relative."""
    p = recipe.output_path
    root = os.environ.get(OUTPUT_ROOT_ENV)
    if root and not p.is_absolute():
        p = Path(root) / p
    return p.resolve()


def connect_ray(address: str | None, num_cpus_needed: float = 1.0) -> bool:
    """Connect to ``address`` / ``$RAY_ADDRESS``, or start a local Ray on loopback; True if it started one.

    A Ray already initialized in this process (tests, notebooks, Tune) is used as is.
    """
    import ray

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
        return False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    cpus = max(os.cpu_count() or 1, int(-(-num_cpus_needed // 1)))  # logical CPUs may exceed cores
    ray.init(num_cpus=cpus, **local_ray_options())
    return True


def local_ray_options() -> dict[str, Any]:
    """``ray.init`` options of a local Ray on loopback only (no dashboard), with quiet Ray Train logs.

    Also sets this process's environment for it (rocm_ray.security): every Ray server on 127.0.0.1, token auth.
    """
    from rocm_ray.security import apply_local_ray_env
    from rocm_ray.train.ray_logging import SETUP_HOOK

    apply_local_ray_env()  # loopback only, token auth with a token of this process (nothing in ~/.ray)
    return {"address": "local", "_node_ip_address": "127.0.0.1", "include_dashboard": False,
            "runtime_env": {"worker_process_setup_hook": SETUP_HOOK}}


def stop_local_ray(grace_s: float = 5.0) -> None:
    """``ray.shutdown()`` of a Ray this process started, then end whatever of it outlived the shutdown.

    Only this process's own Ray descendants are touched (raylet, GCS, workers); a Ray Train V2 controller
    process has been seen to hang at exit after its core worker shut down (a sleeping non-daemon thread),
    orphaned once the raylet is gone.
    """
    import ray

    try:
        import psutil

        procs = [p for p in psutil.Process().children(recursive=True) if _is_ray_process(p)]
    except Exception:  # noqa: BLE001 - cleanup is best effort
        procs = []
    ray.shutdown()
    from rocm_ray.security import restore_env

    restore_env()
    if not procs:
        return
    _, alive = psutil.wait_procs(procs, timeout=grace_s)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass


_RAY_PROCESS_MARKS = ("ray::", "/raylet", "/gcs_server", "site-packages/ray/", "ray.util.client.server")


def _is_ray_process(p) -> bool:
    """Whether a process is part of a Ray node (workers, raylet, GCS, dashboard, agents, monitors)."""
    try:
        cmd = " ".join(p.cmdline())
    except Exception:  # noqa: BLE001 - gone or not ours to read
        return False
    return any(m in cmd for m in _RAY_PROCESS_MARKS)


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The complete checkpoint (``state.json`` present) with the highest step under ``run_dir``."""
    best: tuple[int, Path | None] = (-1, None)
    if not run_dir.is_dir():
        return None
    for d in run_dir.glob("checkpoint_*"):
        state = read_state(d)
        if state is not None and int(state["step"]) > best[0]:
            best = (int(state["step"]), d)
    return best[1]


def _check(recipe: Recipe) -> None:
    from rocm_ray.train.ds_engine import check_recipe

    check_recipe(recipe)
    t = recipe.train
    if t.num_workers < 1:
        raise RecipeError(recipe.source, "train.num_workers", "the Ray trainer needs train.num_workers >= 1")
    if t.mixed_precision == "fp16":
        raise RecipeError(recipe.source, "train.mixed_precision",
                          "fp16 autocast has no loss scaling in the Ray path; use bf16 (or no)")


def _nonfinite_cause(err: BaseException) -> NonFiniteError | None:
    """The NonFiniteError behind a Ray Train failure, if that is what failed."""
    from rocm_ray.train.micro import find_cause

    return find_cause(err, NonFiniteError)


def finalize_run(recipe: Recipe, out_dir: Path, checkpoint: Any, prompts: list[str], scorer: Any, wall: float,
                 steps_trained: int) -> RunResult:
    """Load the final trained weights into a fresh policy, evaluate before/after and write the run's outputs.

    ``checkpoint``: a ``ray.train.Checkpoint`` or a folder. Runs on the driver (CPU runs) or in a one-GPU
    Ray task (GPU runs); ``scorer`` is a :class:`RewardClient`, so no reward model is loaded here.
    """
    from rocm_ray.evaluate import score_images
    from rocm_ray.train.builders import build_policy
    from rocm_ray.train.inprocess import evaluate_before_after, finish_run
    from rocm_ray.train.micro import write_timing
    from rocm_ray.train.outputs import MetricsLog, SampleLog

    t = recipe.train
    if isinstance(checkpoint, (str, Path)):
        weights, state, samples = _read_final(Path(checkpoint))
    else:
        with checkpoint.as_directory() as d:
            weights, state, samples = _read_final(Path(d))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(t.seed)
    policy = build_policy(recipe, device)
    missing = [n for n, p in policy.unet.named_parameters() if p.requires_grad and n not in weights]
    unexpected = policy.unet.load_state_dict(load_file_to(weights, device), strict=False).unexpected_keys
    if missing or unexpected:
        raise RuntimeError(f"checkpoint weights do not fit the policy: missing {missing[:3]}, unexpected "
                           f"{unexpected[:3]}")

    before = evaluate_before_after(recipe, policy, scorer, prompts, reference=True)
    sample_log = SampleLog(out_dir / "samples.parquet")
    sample_log.add(0, before["prompts"], before["seeds"], before["images"],
                   score_images(scorer, before["images"], before["prompts"]), {}, None)
    for s in samples:
        sample_log.add(s["step"], s["prompts"], s["seeds"], s["images"], s["rewards"], s["components"],
                       s["divergences"])
    log = MetricsLog(out_dir, t.steps, 10**9, recipe.logging.wandb_project if recipe.logging.wandb else None,
                     recipe.logging.tensorboard, recipe.name, recipe.to_dict())
    for row in state["metrics"]:
        log.log(row)
    log.close()
    write_timing(out_dir / "timing.csv", state.get("timing", []))
    return finish_run(recipe, out_dir, policy, scorer, prompts, before, log.rows, sample_log, wall,
                      images_trained=steps_trained * t.batch_size)


def load_file_to(weights: dict[str, torch.Tensor], device: str) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in weights.items()}


def _read_final(d: Path) -> tuple[dict, dict, list]:
    from safetensors.torch import load_file

    state = read_state(d)
    if state is None or not (d / WEIGHTS_FILE).is_file():
        raise FileNotFoundError(f"{d} is not a complete rocm_ray checkpoint ({STATE_FILE} / {WEIGHTS_FILE})")
    samples = torch.load(d / SAMPLES_FILE, weights_only=True) if (d / SAMPLES_FILE).is_file() else []
    return load_file(str(d / WEIGHTS_FILE)), state, samples


def train_ray(recipe: Recipe, resume: bool = False, *, service: Any = None, callbacks: list | None = None,
              deepspeed: dict[str, Any] | None = None, fail_at_step: int | None = None,
              nonfinite_at: dict[int, str] | None = None) -> RunResult:
    """Fine-tune with regularized ROCM on Ray Train workers (DeepSpeed) and a RewardService.

    ``service``: an existing :class:`RewardService` to use (tests, several runs sharing reward replicas);
    else one is started from ``recipe.ray`` and stopped at the end. ``callbacks``: Ray Train ``UserCallback``s
    for the ``RunConfig`` (Tune's ``TuneReportCallback``: every worker report reaches Tune). ``deepspeed``:
    overrides of the DeepSpeed config (advanced). ``fail_at_step``: test hook, every worker raises once at
    that step of a run not resumed. ``nonfinite_at``: test hook, ``{step: kind}`` non-finite values injected
    into the reward (rocm_ray.train.nonfinite.inject_nonfinite).
    """
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from rocm_ray.rewards.service import RewardService, RewardServiceError, driver_reward
    from rocm_ray.train.micro import find_cause

    _check(recipe)
    from rocm_ray.train.ray_logging import quiet_ray_train

    quiet_ray_train()
    t, r = recipe.train, recipe.ray
    out_dir = resolve_output_dir(recipe)
    storage = out_dir / "ray"
    run_dir = storage / recipe.name
    resume_from = latest_checkpoint(run_dir) if resume else None
    if resume and resume_from is None:
        raise RecipeError(recipe.source, "--resume", f"no complete checkpoint in {run_dir} (train.output_dir "
                          f"{t.output_dir}, name {recipe.name}): run without --resume to start from step 0")
    prompts = prompts_of(recipe)

    needed = t.num_workers * r.cpus_per_worker + r.reward_replicas * r.reward_num_cpus + 1
    started = connect_ray(r.address, needed)
    own_service = service is None and r.reward_placement == "remote"
    try:
        bounded_placement(recipe)  # fails in seconds, before anything is written, if the run cannot fit
        out_dir.mkdir(parents=True, exist_ok=True)
        if not resume and run_dir.exists():
            prev = storage / f"{recipe.name}.previous"
            shutil.rmtree(prev, ignore_errors=True)
            run_dir.rename(prev)
            print(f"rocm-ray: a fresh run: moved the previous run's checkpoints to {prev}", flush=True)
        (out_dir / "recipe.json").write_text(json.dumps(recipe.to_dict(), indent=2))
        if own_service:
            service = RewardService.from_recipe(recipe)
        client, scorer = driver_reward(recipe, service)  # colocated: no client, the driver's own scorer
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config={"recipe": recipe, "prompts": prompts, "reward_client": client,
                               "resume_from": str(resume_from) if resume_from else None,
                               "deepspeed": deepspeed, "fail_at_step": fail_at_step,
                               "nonfinite_at": nonfinite_at},
            scaling_config=ScalingConfig(
                num_workers=t.num_workers, use_gpu=t.use_gpu,
                resources_per_worker={"CPU": r.cpus_per_worker, **r.worker_resources}),
            run_config=RunConfig(name=recipe.name, storage_path=str(storage),
                                 failure_config=FailureConfig(max_failures=t.max_failures,
                                                              controller_failure_limit=placement_retries(recipe)),
                                 checkpoint_config=CheckpointConfig(num_to_keep=2),
                                 callbacks=list(callbacks or [])),
        )
        start_step = int(read_state(resume_from)["step"]) if resume_from else 0
        t0 = time.perf_counter()
        try:
            actors = service.actors if service is not None else []  # colocated: no replicas to watch
            with ReplicaWatch(recipe, actors) as watch:  # a lost reward node: a bounded stop
                result = trainer.fit()
        except ray.train.TrainingFailedError as e:
            cause = _nonfinite_cause(e)
            if cause is not None:
                raise NonFiniteError(str(cause)) from e
            raise_if_placement_timeout(recipe, e)
            why = watch.why_failed()
            if why:
                raise RewardServiceUnavailable(why) from e
            lost = find_cause(e, RewardServiceError)
            if lost is not None:
                raise type(lost)(f"{lost} (checkpoints so far: {run_dir})") from e
            raise
        raise_if_stopped(result, out_dir, t.steps)  # non-finite steps: stopped, not failed (no retries)
        wall = time.perf_counter() - t0
        final = result.checkpoint if result.checkpoint is not None else resume_from
        if final is None:
            raise RuntimeError(f"the Ray run ended without a checkpoint in {run_dir}")
        steps_trained = max(t.steps - start_step, 0)
        if t.use_gpu:  # evaluate where the GPUs are, in one worker-sized task
            task = ray.remote(finalize_run).options(num_cpus=r.cpus_per_worker, num_gpus=1,
                                                    resources=dict(r.worker_resources),
                                                    scheduling_strategy="DEFAULT")
            res = ray.get(task.remote(recipe, out_dir, final, prompts, scorer, wall, steps_trained))
        else:
            res = finalize_run(recipe, out_dir, final, prompts, scorer, wall, steps_trained)
        return res
    finally:
        if own_service and service is not None:
            service.shutdown()
        if started:
            stop_local_ray()
