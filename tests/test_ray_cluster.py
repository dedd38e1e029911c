"""A two-node Ray cluster on one machine: reward replicas placed by the custom resource ``reward``.

Head node: 3 CPUs and the custom resource ``trainer`` (the Ray Train workers ask for it); second node:
1 CPU and ``reward: 1`` (the RewardService asks for it). Both nodes listen on 127.0.0.1 only.
"""

from __future__ import annotations

import pytest

from rocm_ray.config import load_recipe

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def two_nodes():
    ray = pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    from rocm_ray.train.ray_logging import SETUP_HOOK
    from rocm_ray.train.ray_trainer import _is_ray_process

    if ray.is_initialized():
        ray.shutdown()
    # A driver connecting to 127.0.0.1 has its address rewritten to the machine's external IP, where this
    # loopback-only cluster does not listen; Ray's single-machine switch keeps the driver on loopback.
    mp = pytest.MonkeyPatch()
    mp.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    mp.setattr(ray._private.ray_constants, "ENABLE_RAY_CLUSTER", False)
    head = {"num_cpus": 3, "resources": {"trainer": 2}, "node_ip_address": "127.0.0.1",
            "include_dashboard": False}
    cluster = Cluster(initialize_head=True, head_node_args=head)
    reward_node = cluster.add_node(num_cpus=1, resources={"reward": 1}, node_ip_address="127.0.0.1")
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, runtime_env={"worker_process_setup_hook": SETUP_HOOK})
    try:
        yield ray, cluster.head_node.node_id, reward_node.node_id
    finally:
        import psutil

        procs = [p for p in psutil.Process().children(recursive=True) if _is_ray_process(p)]
        ray.shutdown()
        cluster.shutdown()
        mp.undo()
        for p in psutil.wait_procs(procs, timeout=5)[1]:  # what outlived the shutdown (only our own)
            p.kill()


def test_reward_on_the_reward_node_trainers_on_the_other(two_nodes, tmp_path):
    from rocm_ray.rewards.service import RewardService
    from rocm_ray.train.ray_trainer import latest_checkpoint, train_ray
    from rocm_ray.train.ray_worker import read_state

    ray, head_id, reward_id = two_nodes
    assert head_id != reward_id
    recipe = load_recipe("recipes/tiny_ray.yaml", [
        "name=two_nodes", f"train.output_dir={tmp_path}", "train.steps=2", "train.zero_stage=0",
        "ray.reward_resources={reward: 1}", "ray.worker_resources={trainer: 1}"])
    service = RewardService.from_recipe(recipe)
    try:
        infos = service.wait_ready(timeout_s=300)
        assert [i["node_id"] for i in infos] == [reward_id]  # placed by the custom resource
        res = train_ray(recipe, service=service)
    finally:
        service.shutdown()
    assert [int(r["step"]) for r in res.metrics] == [1, 2]
    state = read_state(latest_checkpoint(tmp_path / "ray" / "two_nodes"))
    assert state["worker_nodes"] == [head_id, head_id]  # both trainers on the head, none on the reward node
    assert (res.output_dir / "weights/lora/pytorch_lora_weights.safetensors").is_file()
