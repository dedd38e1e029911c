"""Regularized vs unregularized ROCM on the embedded tiny world, side by side in one run.

Runs ``recipes/tiny_kl.yaml`` as shipped (KL) and again with ``algorithm.regularizer=none`` and a large
learning rate, then prints and writes to ``docs/results.md``: reward and held-out digit-judge accuracy
before and after, the final divergence, wall time; and copies both before/after grids and curves to
``docs/img/``. The judge never sees training: it is the independent witness of reward hacking.

    python benchmarks/reward_hacking.py [--steps N] [--out outputs/hacking]
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
    "no regularizer, lr x10": ["algorithm.regularizer=none", "train.lr=1.0e-2"],
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=None, help="override train.steps of both runs")
    p.add_argument("--out", default="outputs/hacking")
    p.add_argument("--docs", default=str(ROOT / "docs"))
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    from rocm_ray.config import load_recipe
    from rocm_ray.train.inprocess import train_inprocess

    docs = Path(args.docs)
    (docs / "img").mkdir(parents=True, exist_ok=True)
    rows = []
    for i, (label, overrides) in enumerate(RUNS.items()):
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
        tag = "kl" if i == 0 else "none"
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
    text = f"""# Results on the embedded tiny world

Measured by `python benchmarks/reward_hacking.py` ({time.strftime('%Y-%m-%d')}, {machine}, CPU only).
Both runs start from the shipped tiny LCM and train a LoRA toward the tiny "aesthetic" reward (bold
strokes); 200 fixed evaluation images (10 digits x 20 seeds, 4 steps) are scored before and after, and
the held-out digit judge (never a training signal) says whether the images still show the asked digit.
The divergence column is the regularizer's value at the last step (0 for the unregularized run, which
does not compute it).

{table}

ROCM + KL: reward up, digits kept. Without the regularizer and with a larger step size the reward goes
up further while the judge accuracy falls: the model draws what the reward likes, not digits.

| ROCM + KL | no regularizer |
|---|---|
| ![kl grid](img/tiny_kl_grid.png) | ![none grid](img/tiny_none_grid.png) |
| ![kl curves](img/tiny_kl_curves.png) | ![none curves](img/tiny_none_curves.png) |

Raw numbers: `docs/results.json`.
"""
    (docs / "results.md").write_text(text)
    (docs / "results.json").write_text(json.dumps(rows, indent=2))
    print(f"wrote {docs / 'results.md'}")


if __name__ == "__main__":
    main()
