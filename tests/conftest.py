"""Shared fixtures: tiny offline models, and quiet, CPU-only, offline settings for every test."""

from __future__ import annotations

import os

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
