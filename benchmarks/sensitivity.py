"""Learning-rate sensitivity: final eval reward and held-out judge accuracy of ROCM (+ KL, as shipped) and of
RLCM-style PPO over one learning-rate grid (5 values over 2 decades) on the embedded tiny world.

Writes a table and ``docs/img/sensitivity.png`` into ``docs/results.md`` (section "sensitivity"). Runs are
shared with efficiency.py through ``--cache`` (same steps, batch, seed and evaluation = same run).

    python benchmarks/sensitivity.py                          # the size measured in docs/results.md
    python benchmarks/sensitivity.py --steps 100 --batch 16 --eval-seeds 10   # the issue's full size
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from paper_runs import ROOT, cached_run, final, finish_figure, machine_line, write_section  # noqa: E402

METHODS = {"ROCM + KL": [], "PPO (RLCM)": ["algorithm.name=ppo", "algorithm.regularizer=none", "algorithm.beta=0"]}


def plot(results: dict[str, list[tuple[float, dict]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), dpi=110)
    for i, (label, pts) in enumerate(results.items()):
        lrs = [lr for lr, _ in pts]
        axes[0].plot(lrs, [r["eval_reward"] for _, r in pts], "-o", color=f"C{i}", label=label)
        axes[1].plot(lrs, [100 * (r.get("judge") or 0) for _, r in pts], "-o", color=f"C{i}", label=label)
    for ax in axes:
        ax.set_xscale("log")
    finish_figure(fig, axes, ("learning rate",) * 2, ("final eval reward", "final held-out judge accuracy (%)"),
                  "embedded tiny world: sensitivity to the learning rate", path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--eval-every", type=int, default=4)
    p.add_argument("--eval-seeds", type=int, default=2)
    p.add_argument("--lrs", default="0.0001,0.0003,0.001,0.003,0.01")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--out", default="outputs/sensitivity")
    p.add_argument("--cache", default="outputs/paper_cache")
    p.add_argument("--docs", default=str(ROOT / "docs"))
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    out, docs = Path(args.out), Path(args.docs)
    cache = Path(args.cache) if args.cache else None
    t_start = time.perf_counter()
    lrs = [float(x) for x in args.lrs.split(",")]
    results: dict[str, list[tuple[float, dict]]] = {}
    n, start = 0, math.nan
    for label in args.methods.split(","):
        results[label] = []
        for lr in lrs:
            n += 1
            r = cached_run(cache, [*METHODS[label], f"train.lr={lr}"], out / f"run{n}", args.steps, args.batch,
                           args.eval_every, args.eval_seeds)
            last = dict(final(r["curve"]), status=r["status"])
            start = r["curve"][0]["eval_reward"] if r["curve"] else start
            results[label].append((lr, last))
            print(f"sensitivity: {label} lr {lr:g}: eval reward {last['eval_reward']:.3f}, judge "
                  f"{last.get('judge')}, {r['status']}", flush=True)
    lines = ["| method | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " | spread of final reward (max - min) |",
             "|---|" + "---|" * (len(lrs) + 1)]
    for label, pts in results.items():
        cells = []
        for _, r in pts:
            judge = "n/a" if r.get("judge") is None else f"{100 * r['judge']:.0f}%"
            flag = "" if r["status"] == "done" else " (diverged)"
            cells.append(f"{r['eval_reward']:.2f} / {judge}{flag}")
        finite = [r["eval_reward"] for _, r in pts if math.isfinite(r["eval_reward"])]
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {max(finite) - min(finite):.2f} |")
    table = "\n".join(lines)
    print(table)
    (docs / "img").mkdir(parents=True, exist_ok=True)
    plot(results, docs / "img" / "sensitivity.png")
    cmd = "python benchmarks/sensitivity.py " + " ".join(argv if argv is not None else sys.argv[1:])
    text = f"""## Sensitivity to the learning rate: ROCM vs PPO (RLCM)

Measured by `{cmd.strip()}` ({machine_line()}; {time.perf_counter() - t_start:.0f} s in all, runs shared
with `benchmarks/efficiency.py`). Embedded tiny world (`recipes/tiny_kl.yaml`), {args.steps} steps of
{args.batch} images, seed 0; each cell: final eval reward / held-out judge accuracy on {10 * args.eval_seeds}
fixed images (the reference model: reward {start:.2f}). ROCM + KL
as shipped (beta 1.0, sum); PPO as RLCM (no KL penalty, clip 1e-4, 2 inner epochs, 4 samples per prompt).

{table}

![sensitivity](img/sensitivity.png)
"""
    write_section(docs / "results.md", "sensitivity", text)
    (docs / "sensitivity.json").write_text(json.dumps({k: v for k, v in results.items()}, indent=1, default=str))
    print(f"wrote {docs / 'results.md'} (section sensitivity)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
