"""How well the RewardService batches: requests per scoring batch, replica utilisation, tail latency.

    python benchmarks/reward_service.py                         # 2/4 workers x 1/2 replicas, 30 rounds
    python benchmarks/reward_service.py --rounds 3 --configs 2x1 --no-write     # what the test runs

W simulated train workers (Ray actors, one thread each) share R replicas of the recipe's reward
(default: the embedded tiny aesthetic scorer of ``recipes/tiny_kl.yaml``). Every round each worker
"samples" (sleeps ``--sample-ms`` plus a random 0-``--jitter-ms`` drift, as ranks drift on a shared
machine), then sends ``--images`` images of ``--size`` px to the service and waits for (r, dr/dx); the
driver waits for all workers before the next round, as the workers' all-reduce does. Reported per
configuration:

- requests per scoring batch (mean) and the share of scoring batches that took every worker waiting on
  that replica (``ceil(W / R)`` requests; the goal is >= 90%);
- replica utilisation: seconds spent scoring / wall time of the rounds, mean over replicas;
- request latency (send to answer) p50 / p95 / p99 over all requests.

Prints a table and (unless ``--no-write``) writes it into docs/benchmarks.md ("Reward service").
"""

from __future__ import annotations

import argparse
import math
import os
import random
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
START, END = "<!-- reward_service:start -->", "<!-- reward_service:end -->"


class _Worker:
    """A simulated train worker: sleep (sampling), then one reward request; returns its latency."""

    def __init__(self, client, rank: int, images: int, size: int, sample_s: float, jitter_s: float):
        import torch

        torch.set_num_threads(1)
        self.client = client.for_rank(rank)
        self.x = torch.rand(images, 3, size, size, generator=torch.Generator().manual_seed(rank))  # [b, 3, s, s]
        self.prompts = [f"a handwritten digit {rank % 10}"] * images
        self.sample_s, self.jitter_s = sample_s, jitter_s
        self.rng = random.Random(rank)

    def round(self) -> float:
        time.sleep(self.sample_s + self.rng.uniform(0, self.jitter_s))
        t0 = time.perf_counter()
        self.client(self.x, self.prompts)
        return time.perf_counter() - t0


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, math.ceil(q * len(xs)) - 1))]


def run_config(reward, workers: int, replicas: int, args) -> dict:
    """One configuration on the current Ray: its row of the table."""
    import ray

    from rocm_ray.rewards.service import RewardService

    gather = -(-workers // replicas)
    svc = RewardService(reward, replicas=replicas, num_cpus=args.replica_cpus, gather=gather,
                        micro_batch=args.micro_batch, timeout_s=120.0)
    svc.wait_ready()
    actor = ray.remote(num_cpus=0.01)(_Worker)
    ws = [actor.remote(svc.client(), r, args.images, args.size, args.sample_ms / 1000, args.jitter_ms / 1000)
          for r in range(workers)]
    try:
        def one_round() -> list[float]:  # bounded: a worker that dies or hangs fails the benchmark
            return ray.get([w.round.remote() for w in ws], timeout=args.round_timeout)

        one_round()  # warm-up round (models, first calls)
        before = svc.info()
        t0 = time.perf_counter()
        lat = [x for _ in range(args.rounds) for x in one_round()]
        wall = time.perf_counter() - t0
        after = svc.info()
    finally:
        for w in ws:
            ray.kill(w)
        svc.shutdown()
    sizes = [s for b, a in zip(before, after, strict=True) for s in a["batch_sizes"][len(b["batch_sizes"]):]]
    util = [(a["busy_s"] - b["busy_s"]) / wall for b, a in zip(before, after, strict=True)]
    return {"workers": workers, "replicas": replicas, "requests": len(lat), "batches": len(sizes),
            "per_batch": sum(sizes) / max(len(sizes), 1),
            "full": sum(s >= gather for s in sizes) / max(len(sizes), 1), "gather": gather,
            "util": sum(util) / len(util), "p50": _pct(lat, 0.5), "p95": _pct(lat, 0.95), "p99": _pct(lat, 0.99)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--recipe", default=str(REPO / "recipes/tiny_kl.yaml"), help="whose reward section to serve")
    ap.add_argument("--configs", default="2x1,2x2,4x1,4x2", help="WORKERSxREPLICAS,...")
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--images", type=int, default=2, help="images per worker request")
    ap.add_argument("--size", type=int, default=64, help="image side in pixels")
    ap.add_argument("--sample-ms", type=float, default=50.0, help="simulated sampling time per round")
    ap.add_argument("--jitter-ms", type=float, default=20.0, help="random drift between workers per round")
    ap.add_argument("--micro-batch", type=int, default=16)
    ap.add_argument("--replica-cpus", type=float, default=0.5)
    ap.add_argument("--round-timeout", type=float, default=300.0, help="seconds one round may take")
    ap.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md alone")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import ray

    sys.path.insert(0, str(REPO / "benchmarks"))
    from _common import machine, versions, write_section

    from rocm_ray.config import load_recipe
    from rocm_ray.train.ray_trainer import local_ray_options, stop_local_ray

    reward = load_recipe(args.recipe).reward
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=max(8, os.cpu_count() or 1), **local_ray_options())
    try:
        rows = [run_config(reward, int(w), int(r), args)
                for w, r in (c.split("x") for c in args.configs.split(","))]
    finally:
        if started:
            stop_local_ray()
    lines = ["| workers x replicas | requests | scoring batches | requests per batch | batches with every "
             "waiting worker | replica utilisation | latency p50 / p95 / p99 (ms) |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['workers']} x {r['replicas']} | {r['requests']} | {r['batches']} | {r['per_batch']:.2f} "
                     f"(of {r['gather']}) | {100 * r['full']:.0f}% | {100 * r['util']:.0f}% | {1000 * r['p50']:.0f} / "
                     f"{1000 * r['p95']:.0f} / {1000 * r['p99']:.0f} |")
    rec = Path(args.recipe).resolve()
    rec_name = rec.relative_to(REPO) if rec.is_relative_to(REPO) else rec
    text = "\n".join([
        f"Reward: the `reward` section of `{rec_name}`; {args.rounds} rounds after one warm-up, {args.images} "
        f"images of {args.size} px per request, simulated sampling {args.sample_ms:g} ms + 0-{args.jitter_ms:g} ms "
        f"drift per worker and round, replicas with {args.replica_cpus:g} CPU, ray.reward_micro_batch "
        f"{args.micro_batch}, batch wait bound 200 ms.",
        f"Machine: {machine()}; {versions()}.", "", *lines])
    print(text)
    if not args.no_write:
        cmd = "python benchmarks/reward_service.py" + "".join(f" {a}" for a in (sys.argv[1:] if argv is None else argv))
        write_section(START, END, "Reward service (`benchmarks/reward_service.py`)", cmd, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
