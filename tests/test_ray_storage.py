"""Two Ray nodes that share no filesystem, with the run's storage on S3 (a real moto server on loopback).

One machine, two nodes: the head (1 CPU, ``reward: 1``: the RewardService) and a worker node (2 CPUs,
``trainer: 2``: both Ray Train workers) whose processes run in their own mount namespace with a private
tmpfs over /tmp, where the head, the driver and pytest keep their files. A local ``train.output_dir`` is
therefore node-local and must be refused before training; ``s3://`` works from every node.

One run (a subprocess driver, like ``rocm-ray train`` on a cluster) goes through the faults in order:
rank 1 SIGKILLs itself mid-step 4 (Ray Train restarts the group from the step-2 checkpoint, read back from
S3), rank 1 then stalls uploading its files of the step-6 checkpoint (rank 0's are on S3 already) and
the driver is SIGKILLed; ``--resume`` with 1 worker and another lr continues from step 4 (the newest
checkpoint Ray registered) to step 8. Losses are compared with the in-process trainer (same seeds) at the
tolerance of docs/distributed.md.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from rocm_ray.config import load_recipe

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TOL = 1e-5  # Ray (2 workers ZeRO 2 / 1 worker) vs in-process, per-step loss (measured: see docs/distributed.md)
RUN = "s3run"
COMMON = [f"name={RUN}", "train.checkpoint_every=2", "train.max_failures=1", "data.eval_seeds=1",
          "ray.reward_resources={reward: 1}", "ray.worker_resources={trainer: 1}", "logging.tensorboard=true"]


def _free_ports(n: int) -> list[int]:
    from rocm_ray.cluster import free_ports as free  # the project's own loopback port picker

    return free(n)


def _namespace_refused() -> str | None:
    if not shutil.which("unshare"):
        return "unshare(1) is not installed"
    p = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                        "mount -t tmpfs tmpfs /mnt && true"], capture_output=True, text=True, timeout=30)
    if p.returncode:
        return f"the kernel refuses a private mount namespace with a tmpfs (needs root / CAP_SYS_ADMIN): {p.stderr}"
    return None


@pytest.fixture(scope="module")
def cluster(s3_server):
    pytest.importorskip("ray")
    psutil = pytest.importorskip("psutil")
    reason = _namespace_refused()
    if reason:
        pytest.skip(reason)
    from rocm_ray.cluster import stop_processes as _stop_head  # stops exactly the processes of these marks

    head_tmp = tempfile.mkdtemp(prefix="rrst", dir="/tmp")  # short: Ray's socket paths must fit 107 chars
    worker_tmp = f"/tmp/rrsw{uuid.uuid4().hex[:8]}"  # exists only inside the worker node's namespace
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(s3_server["env"], PATH=f"{BIN}:{env.get('PATH', '')}", PYTHONPATH=str(REPO),
               RAY_USAGE_STATS_ENABLED="0", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_AUTH_MODE="disabled")
    worker_env = {k: v for k, v in env.items() if k != "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"}
    gcs, client, agent_http, agent_grpc, metrics, env_agent, *wports = _free_ports(12)
    head = [str(BIN / "ray"), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={gcs}",
            f"--temp-dir={head_tmp}", "--num-cpus=1", "--resources={\"reward\": 1}", "--include-dashboard=false",
            f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent_http}",
            f"--dashboard-agent-grpc-port={agent_grpc}", f"--metrics-export-port={metrics}",
            f"--runtime-env-agent-port={env_agent}", "--disable-usage-stats"]
    w_nm, w_om, w_http, w_grpc, w_metrics, w_env = wports
    # `ray start` of a second node refuses RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 and would rewrite 127.0.0.1 to
    # the external IP (where this head does not listen): the same CLI, with the node's IP pinned to loopback
    pin = ("import sys, ray._private.services as s; s.get_node_ip_address = lambda address=None: '127.0.0.1'; "
           "from ray.scripts.scripts import main; sys.argv[0] = 'ray'; sys.exit(main())")
    worker = " ".join([sys.executable, "-c", shlex.quote(pin), "start", f"--address=127.0.0.1:{gcs}",
                       "--node-ip-address=127.0.0.1",
                       f"--temp-dir={worker_tmp}", "--num-cpus=2", "--resources='{\"trainer\": 2}'",
                       f"--node-manager-port={w_nm}", f"--object-manager-port={w_om}",
                       f"--dashboard-agent-listen-port={w_http}", f"--dashboard-agent-grpc-port={w_grpc}",
                       f"--metrics-export-port={w_metrics}", f"--runtime-env-agent-port={w_env}",
                       "--disable-usage-stats"])
    mp = pytest.MonkeyPatch()
    for k, v in s3_server["env"].items():
        mp.setenv(k, v)
    marks = [head_tmp, worker_tmp, f"127.0.0.1:{gcs}"]
    keep = tempfile.mkdtemp(prefix="rrkeep", dir="/var/tmp")  # mount points only, in the node's namespace
    try:
        h = subprocess.run(head, env=env, timeout=240, capture_output=True, text=True)
        if h.returncode:  # `ray start` waits only 30 s for its raylet; on a loaded machine it registers later
            print(f"head's `ray start` returned {h.returncode}; waiting for its raylet:\n{h.stderr[-2000:]}")
        import ray

        mp.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # the driver resolves its own IP to loopback
        mp.setattr(ray._private.ray_constants, "ENABLE_RAY_CLUSTER", False)
        mp.setenv("RAY_AUTH_MODE", "disabled")
        from rocm_ray.train.ray_logging import SETUP_HOOK

        ray.init(address=f"127.0.0.1:{gcs}", runtime_env={"worker_process_setup_hook": SETUP_HOOK})
        errors = ""
        for _attempt in range(2):  # `ray start` waits only 30 s for its raylet: a loaded machine can miss that
            # the worker node: its own mount namespace, a private tmpfs over /tmp (the head's and pytest's files)
            p = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                                _private_tmp(worker, keep)], env=worker_env, timeout=240,
                               capture_output=True, text=True)
            errors += p.stderr[-2000:]
            end = time.monotonic() + (60 if p.returncode else 180)
            while len([n for n in ray.nodes() if n["Alive"]]) < 2 and time.monotonic() < end:
                time.sleep(0.5)
            if len([n for n in ray.nodes() if n["Alive"]]) == 2:
                break
            _stop_head([worker_tmp])  # this attempt's leftovers, then once more
        assert len([n for n in ray.nodes() if n["Alive"]]) == 2, f"the worker node never joined: {errors}"
        yield {"address": f"127.0.0.1:{gcs}", "env": env, "bucket": s3_server["bucket"]}
    finally:
        try:
            import ray

            ray.shutdown()
        except Exception:  # noqa: BLE001 - best effort
            pass
        mp.undo()
        _stop_head(marks)
        del psutil
        shutil.rmtree(head_tmp, ignore_errors=True)
        shutil.rmtree(keep, ignore_errors=True)


def _private_tmp(command: str, keep: str) -> str:
    """Shell line for the worker node's namespace: a private tmpfs over /tmp, then ``command``.

    The code (this checkout, the Python of its venv) stays visible when it lives under /tmp itself (a clone
    there): each such top folder is bind-mounted aside under ``keep`` first and back after the tmpfs, as
    every node of a real cluster has the code installed. Nothing else of the host's /tmp is visible."""
    code = {q for p in (REPO, sys.executable) for q in (Path(p), Path(p).resolve())}
    tops = sorted({Path("/tmp", p.relative_to("/tmp").parts[0]) for p in code if p.is_relative_to("/tmp")})
    steps = []
    for i, top in enumerate(tops):
        steps.append(f"mkdir -p {keep}/{i} && mount --bind {shlex.quote(str(top))} {keep}/{i}")
    steps.append("mount -t tmpfs tmpfs /tmp")
    for i, top in enumerate(tops):
        steps.append(f"mkdir -p {shlex.quote(str(top))} && mount --bind {keep}/{i} {shlex.quote(str(top))}")
    return " && ".join([*steps, f"exec {command}"])


def test_node_local_storage_fails_fast(cluster, tmp_path):
    from rocm_ray.train.ray_trainer import train_ray
    from rocm_ray.train.storage import StorageError

    recipe = load_recipe("recipes/tiny_ray.yaml", [*COMMON, "name=local", f"train.output_dir={tmp_path}/run"])
    t0 = time.monotonic()
    with pytest.raises(StorageError) as e:
        train_ray(recipe)
    took = time.monotonic() - t0
    msg = str(e.value)
    print(f"node-local storage refused after {took:.1f} s")
    assert took < 60
    assert "train.output_dir" in msg and "ROCM_RAY_OUTPUT_ROOT" in msg and "node-local" in msg
    assert "s3://" in msg and "/mnt/shared" in msg  # what to set
    assert not (tmp_path / "run").exists()  # nothing written


def _driver(cluster, log: Path, *args: str, hooks: dict | None = None) -> subprocess.Popen:
    env = dict(cluster["env"], RAY_ADDRESS=cluster["address"], RAY_DEDUP_LOGS="0")
    if hooks:
        env["ROCM_RAY_TEST_HOOKS"] = json.dumps(hooks)
    return subprocess.Popen([sys.executable, "-m", "rocm_ray.cli", "train", "recipes/tiny_ray.yaml", *COMMON,
                             *args], cwd=REPO, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)


def _inprocess(out: Path, *overrides: str, resume: bool = False):
    from rocm_ray.train.inprocess import train_inprocess

    recipe = load_recipe("recipes/tiny_debug.yaml", [f"train.output_dir={out}", "data.eval_seeds=1",
                                                     "train.checkpoint_every=4", *overrides])
    return train_inprocess(recipe, resume=resume)


def test_s3_run_survives_a_killed_worker_and_a_killed_driver(cluster, tmp_path):
    from rocm_ray.train.checkpoint import registered_checkpoints
    from rocm_ray.train.ray_trainer import latest_checkpoint
    from rocm_ray.train.storage import RunStorage, read_metrics

    loc = f"s3://{cluster['bucket']}/runs/{RUN}"
    storage = RunStorage(loc)
    out = [f"train.output_dir={loc}"]
    # 1. rank 1 SIGKILLs itself in step 4; rank 1 stalls uploading the step-6 checkpoint; the driver dies
    log1 = tmp_path / "driver1.log"
    drv = _driver(cluster, log1, *out, "train.steps=8",
                  hooks={"kill_rank_at": [1, 4], "stall_save": [1, 6, 600]})
    torn = f"ray/{RUN}/checkpoint_000006"
    end = time.monotonic() + 600
    while time.monotonic() < end and drv.poll() is None and not (
            storage.is_file(f"{torn}/manifest_rank0.json") and storage.is_file(f"{torn}/state.json")):
        time.sleep(0.5)
    time.sleep(1.0)  # rank 0's upload of its last files (it uploads file by file)
    if drv.poll() is not None or not storage.is_file(f"{torn}/state.json"):
        drv.kill()
        drv.wait(timeout=30)
        pytest.fail(f"the driver ended, or rank 0 never uploaded step 6:\n{log1.read_text()[-5000:]}")
    os.kill(drv.pid, signal.SIGKILL)  # the driver dies while the step-6 checkpoint is half written
    drv.wait(timeout=30)
    rows_a = read_metrics(storage)
    assert [r["step"] for r in rows_a] == [1, 2, 3, 4, 5, 6], "metrics.csv: every finished step, once"
    run_storage = storage.child("ray", RUN)
    assert "checkpoint_000006" not in registered_checkpoints(run_storage, "")
    assert str(latest_checkpoint(run_storage.location)).endswith("checkpoint_000004")
    state4 = json.loads(storage.read_text(f"ray/{RUN}/checkpoint_000004/state.json"))
    assert state4["attempt_start"] == 2  # written by the attempt Ray Train restarted from the step-2 checkpoint
    assert state4["world_size"] == 2

    # a torn copy (one rank's files removed) is never picked: a copy of the run folder, rank 1's shard gone
    import pyarrow.fs

    copy = storage.child("ray", "torn_copy")
    pyarrow.fs.copy_files(run_storage.path(), copy.path(), source_filesystem=storage.fs,
                          destination_filesystem=storage.fs)
    m1 = json.loads(copy.read_text("checkpoint_000004/manifest_rank1.json"))["files"]
    shard = next(f for f in m1 if "optim_states" in f)
    copy.delete(f"checkpoint_000004/{shard}")
    assert str(latest_checkpoint(copy.location)).endswith("checkpoint_000002")

    # 2. --resume with 1 worker (2 -> 1, ZeRO 2) and a new lr: from step 4, not from the torn step 6
    log2 = tmp_path / "driver2.log"
    drv = _driver(cluster, log2, *out, "train.steps=8", "train.num_workers=1", "train.lr=0.02", "--resume")
    try:
        rc = drv.wait(timeout=600)
    except subprocess.TimeoutExpired:
        drv.kill()
        raise
    text = log2.read_text()
    assert rc == 0, text[-6000:]
    assert "checkpoint_000004 (step 4)" in text
    assert "checkpoint_000006: an incomplete checkpoint" in text  # the torn folder is removed, and only it
    assert text.count("an incomplete checkpoint Ray Train never registered") == 1
    assert "train.lr: 0.05 -> 0.02" in text and "train.num_workers: 2 -> 1" in text
    assert "elastic resume: 2 worker(s) ZeRO 2 -> 1 worker(s) ZeRO 2" in text
    rows = read_metrics(storage)
    assert [r["step"] for r in rows] == list(range(1, 9)), "no duplicated or missing step after the resume"
    assert [r["lr"] for r in rows] == [0.05] * 4 + [0.02] * 4  # the optimizer's own lr, per step

    # outputs where docs/outputs.md says, on S3
    files = storage.files()
    for name in ("recipe.json", "metrics.csv", "summary.json", "summary.md", "samples.parquet", "curves.png",
                 "grid.png", "weights/lora/pytorch_lora_weights.safetensors",
                 f"ray/{RUN}/checkpoint_000008/state.json"):
        assert name in files, f"{name} not on S3: {sorted(files)[:40]}"
    assert any(f.startswith("tensorboard/events.out.tfevents") for f in files)
    assert json.loads(storage.read_text("summary.json"))["steps"] == 8

    # the same numbers as the in-process trainer: steps 1-6 (one worker killed in step 4, restored from step 2),
    # and steps 5-8 resumed from step 4 with lr 0.02 on 1 worker
    ref = _inprocess(tmp_path / "ref", "train.steps=6")
    ref_a = np.array([r["loss"] for r in ref.metrics])
    _inprocess(tmp_path / "ref2", "train.steps=4")
    ref_b = _inprocess(tmp_path / "ref2", "train.steps=8", "train.lr=0.02", resume=True)
    ref_b = np.array([r["loss"] for r in ref_b.metrics])
    ray_losses = np.array([r["loss"] for r in rows])
    err_a = np.abs(np.array([r["loss"] for r in rows_a]) - ref_a).max()
    err_b = np.abs(ray_losses[4:] - ref_b[4:]).max()
    print(f"S3 run vs in-process: steps 1-6 (worker killed in step 4) {err_a:.3g}; resumed 2->1 steps 5-8 {err_b:.3g}")
    assert err_a <= TOL and err_b <= TOL

