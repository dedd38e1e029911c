"""The reward node removed from a multi-node Ray cluster (ray.cluster_utils.Cluster.remove_node, not graceful).

Head: 3 CPUs and ``trainer: 2`` (the Ray Train workers ask for it); two reward nodes: 1 CPU and ``reward: 1``
each; all on 127.0.0.1. One training run: the node that holds the reward replica is removed, Ray places the
replica again on the other reward node and training goes on; then that last reward node is removed: nowhere
to place the replica, and the run stops with a message naming the recipe keys (RewardServiceUnavailable)
in bounded time.
"""

from __future__ import annotations

import threading
import time

import pytest

from rocm_ray.config import load_recipe

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster():
    ray = pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    from rocm_ray.security import apply_local_ray_env, restore_env
    from rocm_ray.train.ray_logging import SETUP_HOOK
    from rocm_ray.train.ray_trainer import _is_ray_process

    assert not ray.is_initialized()
    apply_local_ray_env()  # loopback only, token auth
    head = {"num_cpus": 3, "resources": {"trainer": 2}, "node_ip_address": "127.0.0.1", "include_dashboard": False}
    c = Cluster(initialize_head=True, head_node_args=head)
    nodes = [c.add_node(num_cpus=1, resources={"reward": 1}, node_ip_address="127.0.0.1") for _ in range(2)]
    c.wait_for_nodes()
    ray.init(address=c.address, runtime_env={"worker_process_setup_hook": SETUP_HOOK})
    try:
        yield ray, c, nodes
    finally:
        import psutil

        procs = [p for p in psutil.Process().children(recursive=True) if _is_ray_process(p)]
        ray.shutdown()
        c.shutdown()
        restore_env()
        for p in psutil.wait_procs(procs, timeout=5)[1]:  # what outlived the shutdown (only our own)
            p.kill()


def _remove_reward_nodes(c, nodes, service, calls: int, done: threading.Event, log: dict) -> None:
    """Twice: once replica 0 has served ``calls`` more calls, remove (not gracefully) the node that holds it."""
    import ray

    def info() -> dict | None:
        try:
            return service.info()[0]  # waits while Ray places the replica again
        except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError):
            return None

    for i in range(2):
        before = None
        while not done.is_set():
            now = info()
            if now is None:
                time.sleep(0.2)
                continue
            before = before or now
            if now["pid"] != before["pid"]:  # a restarted replica counts its calls from 0
                before = now
            if now["calls"] >= before["calls"] + calls:
                info_now = now
                victim = next(n for n in nodes if n.node_id == info_now["node_id"])
                c.remove_node(victim, allow_graceful=False)
                nodes.remove(victim)
                log[i] = {"node": victim.node_id, "at": time.perf_counter(), "calls": info_now["calls"]}
                break
            time.sleep(0.1)


def test_reward_node_lost_replaced_then_last_one_lost_stops_in_bounded_time(cluster, tmp_path):
    from rocm_ray.rewards.base import RewardServiceUnavailable
    from rocm_ray.rewards.service import RewardService
    from rocm_ray.train.ray_trainer import train_ray

    _, c, nodes = cluster
    first, second = (n.node_id for n in nodes)
    recipe = load_recipe("recipes/tiny_ray.yaml", [
        "name=node_loss", f"train.output_dir={tmp_path}", "train.zero_stage=0", "train.steps=80",
        "train.max_failures=0", "ray.reward_resources={reward: 1}", "ray.worker_resources={trainer: 1}"])
    service = RewardService.from_recipe(recipe)
    log: dict = {}
    done = threading.Event()
    try:
        service.wait_ready(timeout_s=300)
        th = threading.Thread(target=_remove_reward_nodes, args=(c, nodes, service, 4, done, log), daemon=True)
        th.start()
        with pytest.raises(RewardServiceUnavailable) as e:
            train_ray(recipe, service=service)
        end = time.perf_counter()
    finally:
        done.set()
        service.shutdown()
    assert 0 in log and 1 in log, f"the reward nodes were not both removed during the run: {log}"
    # after the first removal the replica was placed again on the other reward node and kept serving the
    # workers (4 more calls: 2 more steps of 2 workers) until that node was removed too
    assert {log[0]["node"], log[1]["node"]} == {first, second}
    msg = str(e.value)
    print(f"stopped {end - log[1]['at']:.1f} s after the last reward node left: {msg}")
    assert msg.startswith("recipes/tiny_ray.yaml: ray.reward_resources")
    assert "(CPU: 1, reward: 1)" in msg and "no alive node" in msg and "--resume" in msg
    assert "_group_" not in msg
    assert end - log[1]["at"] < 180  # bounded: the watch's grace (20 s) plus the client's retries
