"""Sample efficiency and wall-clock: ROCM (KL, and every other regularizer at one beta) vs RLCM-style PPO on the
embedded tiny world (recipes/tiny_kl.yaml), side by side in one run.

For ROCM + KL and for PPO, every learning rate of a small grid is run (seed 0); the best one (highest final
eval reward among runs whose held-out judge accuracy stays >= 90%, else the highest final eval reward) is
run again with more seeds. Every other regularizer runs once at ROCM + KL's best learning rate. Measured:
eval reward against reward queries (training images scored) and against training seconds; queries and
seconds to reach a fixed target eval reward; final held-out judge accuracy. Writes a table and
``docs/img/efficiency.png`` into ``docs/benchmarks.md`` (section "efficiency").

    python benchmarks/efficiency.py                       # the size measured in docs/benchmarks.md
    python benchmarks/efficiency.py --steps 100 --batch 16 --seeds 3 --eval-every 5 --eval-seeds 10  # full size
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
from paper_runs import (  # noqa: E402
    RECIPE,
    ROOT,
    cached_run,
    final,
    finish_figure,
    first_reaching,
    machine_line,
    median,
    write_section,
)

OTHER_REGULARIZERS = ("reverse_kl", "js", "hellinger", "chi2", "tv", "fisher", "w2")
PPO = ["algorithm.name=ppo", "algorithm.regularizer=none", "algorithm.beta=0"]  # RLCM: no KL penalty


def interleaved_step_times(reps: int, batch: int) -> dict[str, float]:
    """Median seconds per training step of ROCM + KL and of PPO, measured side by side: one policy, the two
    steps alternated ``reps`` times (each with its optimizer update), so machine load hits both alike."""
    from rocm_ray.config import load_recipe, prompts_of
    from rocm_ray.rewards.gradient import score_with_grad
    from rocm_ray.train.builders import build_policy, build_reward
    from rocm_ray.train.inprocess import step_kwargs
    from rocm_ray.train.ppo_step import group_of, local_reward_fn, ppo_step, torch_optimizer_step
    from rocm_ray.train.step import rocm_step, step_batch

    recipes = {"rocm": load_recipe(RECIPE, [f"train.batch_size={batch}"]),
               "ppo": load_recipe(RECIPE, [*PPO, f"train.batch_size={batch}"])}
    torch.manual_seed(0)
    policy = build_policy(recipes["rocm"], "cpu")
    scorer = build_reward(recipes["rocm"].reward, "cpu")
    params = policy.trainable_parameters()
    opt = torch.optim.AdamW(params, lr=1e-4)
    prompts = prompts_of(recipes["rocm"])
    calls = {"rocm": (rocm_step, lambda im, ps: score_with_grad(scorer, im, ps), step_kwargs(recipes["rocm"])),
             "ppo": (ppo_step, local_reward_fn(scorer, "ppo"),
                     {**step_kwargs(recipes["ppo"]), "optimizer_step": torch_optimizer_step(opt, params, 1.0)})}
    times: dict[str, list[float]] = {"rocm": [], "ppo": []}
    for i in range(reps + 1):  # the first round warms up and is dropped
        for name, (fn, reward_fn, kwargs) in calls.items():
            ps, seeds = step_batch(prompts, batch, i + 1, 0, group=group_of(recipes[name]))
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            fn(policy, ps, seeds, reward_fn, **kwargs)
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            if i:
                times[name].append(time.perf_counter() - t0)
    return {name: median(ts) for name, ts in times.items()}


def pick_best(runs: list[dict]) -> dict:
    """Highest final eval reward among runs that keep the judge >= 90% (else among all)."""
    ok = [r for r in runs if r["status"] == "done" and (final(r["curve"]).get("judge") or 0) >= 0.9]
    pool = ok or [r for r in runs if r["status"] == "done"] or runs
    return max(pool, key=lambda r: final(r["curve"])["eval_reward"] if r["curve"] else -math.inf)


def summarize(label: str, runs: list[dict], target: float, step_s: float, batch: int) -> dict:
    hits = [first_reaching(r["curve"], target) for r in runs]
    queries = median([h["reward_queries"] if h else math.nan for h in hits])
    return {
        "method": label, "lr": runs[0]["lr"], "seeds": len(runs),
        "final_reward": median([final(r["curve"])["eval_reward"] for r in runs]),
        "final_judge": median([final(r["curve"]).get("judge") for r in runs]),
        "queries_to_target": queries,
        "seconds_to_target": queries / batch * step_s,  # steps to target x interleaved median s/step
        "measured_seconds_to_target": median([h["train_s"] if h else math.nan for h in hits]),
        "reached": sum(h is not None for h in hits),
        "status": ", ".join(sorted({r["status"] for r in runs})),
    }


def curve_median(runs: list[dict], key: str) -> tuple[list[float], list[float]]:
    """x (median over seeds of ``key``) and the median eval reward at each evaluation point."""
    n = min(len(r["curve"]) for r in runs)
    xs = [median([r["curve"][i][key] for r in runs]) for i in range(n)]
    ys = [median([r["curve"][i]["eval_reward"] for r in runs]) for i in range(n)]
    return xs, ys


def plot(groups: dict[str, list[dict]], targets: list[float], path: Path, step_s: dict[str, float],
         batch: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), dpi=110)
    for i, (label, runs) in enumerate(groups.items()):
        style = "-o" if label.startswith(("ROCM + kl", "PPO")) else "--"
        per_step = step_s["ppo" if label.startswith("PPO") else "rocm"]
        for ax, scale in zip(axes, (1.0, per_step / batch), strict=True):
            xs, ys = curve_median(runs, "reward_queries")
            xs = [x * scale for x in xs]  # queries, or steps x the interleaved median s/step
            ax.plot(xs, ys, style, ms=3, lw=2 if style == "-o" else 1, color=f"C{i % 10}", label=label)
    for ax in axes:
        for target in targets:
            ax.axhline(target, color="0.4", ls=":", lw=1)
    finish_figure(fig, axes, ("reward queries (training images scored)",
                              "training seconds (steps x interleaved median s/step)"),
                  ("eval reward (fixed prompts x seeds)",) * 2,
                  "embedded tiny world: eval reward vs reward queries and wall-clock (median over seeds)", path, 7)


def target_table(rows: list[dict], target: float) -> str:
    """The efficiency table for one target eval reward."""
    ppo = next(r for r in rows if r["method"].startswith("PPO"))
    lines = [f"Target eval reward {target:g}:", "",
             "| method | lr (best of grid) | seeds | final eval reward | final judge accuracy | reward queries to "
             f"{target:g} | s to {target:g} (steps x s/step) | PPO / method, queries | PPO / method, seconds |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        q_ratio = ppo["queries_to_target"] / r["queries_to_target"] if r["queries_to_target"] else math.nan
        s_ratio = ppo["seconds_to_target"] / r["seconds_to_target"] if r["seconds_to_target"] else math.nan
        judge = "n/a" if math.isnan(r["final_judge"]) else f"{100 * r['final_judge']:.0f}%"
        reached = f" ({r['reached']}/{r['seeds']} reached)" if r["reached"] < r["seeds"] else ""
        lines.append(f"| {r['method']} | {r['lr']:g} | {r['seeds']} | {r['final_reward']:.2f} | {judge} | "
                     f"{fmt(r['queries_to_target'], '{:.0f}')}{reached} | {fmt(r['seconds_to_target'], '{:.1f}')} | "
                     f"{fmt(q_ratio, '{:.2f}x')} | {fmt(s_ratio, '{:.2f}x')} |")
    return "\n".join(lines)


def fmt(v: float, pattern: str = "{:.3g}") -> str:
    return "not reached" if v is None or (isinstance(v, float) and math.isnan(v)) else pattern.format(v)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seeds", type=int, default=2, help="seeds of each method at its best learning rate")
    p.add_argument("--eval-every", type=int, default=4)
    p.add_argument("--eval-seeds", type=int, default=2, help="seeds per eval prompt (10 prompts)")
    p.add_argument("--rocm-lrs", default="0.0003,0.001,0.003")
    p.add_argument("--ppo-lrs", default="0.001,0.003,0.01")
    p.add_argument("--regularizers", default=",".join(OTHER_REGULARIZERS), help="'' = none of the others")
    p.add_argument("--target", default="8,9", help="eval rewards to reach, comma-separated (start: about 6.1)")
    p.add_argument("--timing-reps", type=int, default=8, help="interleaved ROCM/PPO steps for s/step")
    p.add_argument("--out", default="outputs/efficiency")
    p.add_argument("--cache", default="outputs/paper_cache", help="runs shared with sensitivity.py ('' = off)")
    p.add_argument("--docs", default=str(ROOT / "docs"))
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    out, docs = Path(args.out), Path(args.docs)
    cache = Path(args.cache) if args.cache else None
    t_start = time.perf_counter()
    n = [0]
    run_s: list[float] = []  # each run's own wall time (also for runs taken from the cache)

    def run(overrides: list[str], seed: int = 0) -> dict:
        n[0] += 1
        r = cached_run(cache, overrides, out / f"run{n[0]}", args.steps, args.batch, args.eval_every,
                       args.eval_seeds, seed)
        run_s.append(r["wall_s"])
        last = final(r["curve"])
        print(f"efficiency: {' '.join(overrides) or '(ROCM + KL)'} seed {seed}: final eval reward "
              f"{last['eval_reward']:.3f}, judge {last.get('judge')}, {r['status']}", flush=True)
        return r

    groups: dict[str, list[dict]] = {}
    best_lr = {}
    for label, base, lrs in (("ROCM + kl", [], args.rocm_lrs), ("PPO (RLCM)", PPO, args.ppo_lrs)):
        grid = [run([*base, f"train.lr={lr}"]) for lr in lrs.split(",")]
        best = pick_best(grid)
        best_lr[label] = best["lr"]
        groups[label] = [best] + [run([*base, f"train.lr={best['lr']}"], seed) for seed in range(1, args.seeds)]
    for reg in [r for r in args.regularizers.split(",") if r]:
        groups[f"ROCM + {reg}"] = [run([f"algorithm.regularizer={reg}", f"train.lr={best_lr['ROCM + kl']}"], seed)
                                   for seed in range(args.seeds)]

    targets = [float(t) for t in str(args.target).split(",")]
    all_rows: dict[str, list[dict]] = {}
    step_s = interleaved_step_times(args.timing_reps, args.batch)
    print(f"efficiency: interleaved median s/step: ROCM {step_s['rocm']:.3f}, PPO {step_s['ppo']:.3f}", flush=True)
    tables = []
    for target in targets:
        rows = [summarize(label, runs, target, step_s["ppo" if label.startswith("PPO") else "rocm"], args.batch)
                for label, runs in groups.items()]
        all_rows[f"{target:g}"] = rows
        tables.append(target_table(rows, target))
    table = "\n\n".join(tables)
    print(table)
    (docs / "img").mkdir(parents=True, exist_ok=True)
    plot(groups, targets, docs / "img" / "efficiency.png", step_s, args.batch)
    cmd = "python benchmarks/efficiency.py " + " ".join(argv if argv is not None else sys.argv[1:])
    text = f"""## Sample efficiency and wall-clock: ROCM vs PPO (RLCM)

Measured by `{cmd.strip()}` ({machine_line()}; {len(run_s)} runs of {sum(run_s):.0f} s in all, one
after the other, shared with `benchmarks/sensitivity.py` through `--cache`; this invocation
{time.perf_counter() - t_start:.0f} s). The eval points are {args.eval_every * args.batch} queries apart, so
query ratios are resolved to that step only.
Embedded tiny world (`recipes/tiny_kl.yaml`), {args.steps} steps of {args.batch} images, eval every
{args.eval_every} steps on {10 * args.eval_seeds} fixed images (deterministic sampler for both methods).
Learning-rate grids: ROCM + KL {args.rocm_lrs}, PPO {args.ppo_lrs} (seed 0), then the best lr with
{args.seeds} seed(s); the other regularizers at ROCM + KL's best lr, {args.seeds} seed(s), shipped beta (1.0, sum).
Best lr: the highest final eval reward among the runs whose judge accuracy stays >= 90%.
Medians over seeds; "PPO / method" > 1 means the method needs fewer queries (seconds) than PPO.
Seconds: steps to the target (first eval point at or above it) x the median seconds per training step,
measured side by side in one process ({args.timing_reps} interleaved ROCM / PPO steps of {args.batch} images:
ROCM {step_s['rocm']:.3f} s, PPO {step_s['ppo']:.3f} s, ratio PPO / ROCM {step_s['ppo'] / step_s['rocm']:.2f}),
because the runs' own wall-clock on this shared machine varied by up to 20x between identical runs.

{table}

![efficiency](img/efficiency.png)
"""
    write_section(docs / "benchmarks.md", "efficiency", text)
    (docs / "efficiency.json").write_text(json.dumps({"rows": all_rows, "runs": groups}, indent=1, default=str))
    print(f"wrote {docs / 'benchmarks.md'} (section efficiency)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
