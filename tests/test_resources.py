"""Bounded failures: a run that cannot fit the Ray cluster fails in seconds, naming the recipe keys and what the
cluster has; a run that fits but cannot be placed (the CPUs are held by others) fails after a bounded wait.

One local Ray with 2 CPUs serves the module (127.0.0.1 only).
"""

from __future__ import annotations

import time

import pytest

from rocm_ray.config import RecipeError, load_recipe

pytestmark = pytest.mark.slow

BOUND_S = 60.0  # the bound on a failure that cannot succeed


@pytest.fixture(scope="module")
def small_ray():
    ray = pytest.importorskip("ray")
    from rocm_ray.train.ray_trainer import local_ray_options, stop_local_ray

    assert not ray.is_initialized()
    ray.init(num_cpus=2, **local_ray_options())
    yield ray
    stop_local_ray()


@pytest.mark.parametrize("overrides,words", [
    (["train.num_workers=2"],  # 2 workers + 1 replica = 3 CPUs > 2
     ["3 CPU", "train.num_workers x ray.cpus_per_worker + ray.reward_replicas x ray.reward_num_cpus", "CPU: 2"]),
    (["train.num_workers=1", "ray.cpus_per_worker=8"], ["9 CPU", "CPU: 2"]),
    (["train.num_workers=1", "train.use_gpu=true"], ["1 GPU", "train.use_gpu", "no 'GPU' resource at all"]),
    (["train.num_workers=1", "ray.reward_num_gpus=0.5"], ["0.5 GPU", "ray.reward_num_gpus"]),
    (["train.num_workers=1", "ray.reward_resources={reward: 1}"],
     ["1 reward", "ray.reward_resources.reward", "no 'reward' resource at all"]),
    (["train.num_workers=1", "ray.worker_resources={trainer: 1}"],
     ["1 trainer", "ray.worker_resources.trainer", "no 'trainer' resource"]),
], ids=["workers", "cpus_per_worker", "gpu_workers", "gpu_reward", "reward_resource", "worker_resource"])
def test_run_that_cannot_fit_fails_fast(small_ray, tmp_path, overrides, words):
    from rocm_ray.train.ray_trainer import train_ray

    recipe = load_recipe("recipes/tiny_ray.yaml", [f"train.output_dir={tmp_path}/out", *overrides])
    t0 = time.perf_counter()
    with pytest.raises(RecipeError) as e:
        train_ray(recipe)
    elapsed = time.perf_counter() - t0
    msg = str(e.value)
    print(f"{overrides}: {elapsed:.2f} s: {msg}")
    assert elapsed < BOUND_S
    assert msg.startswith("recipes/tiny_ray.yaml: ray: the run does not fit the Ray cluster")
    for w in words:
        assert w in msg, (w, msg)
    assert "The cluster has" in msg and "node(s)" in msg
    assert not (tmp_path / "out").exists()  # nothing written


def test_run_that_fits_but_cannot_be_placed_times_out(small_ray, tmp_path, monkeypatch):
    """1 worker + 1 reward replica fit the 2 CPUs, but another actor holds one: the workers' placement
    waits RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S (5 s here; 20 s by default) once (train.max_failures=0;
    at most 2 retries otherwise), then the run fails."""
    from rocm_ray.preflight import PlacementTimeoutError
    from rocm_ray.rewards.service import RewardService
    from rocm_ray.train.ray_trainer import train_ray

    ray = small_ray
    monkeypatch.setenv("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "5")
    recipe = load_recipe("recipes/tiny_ray.yaml", [f"train.output_dir={tmp_path}/out", "train.num_workers=1",
                                                   "train.zero_stage=0", "train.max_failures=0"])

    @ray.remote(num_cpus=1)
    class Blocker:
        def ping(self) -> int:
            return 1

    blocker = Blocker.remote()
    ray.get(blocker.ping.remote())
    service = RewardService.from_recipe(recipe)
    try:
        service.wait_ready(timeout_s=120)
        t0 = time.perf_counter()
        with pytest.raises(PlacementTimeoutError) as e:
            train_ray(recipe, service=service)
        elapsed = time.perf_counter() - t0
    finally:
        service.shutdown()
        ray.kill(blocker)
    msg = str(e.value)
    print(f"placement timeout after {elapsed:.1f} s: {msg}")
    assert elapsed < BOUND_S
    assert "train.num_workers" in msg and "could not be placed within 5 s" in msg and "CPU: 2" in msg
