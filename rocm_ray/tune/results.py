"""The results of ``rocm-ray tune``: one row per trial, the best trial, the Pareto front and its plot.

``results.csv`` and ``results.md`` (one row per trial: searched values, final metrics, status),
``pareto.png`` (final eval reward vs KL to the reference when the trials finished, else the last step's
reward vs the trial's own divergence; the non-dominated trials labelled) and ``best_recipe.yaml`` (the best
trial as a ready-to-run train recipe).
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rocm_ray.config import Recipe
from rocm_ray.tune.search_space import SearchKey


@dataclass
class ResultSummary:
    """What a search produced: one row per trial, the best one, and where the tables and plots are."""

    output_dir: Path
    tune_dir: Path
    rows: list[dict]
    searched: list[str]
    metric: str
    mode: str
    best: dict | None
    results_csv: Path
    results_md: Path
    pareto_png: Path | None
    errors: list[str] = field(default_factory=list)
    best_recipe: Path | None = None  # best_recipe.yaml: the best trial as a train recipe


def _trial_row(result, keys: list[SearchKey], base: Recipe, out: Path) -> dict:
    m = result.metrics or {}
    cfg = result.config or {}
    trial_id = m.get("trial_id") or Path(result.path).name
    row: dict[str, Any] = {"trial_id": trial_id}
    for k in keys:
        row[k.key] = cfg.get(k.key)
    for key, name, value in (("algorithm.regularizer", "regularizer", base.algorithm.regularizer),
                             ("algorithm.beta", "beta", base.algorithm.beta)):
        if key not in row:  # not searched: the recipe's value, for the table and the Pareto labels
            row[name] = value
    steps = m.get("step")
    if result.error is not None:
        row["status"] = "error"
    elif steps is not None and steps < cfg.get("train.steps", base.train.steps):
        row["status"] = "stopped early"
    else:
        row["status"] = "done" if m else "no result"
    row["steps"] = steps
    for name in ("reward", "divergence", "loss", "eval_reward", "eval_reward_before", "kl_to_ref",
                 "judge_accuracy", "judge_accuracy_before", base.tune.metric):
        if name in m:
            row[name] = m[name]
    row["run_dir"] = str(Path("trials") / trial_id) if (out / "trials" / trial_id).exists() else ""
    return row


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


#: the Pareto axes, preferred first: (reward key, divergence key, reward label, divergence label)
PARETO_AXES = (
    ("eval_reward", "kl_to_ref", "final reward (fixed eval prompts x seeds, after training)",
     "final KL to the reference (per dim, summed over steps; same measure for every regularizer)"),
    ("reward", "divergence", "reward at the last step (training batch)",
     "divergence at the last step (each trial's own regularizer)"),
)


def pareto_axes(rows: list[dict]) -> tuple[str, str, str, str]:
    """The after-training eval reward vs KL to the reference when any trial has them (finished trials);
    else the last step's training reward vs the trial's own divergence."""
    for axes in PARETO_AXES:
        if any(_finite(r.get(axes[0])) and _finite(r.get(axes[1])) for r in rows):
            return axes
    return PARETO_AXES[-1]


def pareto_front(rows: list[dict], reward_key: str = "reward", div_key: str = "divergence") -> list[int]:
    """Indices of the rows no other row dominates (reward at least as high and divergence at least as low,
    one of them strictly); rows without both values take no part."""
    pts = [(i, r[reward_key], r[div_key]) for i, r in enumerate(rows)
           if _finite(r.get(reward_key)) and _finite(r.get(div_key))]
    front = []
    for i, ri, di in pts:
        dominated = any((rj >= ri and dj <= di) and (rj > ri or dj < di) for _, rj, dj in pts)
        if not dominated:
            front.append(i)
    return front


def pick_best(rows: list[dict], metric: str, mode: str) -> dict | None:
    """The best trial by ``metric`` at its last report, among trials that ran every step (ASHA-stopped
    trials were measured at an earlier step); among all reported trials if none finished."""
    ok = [r for r in rows if r["status"] != "error" and _finite(r.get(metric))]
    done = [r for r in ok if r["status"] == "done"] or ok
    if not done:
        return None
    sign = 1 if mode == "max" else -1
    return max(done, key=lambda r: sign * r[metric])


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)


def write_tables(rows: list[dict], out: Path, title: str, best: dict | None,
                 metric: str) -> tuple[Path, Path]:
    """``results.csv`` and ``results.md``: one row per trial (searched values, final metrics, status)."""
    cols = list(dict.fromkeys(k for r in rows for k in r))
    csv_path, md_path = out / "results.csv", out / "results.md"
    with csv_path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)
    lines = [f"# {title}", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |")
    if best is not None:
        lines += ["", f"Best by {metric}: trial {best['trial_id']} ({metric} = {_fmt(best[metric])})."]
    rk, dk, _, _ = pareto_axes(rows)
    lines += ["", f"Pareto front ({rk} vs {dk}): "
              + (", ".join(r["trial_id"] for r in rows if r.get("pareto")) or "none"), ""]
    md_path.write_text("\n".join(lines))
    return csv_path, md_path


def _label(row: dict) -> str:
    reg = row.get("algorithm.regularizer", row.get("regularizer"))
    beta = row.get("algorithm.beta", row.get("beta"))
    lr = f" lr={_fmt(row['train.lr'])}" if "train.lr" in row else ""
    return f"{reg} β={_fmt(beta)}{lr}"


def plot_pareto(rows: list[dict], path: Path, title: str) -> Path | None:
    """Final reward vs final divergence of every trial; the non-dominated ones highlighted and labelled
    by regularizer and beta."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rk, dk, r_label, d_label = pareto_axes(rows)
    pts = [r for r in rows if _finite(r.get(rk)) and _finite(r.get(dk))]
    if not pts:
        return None
    fig, ax = plt.subplots(figsize=(6.8, 4.8), dpi=120)
    others = [r for r in pts if not r.get("pareto")]
    front = sorted((r for r in pts if r.get("pareto")), key=lambda r: r[dk])
    ax.scatter([r[dk] for r in others], [r[rk] for r in others], c="0.6", s=28, label="dominated")
    for r in others:
        ax.annotate(_label(r), (r[dk], r[rk]), textcoords="offset points", xytext=(4, -10), fontsize=7,
                    color="0.45")
    ax.plot([r[dk] for r in front], [r[rk] for r in front], "-o", c="C3", ms=7, label="Pareto front")
    for r in front:
        ax.annotate(_label(r), (r[dk], r[rk]), textcoords="offset points", xytext=(5, 5), fontsize=8,
                    color="C3", weight="bold")
    divs = [r[dk] for r in pts]
    if min(divs) > 0 and max(divs) / min(divs) > 100:
        ax.set_xscale("log")
    ax.margins(x=0.12, y=0.12)  # room for the labels
    ax.set_xlabel(d_label, fontsize=8)
    ax.set_ylabel(r_label, fontsize=8)
    left_out = len([r for r in rows if r["status"] != "error"]) - len(pts)
    ax.set_title(title + (f"\n({left_out} trials without these values left out)" if left_out else ""),
                 fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _error_line(err: BaseException) -> str:
    """A trial's failure in one line: the original exception (Ray wraps it in a RayTaskError)."""
    cause = getattr(err, "cause", None) or err
    text = " ".join(str(cause).split())
    return f"{type(cause).__name__}: {text[:400]}"


def summarize(recipe: Recipe, keys: list[SearchKey], grid, out: Path) -> ResultSummary:
    """Tune's ResultGrid -> results.csv, results.md, pareto.png and the best trial."""
    rows = [_trial_row(grid[i], keys, recipe, out) for i in range(len(grid))]
    rk, dk, _, _ = pareto_axes(rows)
    for i in pareto_front(rows, rk, dk):
        rows[i]["pareto"] = True
    for r in rows:
        r.setdefault("pareto", False)
    metric, mode = recipe.tune.metric, recipe.tune.mode
    best = pick_best(rows, metric, mode)
    errors = [f"trial {rows[i]['trial_id']}: {_error_line(grid[i].error)}"
              for i in range(len(grid)) if grid[i].error is not None]
    title = f"{recipe.name}: {len(rows)} trials, scheduler {recipe.tune.scheduler}"
    csv_path, md_path = write_tables(rows, out, title, best, metric)
    png = plot_pareto(rows, out / "pareto.png", f"{recipe.name}: reward vs divergence ({len(rows)} trials)")
    best_recipe = write_best_recipe(recipe, best, keys, out / "best_recipe.yaml") if best is not None else None
    return ResultSummary(output_dir=out, tune_dir=out / "tune", rows=rows, searched=[k.key for k in keys],
                         metric=metric, mode=mode, best=best, results_csv=csv_path, results_md=md_path,
                         pareto_png=png, errors=errors, best_recipe=best_recipe)


def write_best_recipe(recipe: Recipe, best: dict, keys: list[SearchKey], path: Path) -> Path:
    """The best trial as a ready-to-run train recipe: the searched recipe with the trial's values, named
    ``<name>_best``, local paths absolute, without the search space; checked by loading it back."""
    import yaml

    from rocm_ray.config import load_recipe, recipe_from_dict
    from rocm_ray.tune.search_space import _override
    from rocm_ray.tune.trials import _absolute_paths

    base = _absolute_paths(recipe)
    overrides = [_override(k.key, best[k.key]) for k in keys if k.key in best]
    overrides += [_override("name", f"{recipe.name}_best"), _override("train.output_dir", "outputs/{name}"),
                  "tune.search_space={}"]
    data = recipe_from_dict(base, recipe.source, overrides).to_dict()
    searched = ", ".join(f"{k.key}={best[k.key]!r}" for k in keys if k.key in best)
    header = (f"# The best trial ({best['trial_id']}, {recipe.tune.metric} = {_fmt(best.get(recipe.tune.metric))}) "
              f"of the search {recipe.name} ({recipe.source}):\n#   {searched}\n"
              f"# Run it: rocm-ray train {path}\n")
    tmp = path.with_suffix(".yaml.tmp")
    tmp.write_text(header + yaml.safe_dump(data, sort_keys=False))
    load_recipe(tmp)  # a recipe that does not validate is never left behind as best_recipe.yaml
    tmp.replace(path)
    return path
