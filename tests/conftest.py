"""Shared fixtures: tiny offline models, and quiet, CPU-only, offline settings for every test."""

from __future__ import annotations

import atexit
import os
import secrets
import shutil
import tempfile

# The tests never touch the user's home: HOME is a folder of this session (Ray would write ~/.ray/auth_token,
# matplotlib and W&B their caches and settings); the real one stays in ROCM_RAY_TESTS_REAL_HOME.
_home = tempfile.mkdtemp(prefix="rocm_ray_home_")
atexit.register(shutil.rmtree, _home, ignore_errors=True)
os.environ.setdefault("ROCM_RAY_TESTS_REAL_HOME", os.path.expanduser("~"))
os.environ["HOME"] = _home
# Every Ray the tests start listens on 127.0.0.1 and requires a token of this session (rocm_ray.security),
# whatever ~/.ray/auth_token holds; tests that start a `ray start` head pass their own settings.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
if not any(v in os.environ for v in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")):
    os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # no spinning OpenMP threads on shared cores

import pytest  # noqa: E402
import torch  # noqa: E402

# one intra-op thread: the tiny test models are far faster without thread oversubscription (Ray workers
# and other processes share the 2 cores)
torch.set_num_threads(1)

from rocm_ray._quiet import quiet_library_warnings  # noqa: E402

quiet_library_warnings()


@pytest.fixture(scope="session")
def tiny_pipe(tmp_path_factory):
    """A random-weight LatentConsistencyModelPipeline at toy size (16x16 images), built offline."""
    from rocm_ray.models.tiny import build_random_pipeline

    return build_random_pipeline(tmp_path_factory.mktemp("tiny_pipe"), seed=0)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3-compatible server (``moto`` in server mode) on a free loopback port, with a bucket.

    Yields the environment (endpoint, dummy credentials) that pyarrow, Ray and boto read; the test sets it
    where its processes need it. Skips where ``moto[server]`` is not installed.
    """
    pytest.importorskip("moto.server", reason="needs moto[server] (dev extra) for a local S3 server")
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    log = (tmp_path_factory.mktemp("moto") / "moto.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=log, stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{port}"
    env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
    try:
        for _ in range(150):  # bounded: 30 s
            try:
                urllib.request.urlopen(endpoint, timeout=1)
                break
            except Exception:  # noqa: BLE001 - not up yet
                if proc.poll() is not None:
                    pytest.fail(f"moto server exited with {proc.returncode}")
                time.sleep(0.2)
        else:
            pytest.fail("moto server did not start within 30 s")
        req = urllib.request.Request(f"{endpoint}/rocm-ray-test", method="PUT")  # create the bucket
        urllib.request.urlopen(req, timeout=10)
        yield {"env": env, "bucket": "rocm-ray-test", "endpoint": endpoint}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
