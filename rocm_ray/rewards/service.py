"""RewardService: reward models as Ray actors that return (r, dr/dimages) to any number of trainers.

Because ROCM only needs the reward's gradient with respect to the images, the reward models never have
to live next to the policy: a group of replicas (one Ray actor each, placed with GPU fractions or a
custom resource such as ``{"reward": 1}``) loads the recipe's reward ONCE per replica and serves
``score(images, prompts) -> (r [B], d r / d images [B,3,H,W], per-component rewards)``.

What travels per call: the caller ``ray.put``s the images as one contiguous float32 numpy array (the
actor reads it zero-copy from the object store) and a list of prompts; the answer is three numpy
arrays and a small dict (the replica's queue, for routing). Reward weights, modules and the recipe are
shipped once, at actor creation, never per call.

Batching. Each replica is an async actor. It knows how many trainers share it (``gather``: the
recipe's workers per replica, raised to the number of distinct clients it has heard from recently,
e.g. after a failover) and waits for that many requests, at most ``batch_wait_ms`` after the oldest
one arrived, before scoring them together: trainers that run in lockstep (they all-reduce every step)
arrive within milliseconds, so one forward/backward serves them all. The batch is scored in chunks of
``micro_batch`` images (``ray.reward_micro_batch``: what bounds the replica's activation memory) on a
scoring thread, while the event loop keeps accepting the next requests. Evaluation requests
(``grad=False``) are scored under ``torch.no_grad`` and never batched with gradient requests.

Routing. :class:`RewardClient` sends each request to the least-loaded replica it knows of (the queue
length every answer reports plus its own requests in flight; ties go to the worker's home replica
``rank % replicas``), fails over to another replica when one dies (Ray restarts it up to
``ray.max_restarts`` times) and gives up with :class:`RewardServiceError` after a bounded number of
attempts. A request that gets no answer within ``ray.reward_timeout_s`` raises
:class:`RewardTimeoutError` naming the replica (index, actor, pid, node).

Colocated placement (``ray.reward_placement: colocated``): :class:`LocalReward` is the same interface
over a reward model held in the train worker itself (no round trip, no replica).
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
ACTIVE_WINDOW_S = 30.0  # a client heard from within this window counts toward a replica's gather


class RewardServiceError(RuntimeError):
    """The RewardService could not answer a request (replicas dead, restarts exhausted); says which."""


class RewardTimeoutError(RewardServiceError, TimeoutError):
    """A reward replica did not answer within ``ray.reward_timeout_s``; the message names it."""


Scored = tuple[np.ndarray, np.ndarray | None, dict[str, np.ndarray]]


def score_chunks(scorer: Any, images: Tensor, prompts: Sequence[str], micro_batch: int, grad: bool = True
                 ) -> tuple[Tensor, Tensor | None, dict[str, Tensor]]:
    """(r [B], dr/dimages [B,3,H,W] or None, name -> [B]) scored ``micro_batch`` images at a time.

    Each chunk's reward graph is freed before the next one starts, so the reward model never holds the
    activations of more than ``micro_batch`` images. ``grad=False``: rewards only, under ``no_grad``.
    """
    from rocm_ray.rewards.gradient import score_with_grad

    rs, gs, ps = [], [], []
    for i in range(0, len(prompts), micro_batch):
        x, p = images[i:i + micro_batch], list(prompts[i:i + micro_batch])  # [b, 3, H, W]
        if grad:
            r, g, parts = score_with_grad(scorer, x, p)
            gs.append(g)
        else:
            with torch.no_grad():
                if hasattr(scorer, "score_components"):
                    parts = scorer.score_components(x, p)  # name -> [b]
                    r = scorer.combine(parts)  # [b]
                else:
                    r = scorer.score(x, p)  # [b]
                    parts = {scorer.name: r}
        rs.append(r.detach())
        ps.append({k: v.detach() for k, v in parts.items()})
    reward = torch.cat(rs)  # [B]
    grads = torch.cat(gs) if grad else None  # [B, 3, H, W]
    parts = {k: torch.cat([d[k] for d in ps]) for k in ps[0]}  # name -> [B]
    return reward, grads, parts


@dataclass
class _Request:
    images: np.ndarray  # [b, 3, H, W] float32
    prompts: list[str]
    grad: bool
    future: asyncio.Future
    arrived: float


@dataclass
class ReplicaStats:
    """What a replica has served since it (re)started."""

    calls: int = 0
    batches: int = 0
    images: int = 0
    chunks: int = 0  # reward forward/backward calls (micro-batches)
    busy_s: float = 0.0  # seconds spent scoring
    batch_sizes: list[int] = field(default_factory=list)  # requests per scored batch (last 1000)
    max_chunk: int = 0  # most images in one reward forward


class RewardReplica:
    """One reward replica (used as a Ray actor class; see :class:`RewardService`).

    Holds the recipe's reward (scorer or weighted mixture), loaded once in ``__init__``, and batches
    concurrent ``score`` calls (module docstring).
    """

    def __init__(self, reward: RewardConfig, max_batch: int = 64, batch_wait_ms: float = 200.0, gather: int = 1,
                 torch_threads: int | None = None, micro_batch: int = 16, index: int = 0, algorithm: str = "rocm"):
        from rocm_ray.train.builders import build_reward

        if torch_threads:
            torch.set_num_threads(torch_threads)
        self.device = "cuda" if torch.cuda.is_available() and ray.get_gpu_ids() else "cpu"
        # PPO (requests with grad=False) may use rewards that are not differentiable
        self.scorer = build_reward(reward, device=self.device, algorithm=algorithm)
        self.max_batch, self.batch_wait_s, self.gather = max_batch, batch_wait_ms / 1000.0, max(1, gather)
        self.micro_batch, self.index = max(1, micro_batch), index
        self._pending: list[_Request] = []
        self._scoring = 0  # requests in the batch being scored now
        self._clients: dict[str, float] = {}  # client id -> last request time
        self._wake: asyncio.Event | None = None
        self._loop_task: asyncio.Task | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="reward")
        self.stats = ReplicaStats()
        self.started = time.time()

    async def ready(self) -> dict:
        """Replica placement and state: node id, pid, device, queue, stats. Returns once the model is loaded."""
        ctx = ray.get_runtime_context()
        s = self.stats
        return {"index": self.index, "node_id": ctx.get_node_id(), "actor_id": ctx.get_actor_id(),
                "pid": os.getpid(), "device": self.device, "started": self.started, "calls": s.calls,
                "batches": s.batches, "images": s.images, "chunks": s.chunks, "busy_s": s.busy_s,
                "max_chunk": s.max_chunk, "batch_sizes": list(s.batch_sizes), "pending": len(self._pending),
                "scoring": self._scoring, "expected": self._expected()}

    def _expected(self) -> int:
        """Requests to wait for: the configured gather, or more clients if more are calling this replica."""
        now = time.monotonic()
        self._clients = {c: t for c, t in self._clients.items() if now - t < ACTIVE_WINDOW_S}
        return max(self.gather, len(self._clients))

    async def score(self, images: np.ndarray, prompts: Sequence[str], client_id: str | None = None,
                    grad: bool = True) -> tuple[np.ndarray, np.ndarray | None, dict[str, np.ndarray], dict]:
        """(r [B], d r / d images [B,3,H,W] or None, name -> [B], queue info); ``images`` in [0, 1]."""
        images = np.asarray(images)
        if images.ndim != 4 or images.shape[1] != 3 or len(prompts) != images.shape[0]:
            raise ValueError(f"score: images must be [B, 3, H, W] with one prompt each, got {images.shape} "
                             f"and {len(prompts)} prompts")
        loop = asyncio.get_running_loop()
        if self._wake is None:
            self._wake = asyncio.Event()
        if grad and client_id is not None:
            self._clients[client_id] = time.monotonic()
        fut = loop.create_future()
        self._pending.append(_Request(images, list(prompts), grad, fut, time.monotonic()))
        self.stats.calls += 1
        if self._full():
            self._wake.set()
        if self._loop_task is None or self._loop_task.done():
            self._loop_task = asyncio.create_task(self._serve())
        r, g, parts = await fut
        return r, g, parts, {"replica": self.index, "queue": len(self._pending) + self._scoring,
                             "pid": os.getpid(), "node_id": ray.get_runtime_context().get_node_id()}

    def _full(self) -> bool:
        kind = self._pending[0].grad
        same = [r for r in self._pending if r.grad == kind]
        expected = self._expected() if kind else 1  # evaluation calls (one driver) never wait
        return len(same) >= expected or sum(len(r.prompts) for r in same) >= self.max_batch

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        while self._pending:
            while not self._full():  # 1. wait for every client sharing this replica, bounded
                left = self.batch_wait_s - (time.monotonic() - self._pending[0].arrived)
                if left <= 0:
                    break
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), left)
                except asyncio.TimeoutError:
                    break
            kind = self._pending[0].grad  # 2. whole requests of one kind, up to max_batch images
            batch, n, rest = [], 0, []
            for req in self._pending:
                if req.grad == kind and (not batch or n + len(req.prompts) <= self.max_batch):
                    batch.append(req)
                    n += len(req.prompts)
                else:
                    rest.append(req)
            self._pending = rest
            self._scoring = len(batch)
            try:  # 3. score them in micro-batches, off the event loop
                results = await loop.run_in_executor(self._executor, self._score_batch, batch, kind)
            except Exception as e:  # noqa: BLE001 - handed to every waiting caller
                for req in batch:
                    if not req.future.done():
                        req.future.set_exception(e)
                continue
            finally:
                self._scoring = 0
            for req, res in zip(batch, results, strict=True):
                if not req.future.done():
                    req.future.set_result(res)

    def _score_batch(self, batch: list[_Request], grad: bool) -> list[Scored]:
        t0 = time.perf_counter()
        with warnings.catch_warnings():  # object-store arrays are read-only; the scorer never writes them
            warnings.simplefilter("ignore", UserWarning)
            parts_in = [torch.from_numpy(r.images) for r in batch]
        images = parts_in[0] if len(parts_in) == 1 else torch.cat(parts_in)  # [B, 3, H, W]
        prompts = [p for r in batch for p in r.prompts]
        reward, grads, parts = score_chunks(self.scorer, images.to(self.device), prompts, self.micro_batch, grad)
        if self.device == "cuda":
            torch.cuda.synchronize()
        reward_np = reward.float().cpu().numpy()  # [B]
        grad_np = grads.float().cpu().numpy() if grads is not None else None  # [B, 3, H, W]
        parts_np = {k: v.float().cpu().numpy() for k, v in parts.items()}  # name -> [B]
        s = self.stats
        s.batches += 1
        s.images += len(prompts)
        s.chunks += -(-len(prompts) // self.micro_batch)
        s.max_chunk = max(s.max_chunk, min(self.micro_batch, len(prompts)))
        s.batch_sizes = (s.batch_sizes + [len(batch)])[-1000:]
        s.busy_s += time.perf_counter() - t0
        out, i = [], 0
        for r in batch:
            j = i + len(r.prompts)
            out.append((reward_np[i:j].copy(), None if grad_np is None else grad_np[i:j].copy(),
                        {k: v[i:j].copy() for k, v in parts_np.items()}))
            i = j
        return out


def _to_torch(r: np.ndarray, g: np.ndarray | None, parts: dict[str, np.ndarray]
              ) -> tuple[Tensor, Tensor | None, dict[str, Tensor]]:
    # copies: the arrays returned from the object store are read-only
    return (torch.from_numpy(np.array(r)), None if g is None else torch.from_numpy(np.array(g)),
            {k: torch.from_numpy(np.array(v)) for k, v in parts.items()})


class PendingReward:
    """A reward request in flight (:meth:`RewardClient.submit`); :meth:`result` waits, retries, fails over."""

    def __init__(self, client: RewardClient, images: Tensor, prompts: Sequence[str], grad: bool):
        self.client, self.prompts, self.grad = client, list(prompts), grad
        self.ref = ray.put(images.detach().float().cpu().contiguous().numpy())  # [B, 3, H, W]
        self.tried: list[int] = []
        self.replica = -1
        self.call = None
        self.sent = 0.0
        self._send()

    def _send(self) -> None:
        c = self.client
        self.replica = c._pick()
        self.tried.append(self.replica)
        c.inflight[self.replica] += 1
        self.sent = time.monotonic()
        self.call = c.actors[self.replica].score.remote(self.ref, self.prompts, c.client_id, self.grad)

    def result_numpy(self) -> Scored:
        """Wait for the answer. A replica that died is retried elsewhere (or, when Ray restarts it, the
        call queues until it is back), at most ``max_attempts`` deaths; one that is unavailable while
        it restarts is waited for with a capped backoff, at most ``timeout_s`` (default 600 s) in all."""
        c = self.client
        last: Exception | None = None
        timed_out: list[int] = []
        deaths, waits, start = 0, 0, time.monotonic()
        while True:
            i = self.replica
            try:
                left = max(0.0, c.timeout_s - (time.monotonic() - self.sent)) if c.timeout_s else None
                r, g, parts, meta = ray.get(self.call, timeout=left)
                c.inflight[i] -= 1
                c.queue[i] = int(meta["queue"])
                c.where[i] = f"pid {meta['pid']} on node {str(meta['node_id'])[:8]}"
                return r, g, parts
            except ray.exceptions.GetTimeoutError:
                c.inflight[i] -= 1
                timed_out.append(i)
                c.down_until[i] = time.monotonic() + 10 * (c.timeout_s or 1.0)
                try:
                    ray.cancel(self.call)
                except Exception:  # noqa: BLE001 - best effort: the replica may be stuck in C code
                    pass
                if len(set(timed_out)) >= len(c.actors) or all(j in timed_out for j in c._up()):
                    raise RewardTimeoutError(
                        f"reward replica(s) {', '.join(c.describe(j) for j in sorted(set(timed_out)))} did not "
                        f"answer within ray.reward_timeout_s={c.timeout_s:g} s (a hung or overloaded reward "
                        "model: check the replica's log, raise ray.reward_timeout_s or add replicas)") from None
                print(f"rocm-ray: {c.describe(i)} timed out after {c.timeout_s:g} s; trying another replica",
                      flush=True)
            except ray.exceptions.ActorUnavailableError as e:  # restarting (or unreachable): wait, bounded
                c.inflight[i] -= 1
                last, c.retries = e, c.retries + 1
                pause = min(c.backoff_s * (2 ** waits), 5.0)
                c.down_until[i] = time.monotonic() + pause
                if time.monotonic() - start > (c.timeout_s or 600.0):
                    break
                if waits == 0:
                    print(f"rocm-ray: {c.describe(i)} is unavailable (restarting?); waiting for it", flush=True)
                if not c._up():
                    time.sleep(pause)
                waits += 1
            except RETRYABLE as e:  # died: Ray restarts it if it may (its next call then queues until it is up)
                c.inflight[i] -= 1
                last, c.retries, deaths = e, c.retries + 1, deaths + 1
                c.down_until[i] = time.monotonic() + c.backoff_s
                if deaths >= c.max_attempts:
                    break
                print(f"rocm-ray: {c.describe(i)} failed ({type(e).__name__}); attempt {deaths + 1}/"
                      f"{c.max_attempts}", flush=True)
            self._send()
        raise RewardServiceError(
            f"the RewardService did not answer after {deaths} failed attempt(s) and {waits} wait(s) on replica(s) "
            f"{sorted(set(self.tried))}: {type(last).__name__}. Its replicas died and Ray's restarts are "
            "exhausted or did not complete (raise ray.max_restarts, check the reward nodes and the replicas' "
            f"logs): {last}") from last

    def result(self) -> tuple[Tensor, Tensor | None, dict[str, Tensor]]:
        """(r [B], dr/dimages [B,3,H,W] (None for a grad=False request), name -> [B]) as torch tensors."""
        return _to_torch(*self.result_numpy())


class RewardClient:
    """``reward_fn(images, prompts) -> (r [B], dr/dimages [B,3,H,W], parts)`` backed by a RewardService.

    Picklable (it holds actor handles only), so the driver builds it once and every train worker gets a
    copy; :meth:`for_rank` gives a worker its home replica ``rank % replicas`` and its client id. Each
    request goes to the least-loaded replica (queue reported by the replicas' last answers plus this
    client's requests in flight; ties to the home replica); a dead replica is skipped for a backoff and
    the request retried elsewhere, at most ``max_attempts`` times in all. :meth:`submit` sends without
    waiting (the trainer samples the next micro-batch meanwhile). Also a scorer (``score``: rewards only,
    no reward gradient computed) for evaluation through the service.
    """

    name = "reward_service"
    differentiable = True

    def __init__(self, actors: Sequence[Any], replica: int = 0, max_attempts: int = 5, backoff_s: float = 0.5,
                 timeout_s: float | None = None, client_id: str | None = None):
        if not actors:
            raise ValueError("RewardClient needs at least one reward replica")
        self.actors = list(actors)
        self.replica = replica % len(self.actors)  # home replica
        self.max_attempts, self.backoff_s, self.timeout_s = max_attempts, backoff_s, timeout_s
        self.client_id = client_id
        self.where = [""] * len(self.actors)  # "pid N on node <id>" of each replica, as last heard
        self._reset_view()
        self.retries = 0  # calls that needed another attempt (for logs and tests)

    def _reset_view(self) -> None:
        n = len(self.actors)
        self.queue, self.inflight, self.down_until = [0] * n, [0] * n, [0.0] * n

    def __getstate__(self) -> dict:
        return {k: self.__dict__[k] for k in ("actors", "replica", "max_attempts", "backoff_s", "timeout_s",
                                              "client_id", "retries", "where")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._reset_view()

    def for_rank(self, rank: int) -> RewardClient:
        c = RewardClient(self.actors, rank, self.max_attempts, self.backoff_s, self.timeout_s,
                         client_id=f"rank{rank}")
        c.where = list(self.where)
        return c

    def describe(self, i: int) -> str:
        """``reward replica i (actor <id>, pid N on node <id>)`` for messages."""
        where = f", {self.where[i]}" if self.where[i] else ""
        return f"reward replica {i} (actor {self.actors[i]._actor_id.hex()[:12]}{where})"

    def _up(self) -> list[int]:
        now = time.monotonic()
        return [i for i in range(len(self.actors)) if self.down_until[i] <= now]

    def _pick(self) -> int:
        n = len(self.actors)
        candidates = self._up() or list(range(n))
        return min(candidates, key=lambda i: (self.queue[i] + self.inflight[i], (i - self.replica) % n))

    def submit(self, images: Tensor, prompts: Sequence[str], grad: bool = True) -> PendingReward:
        """Send a request now; ``.result()`` later gives what :meth:`__call__` returns."""
        return PendingReward(self, images, prompts, grad)

    def score_numpy(self, images: Tensor, prompts: Sequence[str]) -> Scored:
        return self.submit(images, prompts).result_numpy()

    def __call__(self, images: Tensor, prompts: Sequence[str]) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        return self.submit(images, prompts).result()

    def score(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        """Rewards [B] only (evaluation): scored under ``no_grad`` on the replica."""
        return self.submit(images, prompts, grad=False).result()[0]


class _Done:
    """An already computed result with the :class:`PendingReward` interface."""

    def __init__(self, value: tuple):
        self.value = value

    def result(self) -> tuple:
        return self.value


class LocalReward:
    """The reward model held in this process (``ray.reward_placement: colocated``), same API as the client.

    Scores ``micro_batch`` images per forward/backward; :meth:`submit` computes at once (there is no
    round trip to overlap).
    """

    name = "colocated_reward"
    differentiable = True

    def __init__(self, reward: RewardConfig, device: str | torch.device = "cpu", micro_batch: int = 16,
                 algorithm: str = "rocm"):
        from rocm_ray.train.builders import build_reward

        self.scorer = build_reward(reward, device=device, algorithm=algorithm)
        self.device, self.micro_batch = torch.device(device), micro_batch

    def submit(self, images: Tensor, prompts: Sequence[str], grad: bool = True) -> _Done:
        r, g, parts = score_chunks(self.scorer, images.detach().to(self.device), prompts, self.micro_batch, grad)
        return _Done((r, g, parts))

    def __call__(self, images: Tensor, prompts: Sequence[str]) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        return self.submit(images, prompts).result()

    def score(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        return self.submit(images, prompts, grad=False).result()[0]


class RewardService:
    """A group of :class:`RewardReplica` actors built from a recipe's ``reward`` section.

    ``num_gpus`` may be a fraction (several replicas share a GPU); ``resources`` pins replicas to nodes
    that advertise a custom resource (``{"reward": 1}``). ``max_restarts`` / ``max_task_retries`` are
    Ray's actor fault tolerance; the client adds its own bounded retries and failover on top.
    ``gather``: how many trainers share one replica (it waits for that many requests, at most
    ``batch_wait_ms`` after the first, before scoring); ``micro_batch``: images per reward
    forward/backward; ``timeout_s``: the clients' request timeout.
    """

    def __init__(self, reward: RewardConfig, replicas: int = 1, num_gpus: float = 0.0, num_cpus: float = 1.0,
                 resources: dict[str, float] | None = None, max_restarts: int = 3, max_task_retries: int = 3,
                 max_batch: int = 64, batch_wait_ms: float = 200.0, gather: int = 1, name: str | None = None,
                 micro_batch: int = 16, timeout_s: float | None = None, algorithm: str = "rocm"):
        cls = ray.remote(RewardReplica)
        threads = max(1, int(num_cpus)) if num_cpus else 1
        self.timeout_s = timeout_s
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
                                                          micro_batch, i, algorithm))

    @classmethod
    def from_recipe(cls, recipe: Recipe, name: str | None = None, **overrides: Any) -> RewardService:
        """The recipe's service (``ray.reward_*``), batching as many requests as workers per replica."""
        r = recipe.ray
        per_replica = -(-max(recipe.train.num_workers, 1) // r.reward_replicas)
        kwargs = dict(replicas=r.reward_replicas, num_gpus=r.reward_num_gpus, num_cpus=r.reward_num_cpus,
                      resources=r.reward_resources, max_restarts=r.max_restarts,
                      max_task_retries=r.max_task_retries, gather=per_replica, micro_batch=r.reward_micro_batch,
                      timeout_s=r.reward_timeout_s, name=name, algorithm=recipe.algorithm.name)
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

    def info(self, timeout_s: float | None = None) -> list[dict]:
        """Every replica's :meth:`RewardReplica.ready` answer (placement, queue, stats)."""
        return ray.get([a.ready.remote() for a in self.actors], timeout=timeout_s)

    def client(self, rank: int = 0, **kwargs: Any) -> RewardClient:
        """A client (home replica ``rank``) that knows where the replicas run (for its messages)."""
        kwargs.setdefault("timeout_s", self.timeout_s)
        c = RewardClient(self.actors, rank, **kwargs)
        try:
            c.where = [f"pid {i['pid']} on node {i['node_id'][:8]}" for i in self.info(timeout_s=30.0)]
        except Exception:  # noqa: BLE001 - names only; a replica not up yet is described without them
            pass
        return c

    def shutdown(self) -> None:
        for a in self.actors:
            ray.kill(a, no_restart=True)
        self.actors = []


def driver_reward(recipe: Recipe, service: RewardService | None) -> tuple[RewardClient | None, Any]:
    """(the client the train workers get, the driver's scorer for evaluation) for the recipe's placement.

    Remote: waits for the service's replicas and returns its client twice (evaluation goes through the
    service, without reward gradients). Colocated: no client; the driver loads the reward itself.
    """
    if recipe.ray.reward_placement == "colocated":
        return None, LocalReward(recipe.reward, "cpu", recipe.ray.reward_micro_batch)
    infos = service.wait_ready()
    print(f"rocm-ray: RewardService: {len(infos)} replica(s) ready "
          f"({', '.join(i['device'] + '@' + i['node_id'][:8] for i in infos)})", flush=True)
    client = service.client()
    return client, client
