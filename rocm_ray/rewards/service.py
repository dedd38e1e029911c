"""RewardService: reward models as Ray actors that return (r, dr/dimages) to any number of trainers.

Because ROCM only needs the reward's gradient with respect to the images, the reward models never have
to live next to the policy: a group of replicas (one Ray actor each, placed with GPU fractions or a
custom resource such as ``{"reward": 1}``) loads the recipe's reward ONCE per replica and serves
``score(images, prompts) -> (r [B], d r / d images [B,3,H,W], per-component rewards)``.

What travels per call: the caller ``ray.put``s the images as one contiguous float32 numpy array (the
actor reads it zero-copy from the object store) and a list of prompts; the answer is three numpy
arrays. Reward weights, modules and the recipe are shipped once, at actor creation, never per call.

Each replica is an async actor that batches: requests arriving within ``batch_wait_ms`` of each other
(or until ``gather`` requests are waiting, or ``max_batch`` images) are scored in one forward/backward
on a scoring thread, while the event loop keeps accepting the next requests.

:class:`RewardClient` is the ``reward_fn`` a train worker hands to :func:`rocm_ray.train.step.rocm_step`
(and a scorer with ``score`` for evaluation). It picks its replica by worker rank and retries a bounded
number of times, failing over to the next replica, when an actor dies or is unavailable.
"""

from __future__ import annotations

import asyncio
import os
import time
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import ray
import torch
from torch import Tensor

from rocm_ray.config import Recipe, RewardConfig
from rocm_ray.rewards.base import RewardServiceUnavailable

RETRYABLE = (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError)


@dataclass

class _Request:
    images: np.ndarray  # [b, 3, H, W] float32
    prompts: list[str]
    future: asyncio.Future


@dataclass
class ReplicaStats:
    """What a replica has served since it (re)started."""

    calls: int = 0
    batches: int = 0
    images: int = 0
    batch_sizes: list[int] = field(default_factory=list)  # requests per scored batch (last 1000)


class RewardReplica:
    """One reward replica (used as a Ray actor class; see :class:`RewardService`).

    Holds the recipe's reward (scorer or weighted mixture), loaded once in ``__init__``, and batches
    concurrent ``score`` calls.
    """

    def __init__(self, reward: RewardConfig, max_batch: int = 64, batch_wait_ms: float = 5.0, gather: int = 1,
                 torch_threads: int | None = None, algorithm: str = "rocm"):
        from rocm_ray.train.builders import build_reward

        if torch_threads:
            torch.set_num_threads(torch_threads)
        self.device = "cuda" if torch.cuda.is_available() and ray.get_gpu_ids() else "cpu"
        self.scorer = build_reward(reward, device=self.device, algorithm=algorithm)
        self.need_grad = algorithm != "ppo"  # PPO needs r only (and may use non-differentiable rewards)
        self.max_batch, self.batch_wait_s, self.gather = max_batch, batch_wait_ms / 1000.0, max(1, gather)
        self._pending: list[_Request] = []
        self._wake: asyncio.Event | None = None
        self._loop_task: asyncio.Task | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="reward")
        self.stats = ReplicaStats()
        self.started = time.time()

    async def ready(self) -> dict:
        """Replica placement and state: node id, pid, device, stats. Returns once the model is loaded."""
        ctx = ray.get_runtime_context()
        return {"node_id": ctx.get_node_id(), "actor_id": ctx.get_actor_id(), "pid": os.getpid(),
                "device": self.device, "started": self.started, "calls": self.stats.calls,
                "batches": self.stats.batches, "images": self.stats.images,
                "batch_sizes": list(self.stats.batch_sizes)}

    async def score(self, images: np.ndarray, prompts: Sequence[str]
                    ) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
        """(r [B], d r / d images [B,3,H,W], name -> [B]) as numpy; ``images`` [B,3,H,W] in [0, 1]."""
        images = np.asarray(images)
        if images.ndim != 4 or images.shape[1] != 3 or len(prompts) != images.shape[0]:
            raise ValueError(f"score: images must be [B, 3, H, W] with one prompt each, got {images.shape} "
                             f"and {len(prompts)} prompts")
        loop = asyncio.get_running_loop()
        if self._wake is None:
            self._wake = asyncio.Event()
        fut = loop.create_future()
        self._pending.append(_Request(images, list(prompts), fut))
        self.stats.calls += 1
        if self._full():
            self._wake.set()
        if self._loop_task is None or self._loop_task.done():
            self._loop_task = asyncio.create_task(self._serve())
        return await fut

    def _full(self) -> bool:
        return (len(self._pending) >= self.gather
                or sum(len(r.prompts) for r in self._pending) >= self.max_batch)

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        while self._pending:
            if not self._full() and self.batch_wait_s > 0:  # 1. gather requests for a few ms
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), self.batch_wait_s)
                except asyncio.TimeoutError:
                    pass
            batch, n = [], 0  # 2. take whole requests up to max_batch images (at least one)
            while self._pending and (not batch or n + len(self._pending[0].prompts) <= self.max_batch):
                req = self._pending.pop(0)
                batch.append(req)
                n += len(req.prompts)
            try:  # 3. one forward/backward for all of them, off the event loop
                results = await loop.run_in_executor(self._executor, self._score_batch, batch)
            except Exception as e:  # noqa: BLE001 - handed to every waiting caller
                for req in batch:
                    if not req.future.done():
                        req.future.set_exception(e)
                continue
            for req, res in zip(batch, results, strict=True):
                if not req.future.done():
                    req.future.set_result(res)

    def _score_batch(self, batch: list[_Request]) -> list[tuple]:
        from rocm_ray.rewards.gradient import score_with_grad, score_without_grad

        with warnings.catch_warnings():  # object-store arrays are read-only; score_with_grad copies them
            warnings.simplefilter("ignore", UserWarning)
            parts_in = [torch.from_numpy(r.images) for r in batch]
        images = parts_in[0] if len(parts_in) == 1 else torch.cat(parts_in)  # [B, 3, H, W]
        prompts = [p for r in batch for p in r.prompts]
        score = score_with_grad if self.need_grad else score_without_grad
        reward, grad, parts = score(self.scorer, images.to(self.device), prompts)
        reward = reward.float().cpu().numpy()  # [B]
        grad = None if grad is None else grad.float().cpu().numpy()  # [B, 3, H, W]
        parts = {k: v.float().cpu().numpy() for k, v in parts.items()}  # name -> [B]
        self.stats.batches += 1
        self.stats.images += len(prompts)
        self.stats.batch_sizes = (self.stats.batch_sizes + [len(batch)])[-1000:]
        out, i = [], 0
        for r in batch:
            j = i + len(r.prompts)
            out.append((reward[i:j].copy(), None if grad is None else grad[i:j].copy(),
                        {k: v[i:j].copy() for k, v in parts.items()}))
            i = j
        return out


class RewardClient:
    """``reward_fn(images, prompts) -> (r [B], dr/dimages [B,3,H,W], parts)`` backed by a RewardService.

    Picklable (it holds actor handles only), so the driver builds it once and every train worker gets a
    copy; :meth:`for_rank` pins a worker to replica ``rank % replicas``. A call ``ray.put``s the images
    once and, if the replica dies or is unavailable, retries up to ``max_attempts`` times on the next
    replica with a short backoff. Also a scorer (``score``) for evaluation through the service.
    """

    name = "reward_service"
    differentiable = True

    def __init__(self, actors: Sequence[Any], replica: int = 0, max_attempts: int = 5, backoff_s: float = 0.5,
                 timeout_s: float | None = None):
        if not actors:
            raise ValueError("RewardClient needs at least one reward replica")
        self.actors = list(actors)
        self.replica = replica % len(self.actors)
        self.max_attempts, self.backoff_s, self.timeout_s = max_attempts, backoff_s, timeout_s
        self.retries = 0  # calls that needed another attempt (for logs and tests)

    def for_rank(self, rank: int) -> RewardClient:
        return RewardClient(self.actors, rank, self.max_attempts, self.backoff_s, self.timeout_s)

    def score_numpy(self, images: Tensor, prompts: Sequence[str]
                    ) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
        arr = images.detach().float().cpu().contiguous().numpy()  # [B, 3, H, W]
        ref = ray.put(arr)
        prompts = list(prompts)
        last: Exception | None = None
        for attempt in range(self.max_attempts):
            actor = self.actors[(self.replica + attempt) % len(self.actors)]
            try:
                return ray.get(actor.score.remote(ref, prompts), timeout=self.timeout_s)
            except RETRYABLE as e:
                last = e
                self.retries += 1
                print(f"rocm-ray: reward replica {(self.replica + attempt) % len(self.actors)} failed "
                      f"({type(e).__name__}); attempt {attempt + 2}/{self.max_attempts}", flush=True)
                time.sleep(self.backoff_s * (2 ** attempt))
        raise RuntimeError(f"the RewardService did not answer after {self.max_attempts} attempts "
                           f"(raise ray.max_restarts / check the reward nodes): {last}") from last

    def __call__(self, images: Tensor, prompts: Sequence[str]) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        r, g, parts = self.score_numpy(images, prompts)
        # copies: the arrays returned from the object store are read-only
        return (torch.from_numpy(np.array(r)), None if g is None else torch.from_numpy(np.array(g)),
                {k: torch.from_numpy(np.array(v)) for k, v in parts.items()})

    def score(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        """Rewards [B] only (evaluation): the same remote call."""
        return self(images, prompts)[0]


class RewardService:
    """A group of :class:`RewardReplica` actors built from a recipe's ``reward`` section.

    ``num_gpus`` may be a fraction (several replicas share a GPU); ``resources`` pins replicas to nodes
    that advertise a custom resource (``{"reward": 1}``). ``max_restarts`` / ``max_task_retries`` are
    Ray's actor fault tolerance; the client adds its own bounded retries and failover on top.
    ``gather``: how many concurrent requests a replica waits for (at most ``batch_wait_ms``) before
    scoring; set it to the number of trainers per replica.
    """

    def __init__(self, reward: RewardConfig, replicas: int = 1, num_gpus: float = 0.0, num_cpus: float = 1.0,
                 resources: dict[str, float] | None = None, max_restarts: int = 3, max_task_retries: int = 3,
                 max_batch: int = 64, batch_wait_ms: float = 5.0, gather: int = 1, name: str | None = None,
                 algorithm: str = "rocm"):
        cls = ray.remote(RewardReplica)
        threads = max(1, int(num_cpus)) if num_cpus else 1
        self.actors = []
        for i in range(replicas):
            # scheduling_strategy "DEFAULT": never inside the caller's placement group (a Tune trial's
            # captures its children): replicas take their own resources, wherever they are
            opts: dict[str, Any] = dict(num_cpus=num_cpus, num_gpus=num_gpus, resources=dict(resources or {}),
                                        max_restarts=max_restarts, max_task_retries=max_task_retries,
                                        max_concurrency=1000, scheduling_strategy="DEFAULT")
            if name:
                opts["name"] = f"{name}-{i}"
            self.actors.append(cls.options(**opts).remote(reward, max_batch, batch_wait_ms, gather, threads,
                                                          algorithm))

    @classmethod
    def from_recipe(cls, recipe: Recipe, name: str | None = None, **overrides: Any) -> RewardService:
        """The recipe's service (``ray.reward_*``), batching as many requests as workers per replica."""
        r = recipe.ray
        per_replica = -(-max(recipe.train.num_workers, 1) // r.reward_replicas)
        kwargs = dict(replicas=r.reward_replicas, num_gpus=r.reward_num_gpus, num_cpus=r.reward_num_cpus,
                      resources=r.reward_resources, max_restarts=r.max_restarts,
                      max_task_retries=r.max_task_retries, gather=per_replica,
                      batch_wait_ms=5.0 if per_replica > 1 else 0.0, name=name, algorithm=recipe.algorithm.name)
        kwargs.update(overrides)
        return cls(recipe.reward, **kwargs)

    def wait_ready(self, timeout_s: float = 600.0) -> list[dict]:
        """Block until every replica has loaded its reward; returns their :meth:`RewardReplica.ready` info."""
        try:
            return ray.get([a.ready.remote() for a in self.actors], timeout=timeout_s)
        except ray.exceptions.GetTimeoutError:
            raise RewardServiceUnavailable(
                f"the RewardService's {len(self.actors)} replica(s) did not start within {timeout_s:.0f} s: "
                "the cluster may lack the resources they ask for (ray.reward_num_gpus / "
                "ray.reward_num_cpus / ray.reward_resources); see `ray status`") from None

    def info(self) -> list[dict]:
        return ray.get([a.ready.remote() for a in self.actors])

    def client(self, rank: int = 0, **kwargs: Any) -> RewardClient:
        return RewardClient(self.actors, rank, **kwargs)

    def shutdown(self) -> None:
        for a in self.actors:
            ray.kill(a, no_restart=True)
        self.actors = []
