"""The README's laptop flow: `rocm-ray cluster up`, then `ray job submit --working-dir . --runtime-env
cluster/runtime_env.yaml -- rocm-ray train recipes/tiny_ray.yaml ...`, then `rocm-ray cluster down`.

The head (rocm_ray/cluster.py) listens on 127.0.0.1 with a free port for every port, its own temporary
folder and its own auth token, so it never collides with another Ray on the machine; `down` stops exactly
the processes it started (`ray stop` would kill every Ray on the machine). Every command runs with HOME set
to a temporary folder, which must stay without `.ray/` (Ray 2.60 keeps its default token in ~/.ray).
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _cli(args: list[str], env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "rocm-ray"), *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    pytest.importorskip("ray")
    pytest.importorskip("psutil")
    import tempfile

    home = tmp_path_factory.mktemp("home")
    state = Path(tempfile.mkdtemp(prefix="rrc", dir="/tmp")) / "c"  # short: Ray's socket paths <= 107 bytes
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")}
    env.update(HOME=str(home), PATH=f"{BIN}:{env.get('PATH', '')}",
               PYTHONPATH=f"{REPO}{os.pathsep}{env.get('PYTHONPATH', '')}")
    up = _cli(["cluster", "up", "--state-dir", str(state), "--num-cpus", "4"], env)
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        yield state, env, up.stdout
    finally:
        down = _cli(["cluster", "down", "--state-dir", str(state)], env, timeout=120)
        assert down.returncode == 0, down.stdout + down.stderr
        from rocm_ray.cluster import processes_of

        left = processes_of([str(state / "ray")])
        assert not left, f"processes of the head still alive after down: {[p.pid for p in left]}"
        assert not state.exists()
        state.parent.rmdir()
        assert not (home / ".ray").exists(), "the flow touched ~/.ray"


def _client_env(stdout: str, env: dict) -> dict:
    """The `export ...` line `cluster up` printed, applied to ``env``."""
    line = next(ln.strip() for ln in stdout.splitlines() if ln.strip().startswith("export RAY_ADDRESS="))
    pairs = dict(kv.split("=", 1) for kv in shlex.split(line)[1:])
    assert set(pairs) == {"RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH"}
    return {**env, **pairs}


def test_cluster_up_prints_a_working_submit_line_and_status(cluster):
    state, env, stdout = cluster
    assert "dashboard:  http://127.0.0.1:" in stdout
    assert ("ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml -- rocm-ray train "
            "recipes/tiny_ray.yaml") in stdout
    status = _cli(["cluster", "status", "--state-dir", str(state)], env)
    assert status.returncode == 0 and "CPU" in status.stdout, status.stdout + status.stderr
    token = Path(_client_env(stdout, env)["RAY_AUTH_TOKEN_PATH"])
    assert token.is_file() and token.parent == state and (token.stat().st_mode & 0o077) == 0
    again = _cli(["cluster", "up", "--state-dir", str(state)], env)  # idempotent: the same head
    assert again.returncode == 0 and _client_env(again.stdout, env) == _client_env(stdout, env)


def test_the_token_is_required(cluster):
    """Token authentication is on: without the token the job API refuses, with it it answers."""
    state, env, stdout = cluster
    client = _client_env(stdout, env)
    ok = subprocess.run([str(BIN / "ray"), "job", "list"], env=client, capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stdout[-2000:] + ok.stderr[-2000:]
    no_token = {**client, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(state / "nope")}
    bad = subprocess.run([str(BIN / "ray"), "job", "list"], env=no_token, capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode != 0


def test_readme_job_submit_trains_and_writes_outputs(cluster, tmp_path):
    state, env, stdout = cluster
    client = _client_env(stdout, env)
    out = tmp_path / "tiny_ray"
    sid = f"rocm-ray-test-{uuid.uuid4().hex[:8]}"
    # the README line, with a smaller run: 1 worker, 2 steps (checkpoint at the end)
    cmd = [str(BIN / "ray"), "job", "submit", "--submission-id", sid, "--working-dir", ".",
           "--runtime-env", "cluster/runtime_env.yaml", "--", "rocm-ray", "train", "recipes/tiny_ray.yaml",
           f"train.output_dir={out}", "train.steps=2", "train.num_workers=1"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=client, capture_output=True, text=True, timeout=900)
    print(f"job: {time.perf_counter() - t0:.1f} s")
    logs = proc.stdout[-6000:] + proc.stderr[-3000:]
    status = subprocess.run([str(BIN / "ray"), "job", "status", sid], env=client, capture_output=True,
                            text=True, timeout=120)
    assert f"Job '{sid}' succeeded" in status.stdout + status.stderr, f"{status.stdout}{status.stderr}\n{logs}"
    for f in ("metrics.csv", "summary.json", "grid.png", "samples.parquet",
              "weights/lora/pytorch_lora_weights.safetensors"):
        assert (out / f).is_file(), f"{f} missing in {out}\n{logs}"
    assert (out / "ray" / "tiny_ray").is_dir()  # Ray Train's checkpoints of the job's run
    # a clean run log: rocm_ray's step lines and summary table, no library warnings or loading bars
    assert "step    2/2" in logs and "tiny_ray: summary" in logs, logs
    for noise in ("FutureWarning", "Loading pipeline components", "Reporting training result",
                  "Setting accelerator to CPU", "Found multiple active Ray instances"):
        assert noise not in logs, f"{noise!r} in the job log:\n{logs}"


@pytest.mark.parametrize("argv, words", [
    (["cluster", "up", "--state-dir", "/tmp/" + "x" * 70], ["too long", "--state-dir"]),
    (["cluster", "up", "--state-dir", "{tmp}/c", "--resources", "[1]"], ["--resources", "JSON object"]),
    (["cluster", "env", "--state-dir", "{tmp}/c"], ["not running"]),
])
def test_cluster_bad_input_exits_2(tmp_path, capsys, argv, words):
    """Bad input: one line, exit code 2, nothing created."""
    from rocm_ray.cli import main

    argv = [a.format(tmp=tmp_path) for a in argv]
    assert main(argv) == 2
    captured = capsys.readouterr()
    text = (captured.err + captured.out).strip()
    assert len(text.splitlines()) == 1 and all(w in text for w in words), text
    assert not (tmp_path / "c").exists() and not Path("/tmp/" + "x" * 70).exists()
