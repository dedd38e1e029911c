"""Safety by default: what the project's own local Ray exposes, secrets, pickles, remote code.

- The Ray that ``rocm-ray train`` starts (``connect_ray`` with no address), run in a subprocess with a clean
  environment and a fresh HOME: every listening socket of its processes is on loopback; every port, probed
  from the machine's external address(es) without the token, refuses; its GCS, probed on loopback without
  the token, answers UNAUTHENTICATED; nothing is written to HOME (no ~/.ray/auth_token).
- A run with W&B on (offline) and a fake ``WANDB_API_KEY``: the key is nowhere in the run's outputs or logs.
- The code never sets ``trust_remote_code`` and loads every ``torch.load`` with ``weights_only=True``.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LOOPBACK = ("127.", "::1", "::ffff:127.")
GRPC_PROBES = ("/ray.rpc.NodeInfoGcsService/GetAllNodeInfo", "/ray.rpc.NodeManagerService/GetNodeStats",
               "/ray.rpc.CoreWorkerService/NumPendingTasks", "/ray.rpc.ReporterService/ListLogs")

_CHILD = r"""
import json, os, sys
import psutil
import ray
from rocm_ray.train.ray_trainer import connect_ray, stop_local_ray

connect_ray(None, 1.0)

@ray.remote(num_cpus=0.5)
class Probe:
    def pid(self):
        return os.getpid()

actor = Probe.remote()
ray.get(actor.pid.remote())
socks = []
for p in [psutil.Process(), *psutil.Process().children(recursive=True)]:
    try:
        # named by process name + command line without directories (install paths can be long)
        cmd = " ".join(p.cmdline()).strip()
        name = f"{p.name()} {' '.join(w.rsplit('/', 1)[-1] for w in cmd.split())}"[:120]
        socks += [[p.pid, name, c.laddr.ip, c.laddr.port] for c in p.net_connections(kind="inet")
                  if c.status == psutil.CONN_LISTEN]
    except psutil.Error:
        pass
print("SOCKETS " + json.dumps({"sockets": socks, "gcs": ray.get_runtime_context().gcs_address,
                               "auth_mode": os.environ.get("RAY_AUTH_MODE"),
                               "token": bool(os.environ.get("RAY_AUTH_TOKEN"))}), flush=True)
sys.stdin.read()
stop_local_ray()
print("STOPPED", flush=True)
"""


def _external_addresses() -> list[str]:
    import psutil

    return [a.address for addrs in psutil.net_if_addrs().values() for a in addrs
            if a.family == socket.AF_INET and not a.address.startswith("127.")]


def _probe(host: str, port: int) -> str:
    """What a client without the token gets: refused | unauthenticated | http <code> | open (<detail>)."""
    import grpc

    try:
        with socket.create_connection((host, port), timeout=3) as s:
            s.sendall(b"GET / HTTP/1.1\r\nHost: probe\r\nConnection: close\r\n\r\n")
            head = s.recv(64)
    except ConnectionRefusedError:
        return "refused"
    except OSError as e:
        return f"refused ({e.__class__.__name__})"
    if head.startswith(b"HTTP/"):
        code = int(head.split()[1])
        return f"http {code}" if code in (401, 403) else f"open (http {code})"
    channel = grpc.insecure_channel(f"{host}:{port}")
    try:
        last = "open (no gRPC answer)"
        for method in GRPC_PROBES:
            try:
                channel.unary_unary(method)(b"", timeout=5)
                return f"open ({method} answered)"
            except grpc.RpcError as e:
                if e.code() == grpc.StatusCode.UNAUTHENTICATED:
                    return "unauthenticated"
                last = f"open ({method}: {e.code().name})"
                if e.code() != grpc.StatusCode.UNIMPLEMENTED:
                    return last
        return last
    finally:
        channel.close()


@pytest.mark.slow
def test_project_local_ray_is_loopback_only_token_protected_and_leaves_home_alone(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RAY_AUTH", "RAY_ENABLE_WINDOWS", "RAY_ADDRESS"))}
    env.update(HOME=str(home), PYTHONPATH=f"{REPO}{os.pathsep}{env.get('PYTHONPATH', '')}",
               RAY_USAGE_STATS_ENABLED="0")
    proc = subprocess.Popen([sys.executable, "-c", _CHILD], cwd=tmp_path, env=env, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    try:
        for line in proc.stdout:  # bounded: the child either prints SOCKETS or exits
            lines.append(line)
            if line.startswith("SOCKETS "):
                break
        assert lines and lines[-1].startswith("SOCKETS "), "".join(lines[-30:])
        info = json.loads(lines[-1][len("SOCKETS "):])
        sockets = info["sockets"]
        assert info["auth_mode"] == "token" and info["token"]
        names = " ".join(s[1] for s in sockets)
        assert "gcs_server" in names and "raylet" in names and "ray::Probe" in names, names
        table = []
        for _pid, name, ip, port in sockets:
            results = {ext: _probe(ext, port) for ext in _external_addresses()}
            table.append((name[:40], ip, port, results))
            assert ip.startswith(LOOPBACK), f"{name} listens on {ip}:{port}"
            for ext, res in results.items():  # from the external address, without the token
                assert res.startswith(("refused", "unauthenticated", "http 401", "http 403")), (name, ext, res)
        for row in table:
            print(row)
        gcs_host, gcs_port = info["gcs"].rsplit(":", 1)
        assert _probe(gcs_host, int(gcs_port)) == "unauthenticated"  # on loopback too: the token is required
    finally:
        try:
            proc.communicate(input="", timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
    assert not (home / ".ray").exists(), "the project's local Ray wrote into HOME"


def test_wandb_key_never_reaches_outputs_or_logs(tmp_path, monkeypatch, capfd):
    pytest.importorskip("wandb")
    from rocm_ray.cli import main

    key = "rocmraytestfakekey" + "0123456789abcdef" * 2  # 50 characters, the shape of a W&B key
    monkeypatch.setenv("WANDB_API_KEY", key)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    code = main(["train", "recipes/tiny_debug.yaml", f"train.output_dir={out}", "train.steps=1", "train.batch_size=2",
                 "logging.wandb=true", "data.eval_seeds=1"])
    logs = capfd.readouterr()
    assert code == 0, logs.err[-2000:]
    assert (out / "metrics.csv").is_file()
    files = [p for p in out.rglob("*") if p.is_file()]
    assert any("wandb" in str(p) for p in files), "W&B wrote no offline run: the check would be vacuous"
    leaked = [str(p.relative_to(out)) for p in files if key.encode() in p.read_bytes()]
    assert leaked == [], f"the W&B key is in {leaked}"
    assert key not in logs.out and key not in logs.err


def test_no_remote_code_and_no_pickle_loads():
    """Every torch.load call (the AST, not comments) passes weights_only=True; trust_remote_code is never set."""
    import ast

    sources = [p for d in ("rocm_ray", "benchmarks") for p in (REPO / d).rglob("*.py")]
    offenders, loads = [], 0
    for p in sources:
        for node in ast.walk(ast.parse(p.read_text())):
            if not isinstance(node, ast.Call):
                continue
            kwargs = {k.arg: k.value for k in node.keywords}
            if "trust_remote_code" in kwargs:
                offenders.append(f"{p}:{node.lineno}: trust_remote_code")
            f = node.func
            if isinstance(f, ast.Attribute) and f.attr == "load" and getattr(f.value, "id", "") == "torch":
                loads += 1
                w = kwargs.get("weights_only")
                if not (isinstance(w, ast.Constant) and w.value is True):
                    offenders.append(f"{p}:{node.lineno}: torch.load without weights_only=True")
    assert loads >= 5  # the scan sees the loads it is meant to check
    assert offenders == []
