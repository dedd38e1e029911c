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
