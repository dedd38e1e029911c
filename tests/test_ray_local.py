"""The Ray path on one real local Ray: the RewardService, and Ray Train + DeepSpeed (gloo) workers.

One local Ray serves the whole module, and one RewardService all its training runs; each run is a
cached fixture so every comparison reuses it (a run costs ~30-40 s of Ray Train start-up on 2 cores).
Equivalence tolerances measured on a 2-core CPU machine (fp32, one thread per process) are recorded in
docs/distributed.md; the assertions allow a margin above them.
"""

from __future__ import annotations

import csv
import threading
import time

import numpy as np
import pytest
import torch

from rocm_ray.config import RewardConfig, RewardModelConfig, load_recipe
from rocm_ray.train.inprocess import train_inprocess

pytestmark = pytest.mark.slow

STEPS = 4
TOL_ONE_WORKER = 1e-5  # 1 worker + 1 replica vs in-process (measured 4.8e-7)
TOL_ZERO = 1e-5  # ZeRO 2 / 3 vs ZeRO 0, 2 workers (measured 0 and 2.4e-7)
TOL_RESUME = 1e-6  # restart / --resume vs uninterrupted (measured 0)
ZERO3_PARTITION_ALL = {"zero_optimization": {"stage3_param_persistence_threshold": 0}}  # really partition


@pytest.fixture(scope="module")
def ray_local():
    ray = pytest.importorskip("ray")
    from rocm_ray.train.ray_trainer import local_ray_options, stop_local_ray

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=4, **local_ray_options())
    yield ray
    if started:
        stop_local_ray()


# ------------------------------------------------------------------------------------------ RewardService


@pytest.fixture(scope="module")
def mixture_service(ray_local):
    """A replica that waits (up to 6 s) for 4 requests before scoring: batching and retries are visible."""
    from rocm_ray.rewards.service import RewardService

    cfg = RewardConfig(models=[RewardModelConfig(name="toy_brightness", weight=1.0),
                               RewardModelConfig(name="toy_redness", weight=0.5)])
    svc = RewardService(cfg, replicas=1, num_cpus=0.5, gather=4, batch_wait_ms=6000, max_restarts=2,
                        max_task_retries=0)
    svc.wait_ready()
    yield cfg, svc
    svc.shutdown()


def _local_reference(cfg, images, prompts):
    from rocm_ray.rewards.gradient import score_with_grad
    from rocm_ray.train.builders import build_reward

    return score_with_grad(build_reward(cfg), images, prompts)


def test_service_batches_concurrent_requests(mixture_service):
    cfg, svc = mixture_service
    gen = torch.Generator().manual_seed(0)
    batches = [torch.rand(n, 3, 16, 16, generator=gen) for n in (1, 2, 3, 2)]
    prompts = [[f"p{i}"] * len(b) for i, b in enumerate(batches)]
    results: dict[int, tuple] = {}

    def call(i):
        results[i] = svc.client(i)(batches[i], prompts[i])

    threads = [threading.Thread(target=call, args=(i,)) for i in range(4)]
    t0 = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=60)
    elapsed = time.perf_counter() - t0
    assert sorted(results) == [0, 1, 2, 3]
    assert elapsed < 6.0  # the 4th request filled the batch: nobody waited for batch_wait_ms
    info = svc.info()[0]
    assert 4 in info["batch_sizes"]  # the four requests were scored as one batch
    for i in range(4):
        r, g, parts = results[i]
        r0, g0, parts0 = _local_reference(cfg, batches[i], prompts[i])
        assert r.shape == (len(batches[i]),) and g.shape == batches[i].shape
        torch.testing.assert_close(r, r0, rtol=0, atol=1e-7)
        torch.testing.assert_close(g, g0, rtol=0, atol=1e-9)
        assert set(parts) == {"toy_brightness", "toy_redness"}
        torch.testing.assert_close(parts["toy_redness"], parts0["toy_redness"], rtol=0, atol=1e-7)


def test_client_retries_when_its_replica_dies(ray_local, mixture_service):
    cfg, svc = mixture_service
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    client = svc.client(0, backoff_s=0.2)
    pid = svc.info()[0]["pid"]
    out = {}
    th = threading.Thread(target=lambda: out.update(res=client(images, ["a", "b"])))
    th.start()
    time.sleep(1.0)  # the request is waiting in the replica for more requests (gather=4, 6 s)
    ray_local.kill(svc.actors[0], no_restart=False)  # Ray restarts the actor; the call in flight fails
    th.join(timeout=120)
    assert "res" in out, "the call did not complete after the replica died"
    assert client.retries >= 1
    assert svc.info()[0]["pid"] != pid
    r0, g0, _ = _local_reference(cfg, images, ["a", "b"])
    torch.testing.assert_close(out["res"][0], r0, rtol=0, atol=1e-7)
    torch.testing.assert_close(out["res"][1], g0, rtol=0, atol=1e-9)


# ------------------------------------------------------------------------------------------ training runs


@pytest.fixture(scope="module")
def service(ray_local):
    from rocm_ray.rewards.service import RewardService

    recipe = load_recipe("recipes/tiny_ray.yaml")
    svc = RewardService(recipe.reward, replicas=1, num_cpus=1, gather=2, batch_wait_ms=5.0, max_restarts=3,
                        max_task_retries=3)
    svc.wait_ready()
    yield svc
    svc.shutdown()


def _kill_replica_after(ray, svc, calls: int, done: threading.Event, killed: list) -> None:
    before = svc.info()[0]
    while not done.is_set():
        info = svc.info()[0]
        if info["pid"] == before["pid"] and info["calls"] >= before["calls"] + calls:
            ray.kill(svc.actors[0], no_restart=False)
            killed.append(before["pid"])
            return
        time.sleep(0.05)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, ray_local, service):
    """Lazily computed, cached training runs: ``runs(key)`` -> RunResult."""
    from rocm_ray.train.ray_trainer import train_ray

    root = tmp_path_factory.mktemp("ray_runs")
    cache: dict = {}
    specs = {  # key: (run folder, overrides, train_ray keywords)
        "w1_z0": ("w1_z0", ["train.num_workers=1", "train.zero_stage=0", "logging.sample_every=2"], {}),
        # one step more than the others: the reference of the --resume run
        "w2_z0": ("w2_z0", ["train.zero_stage=0", f"train.steps={STEPS + 1}"], {}),
        # every worker raises at step 3; Ray Train restarts them from the step-2 checkpoint
        "w2_z2_fail": ("w2_z2", ["train.zero_stage=2", "train.checkpoint_every=1", "train.max_failures=1"],
                       {"fail_at_step": 3}),
        "w2_z3": ("w2_z3", ["train.zero_stage=3"], {"deepspeed": ZERO3_PARTITION_ALL}),
        # a fresh launch with --resume and one step more, in the folder of the failed-and-restarted run
        "w2_z2_resume": ("w2_z2",
                         ["train.zero_stage=2", "train.checkpoint_every=1", f"train.steps={STEPS + 1}"],
                         {"resume": True}),
    }

    def get(key: str):
        if key in cache:
            return cache[key]
        if key == "w2_z2_resume":
            get("w2_z2_fail")
        folder, overrides, kw = specs[key]
        recipe = load_recipe("recipes/tiny_ray.yaml", [f"name={folder}", f"train.output_dir={root}/{folder}",
                                                       f"train.steps={STEPS}", *overrides])
        killed: list = []
        done = threading.Event()
        if key == "w2_z0":  # kill the reward replica in the middle of this run: same losses expected
            th = threading.Thread(target=_kill_replica_after, args=(ray_local, service, 4, done, killed),
                                  daemon=True)
            th.start()
        t0 = time.perf_counter()
        try:
            cache[key] = train_ray(recipe, service=service, **kw)
        finally:
            done.set()
        cache[key].killed = killed
        print(f"[{key}] {time.perf_counter() - t0:.1f} s")
        return cache[key]

    return get


def losses(res) -> np.ndarray:
    return np.array([r["loss"] for r in res.metrics])


def column(res, key: str) -> np.ndarray:
    return np.array([r[key] for r in res.metrics])


@pytest.fixture(scope="module")
def inprocess(tmp_path_factory):
    out = tmp_path_factory.mktemp("inproc")
    recipe = load_recipe("recipes/tiny_debug.yaml", [f"train.output_dir={out}", f"train.steps={STEPS}",
                                                     "logging.sample_every=2"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # like a Ray worker with 1 CPU
    try:
        return train_inprocess(recipe)
    finally:
        torch.set_num_threads(threads)


def test_one_worker_matches_inprocess(runs, inprocess):
    res = runs("w1_z0")
    err = np.abs(losses(res) - losses(inprocess)).max()
    print(f"1 worker ZeRO 0 vs in-process: max |loss diff| = {err:.3g}")
    assert len(res.metrics) == STEPS
    assert err <= TOL_ONE_WORKER
    for key in ("reward", "divergence", "grad_norm"):
        a = np.array([r[key] for r in res.metrics])
        b = np.array([r[key] for r in inprocess.metrics])
        assert np.abs(a - b).max() <= TOL_ONE_WORKER * max(1.0, np.abs(b).max()), key


def test_ray_outputs_match_inprocess_layout(runs, inprocess):
    res = runs("w1_z0")
    out = res.output_dir
    for f in ("metrics.csv", "curves.png", "grid.png", "samples.parquet", "summary.md", "summary.json",
              "recipe.json", "weights/lora/pytorch_lora_weights.safetensors"):
        assert (out / f).is_file(), f
    with (out / "metrics.csv").open() as f, (inprocess.output_dir / "metrics.csv").open() as g:
        assert next(csv.reader(f)) == next(csv.reader(g))
    assert set(res.summary) == set(inprocess.summary)
    import pyarrow.parquet as pq

    ray_samples = pq.read_table(out / "samples.parquet").to_pylist()
    in_samples = pq.read_table(inprocess.output_dir / "samples.parquet").to_pylist()
    steps = sorted({r["step"] for r in ray_samples})
    assert steps == sorted({r["step"] for r in in_samples}) == [0, 2, STEPS]
    assert {k for r in ray_samples for k in r} == {k for r in in_samples for k in r}
    assert res.summary["reward_before"] == pytest.approx(inprocess.summary["reward_before"], abs=1e-6)
    assert res.summary["reward_after"] == pytest.approx(inprocess.summary["reward_after"], abs=1e-5)


def test_two_workers_match_one_worker_despite_a_killed_reward_replica(runs):
    res = runs("w2_z0")
    assert res.killed, "the reward replica was never killed during the run"
    err = np.abs(losses(res)[:STEPS] - losses(runs("w1_z0"))).max()
    print(f"2 workers ZeRO 0 vs 1 worker: max |loss diff| = {err:.3g}")
    assert len(res.metrics) == STEPS + 1
    assert err <= TOL_ZERO
    # the global (all-reduced) gradient norm and the global means, not rank 0's shard
    for key in ("grad_norm", "reward", "divergence"):
        assert np.abs(column(res, key)[:STEPS] - column(runs("w1_z0"), key)).max() <= 1e-5, key


@pytest.mark.parametrize("key", ["w2_z2_fail", "w2_z3"])
def test_zero_stages_match_zero0(runs, key):
    ref = losses(runs("w2_z0"))[:STEPS]
    got = losses(runs(key))
    err = np.abs(got - ref).max()
    print(f"{key} vs ZeRO 0 (2 workers): max |loss diff| = {err:.3g}")
    assert len(got) == STEPS
    assert err <= TOL_ZERO
    gn = np.abs(column(runs(key), "grad_norm") - column(runs("w2_z0"), "grad_norm")[:STEPS]).max()
    assert gn <= 1e-5


def test_restart_after_failure_equals_uninterrupted(runs):
    """w2_z2_fail: the workers failed at step 3 and were restarted from the step-2 checkpoint
    (ray.train.get_checkpoint); its losses equal an uninterrupted run's."""
    got, ref = losses(runs("w2_z2_fail")), losses(runs("w2_z0"))[:STEPS]
    err = np.abs(got - ref).max()
    print(f"restart after failure (ZeRO 2) vs uninterrupted (ZeRO 0): max |loss diff| = {err:.3g}")
    assert err <= TOL_RESUME


def test_fresh_resume_continues_like_uninterrupted(runs):
    """`rocm-ray train --resume` with one step more continues from the run folder's latest checkpoint."""
    res = runs("w2_z2_resume")
    assert [int(r["step"]) for r in res.metrics] == list(range(1, STEPS + 2))
    err = np.abs(losses(res) - losses(runs("w2_z0"))).max()
    print(f"--resume (steps {STEPS} -> {STEPS + 1}) vs uninterrupted: max |loss diff| = {err:.3g}")
    assert err <= TOL_RESUME
