"""Shared by the paper-claim benchmarks (efficiency.py, sensitivity.py): one training run on the embedded
tiny world with a learning curve, and writing a measured section into a docs/ page.

A run is ``recipes/tiny_kl.yaml`` (the embedded default) with overrides, trained in this process. Every
``eval_every`` steps the current policy samples a fixed evaluation set (the eval prompts x ``eval_seeds``
seeds, the deterministic 4-step sampler for every method, so ROCM and PPO are measured alike) which the
training reward scores and the held-out digit judge reads. "Reward queries" are the images the training
reward scored during training (steps x batch; evaluation images are not counted); "train seconds" sum
the training steps' own wall time (evaluation excluded).
"""

from __future__ import annotations

import math
import re
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "tiny_kl.yaml"


def run_curve(overrides: list[str], out: Path, steps: int, batch: int, eval_every: int, eval_seeds: int,
              seed: int = 0) -> dict:
    """Train once and return the curve: rows of (step, reward_queries, train_s, eval_reward, judge)."""
    from rocm_ray.config import load_recipe, prompts_of
    from rocm_ray.evaluate import judge_accuracy, score_images
    from rocm_ray.train.builders import build_reward, eval_grid_inputs, generate
    from rocm_ray.train.inprocess import train_inprocess
    from rocm_ray.train.step import NonFiniteError

    recipe = load_recipe(RECIPE, [*overrides, f"train.steps={steps}", f"train.batch_size={batch}",
                                  f"train.seed={seed}", f"data.eval_seeds={eval_seeds}", f"train.output_dir={out}",
                                  "logging.log_every=1000000", "logging.sample_every=0"])
    scorer = build_reward(recipe.reward, "cpu", algorithm="ppo")  # scoring only
    ps, ss = eval_grid_inputs(recipe, prompts_of(recipe))
    a = recipe.algorithm
    curve: list[dict] = []
    train_s = [0.0]

    def measure(step: int, policy, reference: bool = False) -> dict:
        images = generate(policy, ps, ss, a.num_inference_steps, a.guidance_scale, reference=reference)
        point = {"step": step, "reward_queries": step * batch, "train_s": train_s[0],
                 "eval_reward": float(score_images(scorer, images, ps).mean()),
                 "judge": judge_accuracy(images, ps)}
        curve.append(point)
        return point

    def evaluate(step: int, policy) -> dict:
        if not curve:  # the starting point: the reference (adapter off), 0 queries, 0 s
            measure(0, policy, reference=True)
        if step % eval_every == 0 or step == steps:
            p = measure(step, policy)
            return {"eval_reward": p["eval_reward"]}
        return {}

    def on_step(row: dict) -> None:
        train_s[0] += 1.0 / row["it_per_s"]
        if curve and curve[-1]["step"] == row["step"]:
            curve[-1]["train_s"] = train_s[0]

    t0 = time.perf_counter()
    status = "done"
    try:
        train_inprocess(recipe, on_step=on_step, evaluate=evaluate)
    except NonFiniteError as e:
        status = f"diverged ({str(e)[:60]})"
    return {"overrides": overrides, "seed": seed, "curve": curve, "status": status,
            "wall_s": time.perf_counter() - t0, "lr": recipe.train.lr}


def cached_run(cache: Path | None, overrides: list[str], out: Path, steps: int, batch: int, eval_every: int,
               eval_seeds: int, seed: int = 0) -> dict:
    """:func:`run_curve`, reusing a result measured before with exactly the same arguments (the efficiency
    and sensitivity benchmarks share their runs through ``cache``; delete it to re-measure)."""
    import hashlib
    import json

    key = json.dumps([overrides, steps, batch, eval_every, eval_seeds, seed])
    path = None
    if cache is not None:
        path = cache / (hashlib.sha1(key.encode()).hexdigest()[:16] + ".json")
        if path.is_file():
            return json.loads(path.read_text())
    res = run_curve(overrides, out, steps, batch, eval_every, eval_seeds, seed)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(res))
    return res


def first_reaching(curve: list[dict], target: float) -> dict | None:
    """The first evaluation point whose eval reward reaches ``target`` (None: never)."""
    return next((p for p in curve if p["step"] > 0 and p["eval_reward"] >= target), None)


def final(curve: list[dict]) -> dict:
    return curve[-1] if curve else {"eval_reward": math.nan, "judge": None, "step": 0}


def median(xs: list[float]) -> float:
    xs = sorted(x for x in xs if x is not None and math.isfinite(x))
    if not xs:
        return math.nan
    n = len(xs)
    return xs[n // 2] if n % 2 else 0.5 * (xs[n // 2 - 1] + xs[n // 2])


def machine_line() -> str:
    import os
    import platform

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else math.nan
    return (f"{platform.machine()}, {os.cpu_count()} logical CPUs shared with other jobs (load average "
            f"{load:.1f} at the end), {torch.get_num_threads()} torch thread, CPU only, {time.strftime('%Y-%m-%d')}")


def write_section(doc: Path, name: str, text: str) -> None:
    """Replace the text between ``<!-- BEGIN name -->`` and ``<!-- END name -->`` in ``doc`` (append the
    section when it is not there yet), so several scripts can own parts of one page."""
    begin, end = f"<!-- BEGIN {name} -->", f"<!-- END {name} -->"
    block = f"{begin}\n{text.rstrip()}\n{end}"
    old = doc.read_text() if doc.is_file() else ""
    if begin in old and end in old:
        new = re.sub(re.escape(begin) + r".*?" + re.escape(end), lambda _: block, old, flags=re.S)
    else:
        new = old.rstrip() + ("\n\n" if old else "") + block + "\n"
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(new)


def finish_figure(fig, axes, xlabels, ylabels, title: str, path: Path, legend_size: int = 8) -> None:
    """Label, grid, legend (first axes), title and save a benchmark figure."""
    import matplotlib.pyplot as plt

    for ax, xl, yl in zip(axes, xlabels, ylabels, strict=True):
        ax.set_xlabel(xl)
        ax.set_ylabel(yl)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=legend_size)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
