"""``train_ray``: the distributed ROCM trainer (Ray Train + DeepSpeed workers, a RewardService).

    driver ── RewardService (reward replicas: Ray actors, GPU fractions / custom resource "reward")
       └──── TorchTrainer: train.num_workers workers, each a DeepSpeed engine (rocm_ray.train.ray_worker)
       └──── after training: evaluation and outputs (metrics.csv, curves.png, grid.png, samples.parquet,
             weights/, summary.md/json) through the same code as the in-process trainer

Ray: ``ray.address`` in the recipe, else ``$RAY_ADDRESS`` (a cluster, or the job a ``ray job submit``
runs), else a local Ray bound to 127.0.0.1. The run lives at ``train.output_dir`` (a folder or a URI such
as ``s3://bucket/prefix``; a relative one under ``$ROCM_RAY_OUTPUT_ROOT``): see
:mod:`rocm_ray.train.storage`. Ray Train's checkpoints live in ``<location>/ray/<name>/``; on a cluster of
several nodes the location must be storage every node reaches (checked before training).

Resume: ``--resume`` continues from the newest complete checkpoint Ray Train registered in
``<location>/ray/<name>/`` (:mod:`rocm_ray.train.checkpoint`); a fresh run over an existing one is refused
unless ``force`` (``--force``), which deletes it.
"""

from __future__ import annotations

import json
import os
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
from rocm_ray.train.storage import OUTPUT_ROOT_ENV, RunStorage, Staging, StorageError, run_location

TEST_HOOKS_ENV = "ROCM_RAY_TEST_HOOKS"  # tests only: JSON {"kill_rank_at": [rank, step], "stall_save": [...]}
__all__ = ["OUTPUT_ROOT_ENV", "resolve_output_dir", "latest_checkpoint", "train_ray", "finalize_run"]


def resolve_output_dir(recipe: Recipe) -> Path:
    """The absolute local output folder (``train.output_dir`` under ``$ROCM_RAY_OUTPUT_ROOT`` if relative);
    a URI location has none: see :func:`rocm_ray.train.storage.run_location`."""
    loc = run_location(recipe)
    if "://" in loc:
        raise ValueError(f"the run location {loc} is a URI, not a local folder")
    return Path(loc)


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
    ``address="local"``: always a new Ray; without it ``ray.init`` joins any Ray it finds running on the machine.
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


def latest_checkpoint(run_dir: str | Path) -> Path | str | None:
    """The newest complete checkpoint of the Ray run folder ``run_dir`` (a local path or a URI).

    Only checkpoints in Ray Train's registry (``checkpoint_manager_snapshot.json``) whose every rank's
    files are present count (:mod:`rocm_ray.train.checkpoint`). A local path for a local folder, else a URI.
    """
    from rocm_ray.train.checkpoint import latest_complete, registered_checkpoints

    storage = RunStorage(str(run_dir))
    found = latest_complete(storage, "", registered_checkpoints(storage, ""))
    if found is None:
        return None
    rel = found[0].strip("/")
    return storage.local_path / rel if storage.is_local else storage.uri(rel)


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


def finalize_run(recipe: Recipe, location: str | Path, checkpoint: Any, prompts: list[str], scorer: Any,
                 wall: float, steps_trained: int) -> RunResult:
    """Load the final trained weights into a fresh policy, evaluate before/after and write the run's outputs.

    ``checkpoint``: a ``ray.train.Checkpoint``, a folder or a URI. Runs on the driver (CPU runs) or in a
    one-GPU Ray task (GPU runs) on any node: the outputs are written into a local staging folder and
    committed to the run ``location`` through its filesystem (a shared folder, S3, ...). ``metrics.csv``
    (and TensorBoard / W&B) were written by rank 0 while training. ``scorer`` is a :class:`RewardClient`.
    """
    from rocm_ray.evaluate import score_images
    from rocm_ray.train.builders import build_policy
    from rocm_ray.train.inprocess import evaluate_before_after, finish_run
    from rocm_ray.train.micro import write_timing
    from rocm_ray.train.outputs import SampleLog

    t = recipe.train
    import ray.train

    if isinstance(checkpoint, (str, Path)):
        checkpoint = ray.train.Checkpoint(str(checkpoint))
    with checkpoint.as_directory() as d:
        weights, state, samples = _read_final(Path(d))
    stage = Staging(RunStorage(str(location)))
    out_dir = stage.dir
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
    write_timing(out_dir / "timing.csv", state.get("timing", []))
    res = finish_run(recipe, out_dir, policy, scorer, prompts, before, state["metrics"], sample_log, wall,
                     images_trained=steps_trained * t.batch_size)
    stage.commit()
    if not stage.storage.is_local:
        print(f"rocm-ray: outputs committed to {stage.storage.location}/", flush=True)
    return res


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
              nonfinite_at: dict[int, str] | None = None, force: bool = False) -> RunResult:
    """Fine-tune with regularized ROCM on Ray Train workers (DeepSpeed) and a RewardService.

    ``service``: an existing :class:`RewardService` to use (tests, several runs sharing reward replicas);
    else one is started from ``recipe.ray`` and stopped at the end. ``callbacks``: Ray Train ``UserCallback``s
    for the ``RunConfig`` (Tune's ``TuneReportCallback``: every worker report reaches Tune). ``deepspeed``:
    overrides of the DeepSpeed config (advanced). ``fail_at_step``: test hook, every worker raises once at
    that step of a run not resumed. ``nonfinite_at``: test hook, ``{step: kind}`` non-finite values injected
    into the reward (rocm_ray.train.nonfinite.inject_nonfinite). ``force``: replace (delete) an existing run at
    the same location.
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
    storage = RunStorage(run_location(recipe))
    run_rel = f"ray/{recipe.name}"
    resume_from, start_step = _prepare_location(recipe, storage, run_rel, resume, force)
    prompts = prompts_of(recipe)

    needed = t.num_workers * r.cpus_per_worker + r.reward_replicas * r.reward_num_cpus + 1
    started = connect_ray(r.address, needed)
    own_service = service is None and r.reward_placement == "remote"
    try:
        bounded_placement(recipe)  # fails in seconds, before anything is written, if the run cannot fit
        from rocm_ray.train.storage import check_storage_shared

        check_storage_shared(storage, recipe.source)  # node-local storage on a multi-node cluster: refused now
        if force and not resume:
            storage.delete(run_rel)
            storage.delete("metrics.csv")
        storage.write_text("recipe.json", json.dumps(recipe.to_dict(), indent=2))
        if own_service:
            service = RewardService.from_recipe(recipe)
        client, scorer = driver_reward(recipe, service)  # colocated: no client, the driver's own scorer
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config={"recipe": recipe, "prompts": prompts, "reward_client": client,
                               "resume_from": str(resume_from) if resume_from else None,
                               "deepspeed": deepspeed, "fail_at_step": fail_at_step,
                               "nonfinite_at": nonfinite_at, "location": storage.location,
                               "test_hooks": json.loads(os.environ.get(TEST_HOOKS_ENV, "{}"))},
            scaling_config=ScalingConfig(
                num_workers=t.num_workers, use_gpu=t.use_gpu,
                resources_per_worker={"CPU": r.cpus_per_worker, **r.worker_resources}),
            run_config=RunConfig(name=recipe.name, storage_path=storage.uri("ray"),
                                 failure_config=FailureConfig(max_failures=t.max_failures,
                                                              controller_failure_limit=placement_retries(recipe)),
                                 checkpoint_config=CheckpointConfig(num_to_keep=2),
                                 callbacks=list(callbacks or [])),
        )
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
                raise type(lost)(f"{lost} (checkpoints so far: {storage.uri(run_rel)})") from e
            raise
        raise_if_stopped(result)  # non-finite steps: stopped, not failed (no retries)
        wall = time.perf_counter() - t0
        final = result.checkpoint if result.checkpoint is not None else resume_from
        if final is None:
            raise RuntimeError(f"the Ray run ended without a checkpoint in {storage.uri(run_rel)}")
        steps_trained = max(t.steps - start_step, 0)
        if t.use_gpu:  # evaluate where the GPUs are, in one worker-sized task
            task = ray.remote(finalize_run).options(num_cpus=r.cpus_per_worker, num_gpus=1,
                                                    resources=dict(r.worker_resources),
                                                    scheduling_strategy="DEFAULT")
            res = ray.get(task.remote(recipe, storage.location, final, prompts, scorer, wall, steps_trained))
        else:
            res = finalize_run(recipe, storage.location, final, prompts, scorer, wall, steps_trained)
        return res
    finally:
        if own_service and service is not None:
            service.shutdown()
        if started:
            stop_local_ray()


def _prepare_location(recipe: Recipe, storage: RunStorage, run_rel: str, resume: bool,
                      force: bool) -> tuple[str | Path | None, int]:
    """Before Ray starts: the checkpoint ``--resume`` continues from (checked against the recipe) and its
    step, or a refusal to start a fresh run over an existing one without ``force``."""
    from rocm_ray.train.checkpoint import check_resume, is_checkpoint_name, registered_checkpoints

    exists = bool(registered_checkpoints(storage, run_rel)) or any(
        is_checkpoint_name(n) for n in storage.listdir(run_rel))
    if not resume:
        if exists and not force:
            raise StorageError(recipe.source, (
                f"a run already exists at {storage.uri(run_rel)}: pass --resume to continue it, or --force to "
                "delete it and start afresh (or choose another name / train.output_dir)"))
        return None, 0
    resume_from = latest_checkpoint(storage.uri(run_rel))
    if resume_from is None:
        raise StorageError(recipe.source, (
            f"--resume: no complete checkpoint in {storage.uri(run_rel)} (train.output_dir "
            f"{recipe.train.output_dir}, name {recipe.name}): run without --resume to start from step 0"))
    state = read_state(resume_from)
    check_resume(recipe, state, str(resume_from))
    registered = set(registered_checkpoints(storage, run_rel))
    for name in storage.listdir(run_rel):  # debris of an attempt that died while saving: never registered
        if is_checkpoint_name(name) and name not in registered and name > Path(str(resume_from)).name:
            print(f"rocm-ray: removing {storage.uri(run_rel, name)}: an incomplete checkpoint Ray Train never "
                  "registered (its step is trained again)", flush=True)
            storage.delete(f"{run_rel}/{name}")
    print(f"rocm-ray: --resume from {resume_from} (step {state['step']})", flush=True)
    return resume_from, int(state["step"])
