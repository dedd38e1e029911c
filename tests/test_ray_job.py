"""`ray job submit` against a Ray head this test starts (and stops) itself.

The head listens on 127.0.0.1 with its own temporary folder and free ports, so it never collides with
another Ray on the machine. It is stopped by killing exactly the processes it started (those whose command
line names its temporary folder or its GCS address, and their descendants): `ray stop` would kill every
Ray on the machine.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _processes_of(marks: list[str]) -> list:
    """Processes whose command line contains one of ``marks`` (this head's temporary folder, its GCS
    address), plus all their descendants."""
    import psutil

    roots = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if any(m in arg for arg in (p.info["cmdline"] or []) for m in marks):
                roots.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    found = {p.pid: p for p in roots}
    for p in roots:
        try:
            for c in p.children(recursive=True):
                found[c.pid] = c
        except psutil.NoSuchProcess:
            continue
    return list(found.values())


def _stop_head(marks: list[str]) -> None:
    import psutil

    procs = _processes_of(marks)
    for p in procs:
        try:
            p.send_signal(signal.SIGTERM)
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=5)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


@pytest.fixture(scope="module")
def ray_head():
    pytest.importorskip("ray")
    pytest.importorskip("psutil")
    temp_dir = tempfile.mkdtemp(prefix="rrjob", dir="/tmp")  # short: Ray's socket paths must fit 107 chars
    gcs, dash, client, agent_http, agent_grpc, metrics, env_agent = _free_ports(7)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    # RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0: drivers (the job's included) resolve their own IP to loopback;
    # otherwise Ray rewrites 127.0.0.1 addresses to the machine's external IP, where this head does not listen
    # RAY_AUTH_MODE=disabled: no token authentication on this loopback-only, test-only head (and the CLI
    # calls below), whatever ~/.ray/auth_token holds
    env.update(PATH=f"{BIN}:{env.get('PATH', '')}", RAY_USAGE_STATS_ENABLED="0",
               RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_AUTH_MODE="disabled")
    cmd = [str(BIN / "ray"), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={gcs}",
           f"--temp-dir={temp_dir}", "--num-cpus=4", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
           f"--dashboard-port={dash}", f"--ray-client-server-port={client}",
           f"--dashboard-agent-listen-port={agent_http}", f"--dashboard-agent-grpc-port={agent_grpc}",
           f"--metrics-export-port={metrics}", f"--runtime-env-agent-port={env_agent}",
           "--disable-usage-stats"]
    try:
        subprocess.run(cmd, check=True, env=env, timeout=240, capture_output=True, text=True)
        yield f"http://127.0.0.1:{dash}", env
    finally:
        _stop_head([temp_dir, f"127.0.0.1:{gcs}"])  # the client server names only the GCS address
        shutil.rmtree(temp_dir, ignore_errors=True)


def _job_status(address: str, env: dict, sid: str) -> str:
    out = subprocess.run([str(BIN / "ray"), "job", "status", "--address", address, sid], env=env,
                         capture_output=True, text=True, timeout=120)
    return out.stdout + out.stderr


def test_job_submit_trains_and_writes_outputs(ray_head, tmp_path):
    address, env = ray_head
    out_root = tmp_path / "job_outputs"
    runtime_env = yaml.safe_load((REPO / "cluster/runtime_env.yaml").read_text())
    runtime_env["env_vars"]["ROCM_RAY_OUTPUT_ROOT"] = str(out_root)  # where relative output_dirs land
    rt_file = tmp_path / "runtime_env.yaml"
    rt_file.write_text(yaml.safe_dump(runtime_env))
    sid = f"rocm-ray-test-{uuid.uuid4().hex[:8]}"
    cmd = [str(BIN / "ray"), "job", "submit", "--address", address, "--submission-id", sid,
           "--working-dir", ".", "--runtime-env", str(rt_file), "--",
           "rocm-ray", "train", "recipes/tiny_debug.yaml", "train.steps=2", "train.num_workers=1"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    print(f"job: {time.perf_counter() - t0:.1f} s")
    logs = proc.stdout[-4000:] + proc.stderr[-4000:]
    status = _job_status(address, env, sid)
    assert f"Job '{sid}' succeeded" in status, f"{status}\n{logs}"
    out = out_root / "outputs" / "tiny_debug"
    for f in ("metrics.csv", "summary.json", "grid.png", "samples.parquet",
              "weights/lora/pytorch_lora_weights.safetensors"):
        assert (out / f).is_file(), f"{f} missing in {out}\n{logs}"
    assert (out / "ray" / "tiny_debug").is_dir()  # Ray Train's checkpoints of the job's run
