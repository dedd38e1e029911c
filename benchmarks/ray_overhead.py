"""What the Ray path costs per step: the in-process trainer and the Ray path on the same config, one run.

    python benchmarks/ray_overhead.py                       # tiny_debug, 8 images a step, 12 steps
    python benchmarks/ray_overhead.py --batch-size 4 --steps 20 --no-write

Both paths train the same recipe (``recipes/tiny_debug.yaml`` with ``train.batch_size`` and
``train.steps`` set) from the same seed; the Ray path runs 1 Ray Train worker (DeepSpeed ZeRO 0 on gloo)
and 1 RewardService replica. Start-up (Ray, actors, worker group, model building, evaluation) is
excluded: only per-step times count, and the first ``--warmup`` steps are dropped. Both use one torch
thread (a Ray worker with 1 CPU gets ``OMP_NUM_THREADS=1``). Per step of the Ray path:

  compute   sampling + reward round trip + backward + DeepSpeed step + metrics all_reduce (rank 0)
  reward    the RewardService round trip inside it (ray.put of the images, remote score, answer)
  total     compute + ``ray.train.report`` (+ the checkpoint on checkpoint steps)

Prints a table and (unless ``--no-write``) writes it into the "Ray overhead" section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
START, END = "<!-- ray_overhead:start -->", "<!-- ray_overhead:end -->"


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return f"{cpu}, {os.cpu_count()} logical CPUs, load average {load:.1f} at the end"


def _versions() -> str:
    import deepspeed
    import ray
    import torch

    return f"Python {platform.python_version()}, torch {torch.__version__}, ray {ray.__version__}, " \
           f"deepspeed {deepspeed.__version__}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--recipe", default=str(REPO / "recipes/tiny_debug.yaml"))
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md alone")
    args = ap.parse_args(argv)
    if args.steps <= args.warmup:
        ap.error("--steps must exceed --warmup")

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("WANDB_MODE", "disabled")
    import ray
    import torch

    from rocm_ray.config import load_recipe
    from rocm_ray.train.inprocess import train_inprocess
    from rocm_ray.train.ray_trainer import latest_checkpoint, local_ray_options, stop_local_ray, train_ray
    from rocm_ray.train.ray_worker import read_state

    tmp = Path(tempfile.mkdtemp(prefix="rocm_ray_bench_"))
    common = [f"train.batch_size={args.batch_size}", f"train.steps={args.steps}", "logging.log_every=1000"]

    torch.set_num_threads(1)
    inproc = train_inprocess(load_recipe(args.recipe, [*common, f"train.output_dir={tmp}/inprocess"]))
    in_steps = [1.0 / r["it_per_s"] for r in inproc.metrics][args.warmup:]

    recipe = load_recipe(args.recipe, [*common, "name=ray_bench", f"train.output_dir={tmp}/ray",
                                       "train.num_workers=1", "train.zero_stage=0"])
    ray.init(num_cpus=max(3, os.cpu_count() or 1), **local_ray_options())
    try:
        res = train_ray(recipe)
    finally:
        stop_local_ray()
    state = read_state(latest_checkpoint(res.output_dir / "ray" / "ray_bench"))
    timing = [t for t in state["timing"] if t["step"] > args.warmup]
    last = args.steps  # the last step's total includes the final checkpoint: keep it out of "total"
    compute = [t["compute_s"] for t in timing]
    reward = [t["reward_s"] for t in timing]
    total = [t["total_s"] for t in timing if "total_s" in t and t["step"] != last]
    losses_in = [r["loss"] for r in inproc.metrics]
    losses_ray = [r["loss"] for r in res.metrics]
    max_diff = max(abs(a - b) for a, b in zip(losses_in, losses_ray, strict=True))

    med = statistics.median
    base = med(in_steps)
    rows = [
        ("in-process (1 thread)", med(in_steps), statistics.mean(in_steps), None, 1.0),
        ("Ray: step compute (rank 0)", med(compute), statistics.mean(compute), med(reward),
         med(compute) / base),
        ("Ray: step + ray.train.report", med(total), statistics.mean(total), med(reward), med(total) / base),
    ]
    lines = [
        "| path | median s/step | mean s/step | reward round trip (median s) | ratio to in-process |",
        "|---|---|---|---|---|",
    ]
    for name, m, mean, rw, ratio in rows:
        rw_text = "" if rw is None else f"{rw:.4f}"
        lines.append(f"| {name} | {m:.4f} | {mean:.4f} | {rw_text} | {ratio:.2f}x |")
    bytes_per_step = args.batch_size * 3 * 16 * 16 * 4
    rec = Path(args.recipe).resolve()
    rec_name = rec.relative_to(REPO) if rec.is_relative_to(REPO) else rec
    text = "\n".join([
        f"Config: `{rec_name}` with train.batch_size={args.batch_size}, train.steps={args.steps} (first "
        f"{args.warmup} steps dropped); Ray path: 1 Ray Train worker (DeepSpeed ZeRO 0, gloo), "
        "1 RewardService replica, local Ray, Ray Train controller poll interval "
        f"{os.environ.get('RAY_TRAIN_HEALTH_CHECK_INTERVAL_S')} s.",
        f"Machine: {_machine()}; {_versions()}.",
        f"Per step the Ray path ships {bytes_per_step:,} bytes of images to the reward replica and "
        f"{bytes_per_step:,} bytes of gradient back (plus {args.batch_size} rewards); the in-process and Ray "
        f"losses differ by at most {max_diff:.2g}.",
        "",
        *lines,
    ])
    print(text)
    if not args.no_write:
        doc = REPO / "docs" / "benchmarks.md"
        section = (f"{START}\n## Ray overhead (`benchmarks/ray_overhead.py`)\n\n"
                   f"Measured {time.strftime('%Y-%m-%d')} with `python benchmarks/ray_overhead.py`. "
                   "Step times only (start-up excluded).\n\n" + text + f"\n{END}\n")
        old = doc.read_text() if doc.exists() else "# Benchmarks\n\n"
        if START in old and END in old:
            new = old[:old.index(START)] + section + old[old.index(END) + len(END) + 1:]
        else:
            new = old.rstrip("\n") + "\n\n" + section
        doc.write_text(new)
        print(f"wrote the Ray overhead section of {doc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
