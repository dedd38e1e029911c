"""``rocm-ray cluster up|down|status|env``: a local Ray cluster (one head on 127.0.0.1) in one command.

``up`` starts ``ray start --head`` bound to loopback with a free port for *every* port Ray opens (GCS,
dashboard, dashboard agent http/grpc, client server, metrics, runtime-env agent), its own short temporary
folder, and token authentication with a token of its own (``<state dir>/auth_token``, mode 600; never
``~/.ray``). It prints the dashboard URL and the ``ray job submit`` line that works against it. ``down``
stops exactly the processes this head started (found by its temporary folder and GCS address, plus their
descendants), never another Ray on the machine (``ray stop`` would stop them all). ``status`` says whether
it runs and prints ``ray status``. ``env`` prints the shell ``export`` line (``eval "$(rocm-ray cluster env)"``).

Everything lives in the state folder (default ``/tmp/rocm-ray-<uid>``, or ``--state-dir`` /
``$ROCM_RAY_CLUSTER_DIR``): ``cluster.json`` (ports, addresses), ``auth_token``, ``ray/`` (Ray's temp dir).
See README "Local cluster" and docs/cluster.md.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

STATE_ENV = "ROCM_RAY_CLUSTER_DIR"
STATE_FILE = "cluster.json"
TOKEN_FILE = "auth_token"
PORT_NAMES = ("gcs", "dashboard", "client_server", "agent_http", "agent_grpc", "metrics", "runtime_env_agent")
SUBMIT_EXAMPLE = ("ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml -- rocm-ray train "
                  "recipes/tiny_ray.yaml train.output_dir=$PWD/outputs/tiny_ray")


class ClusterError(RuntimeError):
    """The local cluster cannot be started / found; the CLI prints it as one ``error:`` line (exit 2)."""


@dataclass
class LocalCluster:
    """What ``rocm-ray cluster up`` started (``<state dir>/cluster.json``)."""

    state_dir: str
    temp_dir: str
    ports: dict[str, int]
    token_path: str
    pids: list[int]

    @property
    def gcs_address(self) -> str:
        return f"127.0.0.1:{self.ports['gcs']}"

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['dashboard']}"

    def client_env(self) -> dict[str, str]:
        """What a shell needs to talk to this head: its address and its token."""
        return {"RAY_ADDRESS": self.dashboard_url, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": self.token_path}

    def export_line(self) -> str:
        return "export " + " ".join(f"{k}={shlex.quote(v)}" for k, v in self.client_env().items())


def default_state_dir() -> Path:
    """``$ROCM_RAY_CLUSTER_DIR``, else ``/tmp/rocm-ray-<uid>`` (short: Ray's socket paths must fit 107 bytes)."""
    env = os.environ.get(STATE_ENV)
    return Path(env) if env else Path("/tmp") / f"rocm-ray-{os.getuid()}"


def free_ports(n: int) -> list[int]:
    """``n`` distinct TCP ports free on 127.0.0.1 right now (held together, so they differ)."""
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


def _ray_bin() -> str:
    """The ``ray`` next to this Python (the same installation as rocm_ray), else the one on PATH."""
    here = Path(sys.executable).parent / "ray"
    found = str(here) if here.is_file() else shutil.which("ray")
    if not found:
        raise ClusterError("the `ray` command is not installed in this environment (pip install 'ray[default]')")
    return found


def head_env(token_path: Path, dashboard_url: str | None = None) -> dict[str, str]:
    """The environment of ``ray start`` (inherited by every Ray process, job drivers included)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN")}
    bin_dir = str(Path(sys.executable).parent)  # job entrypoints find `rocm-ray` and `python` of this install
    env.update(PATH=f"{bin_dir}:{env.get('PATH', '')}", RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="token",
               RAY_AUTH_TOKEN_PATH=str(token_path),
               # drivers (a job's too) resolve their own IP to loopback; otherwise Ray rewrites 127.0.0.1
               # addresses to the machine's external IP, where this head does not listen
               RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    if dashboard_url:  # Ray's state / job API clients inside the cluster (Ray Train's placement-group cleaner)
        env["RAY_API_SERVER_ADDRESS"] = dashboard_url  # find this head, not "multiple active Ray instances"
    return env


def processes_of(marks: list[str]) -> list:
    """Processes whose command line contains one of ``marks`` (a head's temp folder, its GCS address), plus
    all their descendants: exactly what one ``ray start`` started."""
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
    found.pop(os.getpid(), None)
    return list(found.values())


def stop_processes(marks: list[str], grace_s: float = 5.0) -> int:
    """SIGTERM the processes of :func:`processes_of`, SIGKILL what is left after ``grace_s``; how many."""
    import psutil

    procs = processes_of(marks)
    for p in procs:
        try:
            p.send_signal(signal.SIGTERM)
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=grace_s)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=grace_s)
    return len(procs)


def read_state(state_dir: str | Path | None = None) -> LocalCluster | None:
    """The cluster recorded in ``state_dir`` (None: none was started there)."""
    f = Path(state_dir or default_state_dir()) / STATE_FILE
    if not f.is_file():
        return None
    try:
        return LocalCluster(**json.loads(f.read_text()))
    except (OSError, ValueError, TypeError) as e:
        raise ClusterError(f"{f} is not a rocm-ray cluster state file ({e}); remove the folder {f.parent}") from None


def is_running(cluster: LocalCluster, timeout: float = 1.0) -> bool:
    """Whether the head's GCS port accepts connections."""
    try:
        with socket.create_connection(("127.0.0.1", cluster.ports["gcs"]), timeout=timeout):
            return True
    except OSError:
        return False


def up(state_dir: str | Path | None = None, num_cpus: int | None = None, num_gpus: int | None = None,
       resources: dict[str, float] | None = None, timeout_s: float = 240.0) -> LocalCluster:
    """Start the head (see the module docstring); an already running one in ``state_dir`` is returned as is."""
    state = Path(state_dir or default_state_dir()).absolute()
    old = read_state(state)
    if old is not None:
        if is_running(old):
            return old
        down(state)  # a stale record (machine rebooted, processes killed): clean it up first
    temp_dir = state / "ray"
    if len(str(temp_dir)) > 60:
        raise ClusterError(f"--state-dir {state} is too long: Ray's socket paths under it must fit 107 bytes; "
                           "use a short folder such as /tmp/rr")
    state.mkdir(parents=True, exist_ok=True)
    os.chmod(state, 0o700)
    token_path = state / TOKEN_FILE
    if not token_path.is_file():
        fd = os.open(token_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
    ports = dict(zip(PORT_NAMES, free_ports(len(PORT_NAMES)), strict=True))
    cmd = [_ray_bin(), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={ports['gcs']}",
           f"--temp-dir={temp_dir}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
           f"--dashboard-port={ports['dashboard']}", f"--ray-client-server-port={ports['client_server']}",
           f"--dashboard-agent-listen-port={ports['agent_http']}",
           f"--dashboard-agent-grpc-port={ports['agent_grpc']}", f"--metrics-export-port={ports['metrics']}",
           f"--runtime-env-agent-port={ports['runtime_env_agent']}", "--disable-usage-stats"]
    if num_cpus is not None:
        cmd.append(f"--num-cpus={num_cpus}")
    if num_gpus is not None:
        cmd.append(f"--num-gpus={num_gpus}")
    if resources:
        cmd.append(f"--resources={json.dumps(resources)}")
    cluster = LocalCluster(str(state), str(temp_dir), ports, str(token_path), [])
    marks = [str(temp_dir), cluster.gcs_address]
    try:
        proc = subprocess.run(cmd, env=head_env(token_path, cluster.dashboard_url), capture_output=True, text=True,
                              timeout=timeout_s)
    except subprocess.TimeoutExpired:
        stop_processes(marks)
        raise ClusterError(f"`ray start` did not finish within {timeout_s:.0f} s; nothing is left running") from None
    if proc.returncode != 0:
        stop_processes(marks)
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
        raise ClusterError(f"`ray start` failed (exit {proc.returncode}); nothing is left running:\n{tail}")
    cluster.pids = sorted(p.pid for p in processes_of(marks))
    (state / STATE_FILE).write_text(json.dumps(asdict(cluster), indent=2) + "\n")
    return cluster


def down(state_dir: str | Path | None = None) -> int:
    """Stop the head recorded in ``state_dir`` and remove the folder; returns how many processes it ended."""
    state = Path(state_dir or default_state_dir()).absolute()
    cluster = read_state(state)
    if cluster is None:
        return 0
    n = stop_processes([cluster.temp_dir, cluster.gcs_address])
    shutil.rmtree(state, ignore_errors=True)
    return n


NOT_YET = "No cluster status"  # what `ray status` prints until the head's monitor has reported once


def ray_status(cluster: LocalCluster, timeout_s: float = 60.0, settle_s: float = 30.0) -> str:
    """``ray status`` of the head (nodes, resources in use), with its token.

    Right after ``up`` the head's monitor may not have reported yet (``ray status`` then says "No cluster
    status"): asked again once a second for at most ``settle_s`` seconds.
    """
    env = {**head_env(Path(cluster.token_path)), "RAY_ADDRESS": cluster.gcs_address}
    deadline = time.monotonic() + settle_s
    while True:
        try:
            out = subprocess.run([_ray_bin(), "status", f"--address={cluster.gcs_address}"], env=env,
                                 capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return f"(ray status did not answer within {timeout_s:.0f} s)"
        text = (out.stdout or out.stderr).strip()
        if NOT_YET not in text or time.monotonic() >= deadline:
            return text
        time.sleep(1.0)


def describe(cluster: LocalCluster) -> str:
    """What ``up`` / ``status`` print: the dashboard, the token, and the lines to submit a job."""
    return "\n".join([
        f"Ray head on 127.0.0.1 (state: {cluster.state_dir})",
        f"  dashboard:  {cluster.dashboard_url}   (token: `cat {cluster.token_path}`)",
        f"  GCS:        {cluster.gcs_address}",
        "Submit a job from this machine (the repository root):",
        f"  {cluster.export_line()}",
        "  # or: eval \"$(rocm-ray cluster env" + _state_flag(cluster) + ")\"",
        f"  {SUBMIT_EXAMPLE}",
        "  ray job logs --follow <submission id>      ray job list",
        "Stop it: rocm-ray cluster down" + _state_flag(cluster),
    ])


def _state_flag(cluster: LocalCluster) -> str:
    return "" if Path(cluster.state_dir) == default_state_dir().absolute() else f" --state-dir {cluster.state_dir}"


# ------------------------------------------------------------------------------------------------ CLI


def cmd_cluster(args: argparse.Namespace) -> int:
    state = args.state_dir
    if args.action == "up":
        resources = None
        if args.resources:
            try:
                resources = json.loads(args.resources)
            except ValueError:
                resources = None
            if not isinstance(resources, dict):
                raise ClusterError(f"--resources {args.resources!r}: expected a JSON object such as "
                                   "'{\"reward\": 1}'")
        t0 = time.perf_counter()
        cluster = up(state, args.num_cpus, args.num_gpus, resources)
        print(f"rocm-ray cluster: up ({time.perf_counter() - t0:.1f} s)", flush=True)
        print(describe(cluster), flush=True)
        return 0
    if args.action == "down":
        cluster = read_state(state)
        if cluster is None:
            print(f"rocm-ray cluster: nothing to stop in {Path(state or default_state_dir())}", flush=True)
            return 0
        n = down(state)
        print(f"rocm-ray cluster: stopped {n} process(es) of the head at {cluster.gcs_address}", flush=True)
        return 0
    cluster = read_state(state)
    if cluster is None or not is_running(cluster):
        msg = f"not running ({Path(state or default_state_dir())}); start it with `rocm-ray cluster up`"
        if args.action == "env":  # `eval "$(rocm-ray cluster env)"` must not eval a message
            raise ClusterError(f"rocm-ray cluster: {msg}")
        print(f"rocm-ray cluster: {msg}", flush=True)
        return 1
    if args.action == "env":
        print(cluster.export_line(), flush=True)
        return 0
    print(describe(cluster), flush=True)
    print(ray_status(cluster), flush=True)
    return 0


def register_cli(subparsers) -> None:
    """Add ``cluster up|down|status|env`` to the ``rocm-ray`` command line."""
    c = subparsers.add_parser("cluster", help="a local Ray cluster on 127.0.0.1: up | down | status | env")
    c.add_argument("action", choices=("up", "down", "status", "env"))
    c.add_argument("--state-dir", default=None,
                   help=f"where its state, token and Ray temp folder live (default ${STATE_ENV} or "
                        "/tmp/rocm-ray-<uid>)")
    c.add_argument("--num-cpus", type=int, default=None, help="CPUs the head offers (default: all)")
    c.add_argument("--num-gpus", type=int, default=None, help="GPUs the head offers (default: all it finds)")
    c.add_argument("--resources", default=None, help="custom resources as JSON, e.g. '{\"reward\": 1}'")
    c.set_defaults(func=cmd_cluster)
