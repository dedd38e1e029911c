"""Regularized vs unregularized ROCM on the embedded tiny world, side by side in one run.

Runs ``recipes/tiny_kl.yaml`` as shipped (KL), again with ``algorithm.regularizer=none`` at the SAME
learning rate (the one-cause contrast), and without the regularizer at a 10x learning rate, then prints
and writes to ``docs/results.md`` (section "reward_hacking"): reward and held-out digit-judge accuracy
before and after, the final divergence, wall time; and copies the before/after grids and curves to
``docs/img/``. The judge never sees training: it is the independent witness of reward hacking.

    python benchmarks/reward_hacking.py [--steps N] [--runs 0,1,2] [--out outputs/hacking]
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

RUNS = {
    "ROCM + KL (recipes/tiny_kl.yaml)": [],
    "no regularizer, same lr": ["algorithm.regularizer=none"],
    "no regularizer, lr x10": ["algorithm.regularizer=none", "train.lr=1.0e-2"],
}
TAGS = ("kl", "none_same_lr", "none")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=None, help="override train.steps of both runs")
    p.add_argument("--out", default="outputs/hacking")
    p.add_argument("--docs", default=str(ROOT / "docs"))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--runs", default="0,1,2", help="which of the runs (0 = KL, 1 = none same lr, 2 = none lr x10)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    from rocm_ray.config import load_recipe
    from rocm_ray.train.inprocess import train_inprocess

    docs = Path(args.docs)
    (docs / "img").mkdir(parents=True, exist_ok=True)
    rows = []
    chosen = [int(i) for i in args.runs.split(",")]
    for i, (label, overrides) in enumerate(RUNS.items()):
        if i not in chosen:
            continue
        out = Path(args.out) / f"run{i}"
        ov = [*overrides, f"train.output_dir={out}"]
        if args.steps:
            ov.append(f"train.steps={args.steps}")
        recipe = load_recipe(ROOT / "recipes/tiny_kl.yaml", ov)
        t0 = time.perf_counter()
        res = train_inprocess(recipe)
        s = res.summary
        rows.append({
            "run": label, "overrides": " ".join(overrides) or "(as shipped)",
            "lr": recipe.train.lr, "beta": recipe.algorithm.beta, "regularizer": recipe.algorithm.regularizer,
            "steps": recipe.train.steps,
            "reward_before": s["reward_before"], "reward_after": s["reward_after"],
            "judge_before": s.get("judge_accuracy_before"), "judge_after": s.get("judge_accuracy_after"),
            "final_kl_divergence": res.metrics[-1]["divergence"], "wall_s": time.perf_counter() - t0,
        })
        tag = TAGS[i]
        shutil.copy(out / "grid.png", docs / "img" / f"tiny_{tag}_grid.png")
        shutil.copy(out / "curves.png", docs / "img" / f"tiny_{tag}_curves.png")

    head = ("| run | reward before | reward after | judge acc. before | judge acc. after | "
            "last-step divergence | wall (s) |")
    lines = [head, "|---|---|---|---|---|---|---|"]
    for r in rows:
        jb = "n/a" if r["judge_before"] is None else f"{100 * r['judge_before']:.1f}%"
        ja = "n/a" if r["judge_after"] is None else f"{100 * r['judge_after']:.1f}%"
        lines.append(f"| {r['run']} | {r['reward_before']:.3f} | {r['reward_after']:.3f} | {jb} | {ja} | "
                     f"{r['final_kl_divergence']:.4g} | {r['wall_s']:.0f} |")
    table = "\n".join(lines)
    print(table)
    machine = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch thread(s)"
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from paper_runs import write_section

    cmd = "python benchmarks/reward_hacking.py " + " ".join(sys.argv[1:])
    imgs = [TAGS[i] for i in chosen]
    lr10_note = " The 10x-lr run shows the same collapse, sooner." if 2 in chosen else ""
    grid_row = " | ".join(f"![{t} grid](img/tiny_{t}_grid.png)" for t in imgs)
    curve_row = " | ".join(f"![{t} curves](img/tiny_{t}_curves.png)" for t in imgs)
    text = f"""## Reward hacking: with and without the regularizer

Measured by `{cmd.strip()}` ({time.strftime('%Y-%m-%d')}, {machine}, CPU only, shared with other jobs).
Every run starts from the shipped tiny LCM and trains a LoRA toward the tiny "aesthetic" reward (bold
strokes); 200 fixed evaluation images (10 digits x 20 seeds, 4 steps) are scored before and after, and
the held-out digit judge (never a training signal) says whether the images still show the asked digit.
The divergence column is the regularizer's value at the last step (0 for the unregularized runs, which
do not compute it).

{table}

The same-lr pair differs in one thing only, the KL term: with it the reward rises and the digits stay;
without it, at the same learning rate, the reward climbs much further while the judge accuracy
collapses: the model draws what the reward likes, not digits.{lr10_note} Wall times are those of a
machine shared with other jobs (load noise, not a property of the runs).

| {" | ".join(r["run"] for r in rows)} |
|{"---|" * len(rows)}
| {grid_row} |
| {curve_row} |

Raw numbers: `docs/results.json`.
"""
    write_section(docs / "results.md", "reward_hacking", text)
    (docs / "results.json").write_text(json.dumps(rows, indent=2))
    print(f"wrote {docs / 'results.md'} (section reward_hacking)")


if __name__ == "__main__":
    main()
