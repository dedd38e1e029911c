"""The regularizer sweep's report: reads the ``results.csv`` that ``rocm-ray tune recipes/tune_regularizers.yaml``
wrote and puts its table and two Pareto plots (final eval reward vs held-out judge accuracy, and vs KL to the
reference) into ``docs/results.md`` (section "sweep").

    rocm-ray tune recipes/tune_regularizers.yaml             # the search (54 trials; see docs/results.md)
    python benchmarks/regularizer_sweep.py --results outputs/tune_regularizers/results.csv --command "..."
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from paper_runs import ROOT, write_section  # noqa: E402


def _num(v: str) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def front(rows: list[dict], x: str, better_x: str) -> set[int]:
    """Indices not dominated in (eval_reward: higher, x: higher if better_x == "max" else lower)."""
    sign = 1 if better_x == "max" else -1
    pts = [(i, r["eval_reward"], sign * r[x]) for i, r in enumerate(rows)
           if math.isfinite(r["eval_reward"]) and math.isfinite(r[x])]
    return {i for i, a, b in pts
            if not any(a2 >= a and b2 >= b and (a2 > a or b2 > b) for _, a2, b2 in pts)}


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    regs = sorted({r["regularizer"] for r in rows})
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6), dpi=110)
    for ax, x, better, xl in ((axes[0], "judge", "max", "held-out judge accuracy after training (%)"),
                              (axes[1], "kl_to_ref", "min", "KL to the reference (per dim, summed over steps)")):
        on_front = front(rows, x, better)
        for j, reg in enumerate(regs):
            sel = [(i, r) for i, r in enumerate(rows) if r["regularizer"] == reg]
            ax.scatter([r[x] * (100 if x == "judge" else 1) for _, r in sel], [r["eval_reward"] for _, r in sel],
                       color=f"C{j % 10}", label=reg, s=[60 if i in on_front else 22 for i, _ in sel],
                       edgecolors=["k" if i in on_front else "none" for i, _ in sel])
        for i in on_front:
            r = rows[i]
            ax.annotate(f"{r['regularizer']} {r['reduction']} b={r['beta']:g}",
                        (r[x] * (100 if x == "judge" else 1), r["eval_reward"]), fontsize=6,
                        textcoords="offset points", xytext=(4, 3))
        if x == "kl_to_ref":
            pos = [r[x] for r in rows if r[x] > 0]
            if pos and max(pos) / min(pos) > 100:
                ax.set_xscale("log")
        ax.set_xlabel(xl, fontsize=8)
        ax.set_ylabel("final eval reward", fontsize=8)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, ncol=2)
    fig.suptitle("regularizer sweep on the embedded tiny world (black edge: Pareto front)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--results", default="outputs/tune_regularizers/results.csv")
    p.add_argument("--command", default="rocm-ray tune recipes/tune_regularizers.yaml",
                   help="the rocm-ray tune command that produced --results (quoted into the docs)")
    p.add_argument("--note", default="", help="the machine and load, for the docs")
    p.add_argument("--docs", default=str(ROOT / "docs"))
    args = p.parse_args(argv)
    docs = Path(args.docs)
    with open(args.results) as f:
        raw = list(csv.DictReader(f))
    rows = []
    for r in raw:
        rows.append({"regularizer": r.get("algorithm.regularizer") or r.get("regularizer"),
                     "beta": _num(r.get("algorithm.beta") or r.get("beta")),
                     "reduction": r.get("algorithm.reduction") or "mean", "status": r["status"],
                     "eval_reward": _num(r.get("eval_reward")), "before": _num(r.get("eval_reward_before")),
                     "judge": _num(r.get("judge_accuracy")), "kl_to_ref": _num(r.get("kl_to_ref"))})
    rows.sort(key=lambda r: (r["regularizer"], r["reduction"], r["beta"]))
    fj, fk = front(rows, "judge", "max"), front(rows, "kl_to_ref", "min")
    lines = ["| regularizer | reduction | beta | status | eval reward | judge accuracy | KL to reference | "
             "Pareto (judge) | Pareto (KL) |", "|---|---|---|---|---|---|---|---|---|"]
    for i, r in enumerate(rows):
        judge = "n/a" if math.isnan(r["judge"]) else f"{100 * r['judge']:.0f}%"
        lines.append(f"| {r['regularizer']} | {r['reduction']} | {r['beta']:g} | {r['status']} | "
                     f"{r['eval_reward']:.2f} | {judge} | {r['kl_to_ref']:.4g} | {'yes' if i in fj else ''} | "
                     f"{'yes' if i in fk else ''} |")
    before = next((r["before"] for r in rows if math.isfinite(r["before"])), math.nan)
    (docs / "img").mkdir(parents=True, exist_ok=True)
    plot(rows, docs / "img" / "sweep_pareto.png")
    text = f"""## The regularizer sweep

Measured by `{args.command}` then `python benchmarks/regularizer_sweep.py` ({args.note}).
{len(rows)} trials; eval reward, judge accuracy and KL to the reference after training on the recipe's
fixed eval images (reference model: eval reward {before:.2f}, judge 100%). "Pareto (judge)": no other
trial has both a higher-or-equal reward and a higher-or-equal judge accuracy (one strictly);
"Pareto (KL)": the same with a lower-or-equal KL to the reference.

{chr(10).join(lines)}

![sweep Pareto](img/sweep_pareto.png)
"""
    write_section(docs / "results.md", "sweep", text)
    print(chr(10).join(lines))
    print(f"wrote {docs / 'results.md'} (section sweep)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
