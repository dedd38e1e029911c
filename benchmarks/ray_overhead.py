"""What the Ray path costs per step: in-process vs Ray (remote reward, colocated reward, remote + overlap).

    python benchmarks/ray_overhead.py                                   # what docs/benchmarks.md shows
    python benchmarks/ray_overhead.py --reps 1 --steps 3 --warmup 1 --paths inprocess,colocated --no-write

Every path trains the same recipe (default ``recipes/tiny_kl.yaml``: the embedded tiny LCM and its
aesthetic reward) from the same seed, with ``train.batch_size`` images a step. ``--reward-layers`` (default
64) deepens the reward's tiny CLIP tower (random weights beyond its own 3 layers) so that scoring costs
about as much as sampling, the case remote scoring and overlap exist for; 0 keeps the recipe's reward.

  inprocess   ``train_inprocess``, one torch thread (the reward in the same process)
  remote      Ray Train, 1 worker (DeepSpeed ZeRO 0, gloo, 1 CPU) + 1 RewardService replica (1 CPU)
  colocated   the same worker holding the reward model itself (``ray.reward_placement: colocated``)
  overlap     remote with ``train.micro_batch_size`` = half the batch: micro-batch 2 is sampled while 1 is
              scored by the replica (rocm_ray/train/micro.py)

The worker and the replica each get one CPU and one torch thread, so on an idle machine with >= 2 cores
they run on separate cores. The paths run interleaved (``--reps`` rounds of inprocess, remote,
colocated, overlap) so that a change in the machine's load hits all of them; start-up (Ray, actors,
worker group, evaluation) is excluded, the first ``--warmup`` steps of every run are dropped, and the
table gives the median step time over all kept steps of all repetitions, the ratio to in-process, and
the median reward wait (time the worker was blocked on the reward, from its per-step breakdown).

Prints a table and (unless ``--no-write``) writes it into the "Ray overhead" section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
START, END = "<!-- ray_overhead:start -->", "<!-- ray_overhead:end -->"
PATHS = ("inprocess", "remote", "colocated", "overlap")


def _ray_steps(res, name: str, warmup: int, steps: int) -> tuple[list[float], list[float], list[float]]:
    """(step, reward-wait, sampling seconds) of rank 0 after ``warmup`` steps, the final checkpoint's excluded."""
    from rocm_ray.train.ray_trainer import latest_checkpoint
    from rocm_ray.train.ray_worker import read_state

    state = read_state(latest_checkpoint(res.output_dir / "ray" / name))
    timing = [t for t in state["timing"] if t["step"] > warmup]  # compute_s: without report / checkpoint
    return ([t["compute_s"] for t in timing], [t.get("time_reward_wait_s", t["reward_s"]) for t in timing],
            [t["time_sampling_s"] for t in timing])


def heavier_clip(layers: int, out: Path) -> str:
    """A copy of the recipe's tiny CLIP with ``layers`` vision layers (random weights beyond its own 3):
    the same inputs, outputs and head, a scoring cost that grows with ``layers``. Returns its folder."""
    import shutil

    import torch
    from transformers import CLIPConfig, CLIPModel

    from rocm_ray.paths import resolve_path

    src = Path(resolve_path("embedded:tiny/clip"))
    dst = out / f"clip_{layers}_layers"
    if not dst.exists():
        cfg = CLIPConfig.from_pretrained(src)
        cfg.vision_config.num_hidden_layers = layers
        torch.manual_seed(0)
        model = CLIPModel(cfg)
        model.load_state_dict(CLIPModel.from_pretrained(src).state_dict(), strict=False)  # its first 3 layers
        model.save_pretrained(dst)
        for f in src.iterdir():
            if f.name not in ("config.json", "model.safetensors"):
                shutil.copy(f, dst / f.name)
    return str(dst)


def _reward(recipe, args, out: Path):
    """The recipe, with its CLIP-based reward's tower made ``--reward-layers`` deep (when given)."""
    if args.reward_layers:
        for m in recipe.reward.models:
            if m.path == "embedded:tiny/clip":
                m.path = heavier_clip(args.reward_layers, out)
    return recipe


def run_path(path: str, args, out: Path, rep: int) -> tuple[list[float], list[float], list[float], list[float]]:
    """One run of ``path``: (kept step seconds, reward-wait seconds, sampling seconds, per-step losses)."""
    import torch

    from rocm_ray.config import load_recipe
    from rocm_ray.train.inprocess import train_inprocess
    from rocm_ray.train.ray_trainer import train_ray

    name = f"{path}_{rep}"
    common = [f"name={name}", f"train.batch_size={args.batch_size}", f"train.steps={args.steps}",
              f"train.output_dir={out}/{name}", "logging.log_every=1000", "train.checkpoint_every=0"]
    if path == "inprocess":
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            res = train_inprocess(_reward(load_recipe(args.recipe, common), args, out))
        finally:
            torch.set_num_threads(threads)
        steps = [1.0 / r["it_per_s"] for r in res.metrics][args.warmup:]
        return steps, [], [], [r["loss"] for r in res.metrics]
    extra = ["train.num_workers=1", "train.zero_stage=0", "ray.cpus_per_worker=1", "ray.reward_num_cpus=1"]
    if path == "colocated":
        extra.append("ray.reward_placement=colocated")
    if path == "overlap":
        extra.append(f"train.micro_batch_size={args.batch_size // 2}")
    res = train_ray(_reward(load_recipe(args.recipe, common + extra), args, out))
    steps, wait, sampling = _ray_steps(res, name, args.warmup, args.steps)
    return steps, wait, sampling, [r["loss"] for r in res.metrics]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--recipe", default=str(REPO / "recipes/tiny_kl.yaml"))
    ap.add_argument("--paths", default=",".join(PATHS), help=f"comma-separated, of {', '.join(PATHS)}")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--reps", type=int, default=2, help="interleaved repetitions of every path")
    ap.add_argument("--reward-layers", type=int, default=64,
                    help="make the tiny CLIP of the reward this many vision layers deep (a costlier scorer)")
    ap.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md alone")
    args = ap.parse_args(argv)
    paths = [p for p in args.paths.split(",") if p]
    if args.steps <= args.warmup or not set(paths) <= set(PATHS) or args.batch_size % 2:
        ap.error("--steps must exceed --warmup, --paths must name known paths, --batch-size must be even")

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("WANDB_MODE", "disabled")
    import ray

    sys.path.insert(0, str(REPO / "benchmarks"))
    from _common import machine, versions, write_section

    from rocm_ray.train.ray_trainer import local_ray_options, stop_local_ray

    out = Path(tempfile.mkdtemp(prefix="rocm_ray_bench_"))
    steps: dict[str, list[float]] = {p: [] for p in paths}
    waits: dict[str, list[float]] = {p: [] for p in paths}
    sampling: dict[str, list[float]] = {p: [] for p in paths}
    losses: dict[str, list[float]] = {}
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=max(4, os.cpu_count() or 1), **local_ray_options())
    try:
        for rep in range(args.reps):
            for p in paths:
                s, w, smp, loss = run_path(p, args, out, rep)
                steps[p] += s
                waits[p] += w
                sampling[p] += smp
                losses.setdefault(p, loss)
    finally:
        if started:
            stop_local_ray()

    med = statistics.median
    base = med(steps["inprocess"]) if "inprocess" in steps else None
    lines = ["| path | median s/step | steps kept | sampling (median s) | reward wait (median s) | ratio to "
             "in-process |", "|---|---|---|---|---|---|"]
    for p in paths:
        ratio = f"{med(steps[p]) / base:.2f}x" if base else ""
        wait = f"{med(waits[p]):.4f}" if waits[p] else ""
        smp = f"{med(sampling[p]):.4f}" if sampling[p] else ""
        lines.append(f"| {p} | {med(steps[p]):.4f} | {len(steps[p])} | {smp} | {wait} | {ratio} |")
    ref = losses[paths[0]]
    diff = max(abs(a - b) for p in paths for a, b in zip(losses[p], ref, strict=True))
    rec = Path(args.recipe).resolve()
    rec_name = rec.relative_to(REPO) if rec.is_relative_to(REPO) else rec
    text = "\n".join([
        f"Config: `{rec_name}` with train.batch_size={args.batch_size}, train.steps={args.steps} (first "
        f"{args.warmup} dropped), {args.reps} interleaved repetition(s) of {', '.join(paths)}; reward: "
        + (f"its tiny CLIP at {args.reward_layers} vision layers" if args.reward_layers else "as in the recipe")
        + "; Ray paths: 1 "
        "Ray Train worker (ZeRO 0, gloo, 1 CPU, 1 thread), the replica 1 CPU; Ray Train poll interval "
        f"{os.environ.get('RAY_TRAIN_HEALTH_CHECK_INTERVAL_S')} s. The per-step losses of all paths agree to "
        f"{diff:.2g}.",
        f"Machine: {machine()}; {versions()}.", "", *lines])
    print(text)
    if not args.no_write:
        cmd = "python benchmarks/ray_overhead.py" + "".join(f" {a}" for a in (sys.argv[1:] if argv is None else argv))
        write_section(START, END, "Ray overhead (`benchmarks/ray_overhead.py`)", cmd,
                      "Step times only (start-up excluded).\n\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
