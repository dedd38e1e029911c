"""A Ray worker's step as micro-batches: gradient accumulation, remote scoring overlapped with sampling.

``train.micro_batch_size`` splits a worker's shard of the step's batch into micro-batches of that many
images. The DeepSpeed engine accumulates their gradients (``gradient_accumulation_steps`` = their
number; the engine scales each micro-batch's loss by 1/that, so with equal micro-batches the
accumulated gradient is the gradient of the shard mean, as without micro-batches) and steps once.

Overlap. The schedule per step, with ``S`` sample, ``R`` the reward request, ``B`` loss and backward::

    S0 R0> S1 <R0 R1> B0 S2 <R1 R2> B1 ... <R(n-1) B(n-1)

``R0>`` sends micro-batch 0's images to the RewardService without waiting, ``<R0`` waits for its answer.
While the replica scores micro-batch i, the worker samples i+1 and runs i-1's backward. At most one
request per worker is in flight, so a replica's gather (one request per worker) stays right. The
sampling noise of every image is drawn from its own seed, and the backward passes run in micro-batch
order, so the gradients are those of the sequential schedule (S0 R0 B0 S1 R1 B1 ...) exactly; against
no micro-batches they differ by float summation order only (tests/test_throughput.py states the
tolerance). Memory: the graphs of two micro-batches are alive at once (i+1 sampled before i's backward).

The per-step breakdown (:class:`StepTimes`) is the worker's wall time by phase, device-synchronized on
GPU so asynchronous kernels are charged to the phase that launched them.
"""

from __future__ import annotations

import csv
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from rocm_ray.loss import RocmLoss
from rocm_ray.models.policy import Policy
from rocm_ray.train.step import StepResult, finish_step, sample_for_step

PHASES = ("sampling", "reference", "reward_wait", "backward", "optimizer", "communication")


@dataclass
class StepTimes:
    """Seconds of one step by phase (this worker). ``reference``: the frozen reference's forwards (inside
    sampling, not counted there); ``reward_wait``: time blocked on the reward (colocated: the scoring
    itself); ``communication``: gradient all-reduce (ZeRO 0/1; under ZeRO 2/3 the reduce-scatters run
    inside the backward and count there) and the metrics all-reduce."""

    sampling: float = 0.0
    reference: float = 0.0
    reward_wait: float = 0.0
    backward: float = 0.0
    optimizer: float = 0.0
    communication: float = 0.0

    def as_metrics(self) -> dict[str, float]:
        return {f"time_{k}_s": v for k, v in asdict(self).items()}


class PhaseClock:
    """Adds elapsed wall time to a :class:`StepTimes` field; synchronizes the device first on GPU."""

    def __init__(self, device: torch.device):
        self.cuda = torch.device(device).type == "cuda"
        self.times = StepTimes()

    def now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def add(self, phase: str, since: float) -> float:
        t = self.now()
        setattr(self.times, phase, getattr(self.times, phase) + t - since)
        return t

    def describe(self) -> str:
        """``time: sampling 1.20 s | reference 0.30 s | ...`` for the progress log."""
        return "time: " + " | ".join(f"{k.replace('_', ' ')} {v:.3f} s" for k, v in asdict(self.times).items())

    def timed(self, phase: str, fn: Callable) -> Callable:
        """``fn`` wrapped so its calls add to ``phase``."""

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            t0 = self.now()
            try:
                return fn(*args, **kwargs)
            finally:
                self.add(phase, t0)

        return wrapper


def time_gradient_allreduce(engine, clock: PhaseClock) -> None:
    """Charge the engine's gradient all-reduce (called from its backward) to ``communication``."""
    engine.allreduce_gradients = clock.timed("communication", engine.allreduce_gradients)


def merge_results(parts: list[StepResult]) -> StepResult:
    """One StepResult for equal-size micro-batches: means of the means, concatenated per-sample tensors."""
    if len(parts) == 1:
        return parts[0]
    n = len(parts)
    ls = [p.loss for p in parts]
    loss = RocmLoss(surrogate=torch.stack([x.surrogate.detach() for x in ls]).mean(),
                    loss=sum(x.loss for x in ls) / n, reward=sum(x.reward for x in ls) / n,
                    divergence=sum(x.divergence for x in ls) / n,
                    step_divergences=[sum(v) / n for v in zip(*(x.step_divergences for x in ls), strict=True)])
    return StepResult(loss=loss, images=torch.cat([p.images for p in parts]),  # [B, 3, H, W]
                      rewards=torch.cat([p.rewards for p in parts]),  # [B]
                      sample_divergences=torch.cat([p.sample_divergences for p in parts]),  # [B, K]
                      components={k: torch.cat([p.components[k] for p in parts]) for k in parts[0].components})


def micro_batch_step(policy: Policy, prompts: list[str], seeds: list[int], reward: Any, engine: Any,
                     micro: int | None, clock: PhaseClock, overlap: bool = True, ref_engine: Any = None,
                     backward: Any = None, **kwargs: Any) -> StepResult:
    """Sample, score and backpropagate a worker's shard in micro-batches of ``micro`` images.

    ``reward``: a :class:`~rocm_ray.rewards.service.RewardClient` or ``LocalReward`` (``submit`` ->
    ``.result()``). ``engine``: the DeepSpeed engine (its forward, backward and accumulation ``step``);
    the caller makes the final ``engine.step()``. ``overlap=False``: the sequential schedule.
    ``ref_engine``: the ZeRO-3 engine of a partitioned reference (re-partitioned after every backward).
    ``backward``: the backward of each micro-batch's surrogate (default ``engine.backward``; the non-finite
    guard passes one that first agrees with the other ranks).
    ``kwargs``: :func:`rocm_ray.train.inprocess.step_kwargs`.
    """
    from rocm_ray.train.ds_engine import release_reference

    micro = micro or len(prompts)
    chunks = [(prompts[i:i + micro], seeds[i:i + micro]) for i in range(0, len(prompts), micro)]
    eps = policy.eps_fn(engine)
    ref = clock.timed("reference", policy.ref_eps_fn())

    def sample(i: int):
        ref_before = clock.times.reference
        t0 = clock.now()
        out = sample_for_step(policy, chunks[i][0], chunks[i][1], eps_fn=eps, ref_eps_fn=ref, **kwargs)
        clock.add("sampling", t0)
        clock.times.sampling -= clock.times.reference - ref_before  # the reference is its own phase
        return out

    def submit(s):
        t0 = clock.now()
        pending = reward.submit(s.images.detach(), s.prompts)
        clock.add("reward_wait", t0)
        return pending

    results = []
    current = sample(0)
    pending = submit(current)
    for i in range(len(chunks)):
        last = i + 1 == len(chunks)
        nxt = sample(i + 1) if overlap and not last else None
        t0 = clock.now()
        r, g, parts = pending.result()
        clock.add("reward_wait", t0)
        if nxt is not None:
            pending = submit(nxt)
        t0 = clock.now()
        results.append(finish_step(current, r, g, parts, backward=backward or engine.backward, **kwargs))
        release_reference(ref_engine)
        clock.add("backward", t0)
        if not last:
            t0 = clock.now()
            engine.step()  # not a boundary: DeepSpeed only counts the micro-step
            clock.add("optimizer", t0)
            if nxt is None:
                nxt = sample(i + 1)
                pending = submit(nxt)
            current = nxt
    return merge_results(results)


def find_cause(err: BaseException, cls: type[BaseException]) -> BaseException | None:
    """The first exception of type ``cls`` behind ``err`` (a Ray Train failure wraps the workers' errors)."""
    seen, todo = set(), [err, *getattr(err, "worker_failures", {}).values()]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, cls):
            return e
        todo += [e.__cause__, getattr(e, "cause", None)]
    return None


def worker_reward(config: dict, rank: int, device: torch.device) -> Any:
    """This worker's reward: the RewardService client (remote) or the reward model itself (colocated)."""
    recipe = config["recipe"]
    if recipe.ray.reward_placement == "colocated":
        from rocm_ray.rewards.service import LocalReward

        return LocalReward(recipe.reward, device, recipe.ray.reward_micro_batch, recipe.algorithm.name)
    return config["reward_client"].for_rank(rank)


def write_timing(path: Path, rows: list[dict]) -> None:
    """``timing.csv``: rank 0's seconds per step (total, reward round trip, and the phase breakdown)."""
    if not rows:
        return
    cols = list(dict.fromkeys(k for r in rows for k in r))
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)
