"""``rocm-ray tune RECIPE [key=value ...]``: the command line of the search."""

from __future__ import annotations

import json
import sys

from rocm_ray.tune.results import _fmt
from rocm_ray.tune.search import tune_recipe
from rocm_ray.tune.search_space import _override


def cmd_tune(args) -> int:
    from rocm_ray.config import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    res = tune_recipe(recipe, resume=args.resume)
    print(res.results_md.read_text(), flush=True)
    if res.best is not None:
        cfg = {k: res.best.get(k) for k in res.searched}
        print(f"rocm-ray tune: best by {res.metric} ({res.mode}): trial {res.best['trial_id']} "
              f"{res.metric}={_fmt(res.best[res.metric])} config {json.dumps(cfg)}", flush=True)
        print("  rerun it: rocm-ray train " + args.recipe + " " + " ".join(
            _override(k, v) for k, v in cfg.items()), flush=True)
        if res.best_recipe is not None:
            print(f"  or: rocm-ray train {res.best_recipe}", flush=True)
    wrote = ", ".join(str(p) for p in (res.results_csv, res.results_md, res.pareto_png) if p)
    print(f"rocm-ray tune: wrote {wrote}; TensorBoard: tensorboard --logdir {res.tune_dir}", flush=True)
    for e in res.errors:
        print(f"error: {e}", file=sys.stderr, flush=True)
    if res.errors or res.best is None:
        return 1
    return 0


def register_cli(sub) -> None:
    """Add ``rocm-ray tune RECIPE [key=value ...]`` to the ``rocm-ray`` subcommands."""
    t = sub.add_parser("tune", help="hyperparameter search over a recipe with Ray Tune (tune: section)")
    t.add_argument("recipe", help="recipes/<name>.yaml with a tune: section")
    t.add_argument("overrides", nargs="*", help="key.path=value overrides, e.g. tune.scheduler=fifo")
    t.add_argument("--resume", action="store_true", help="continue an interrupted search (Tuner.restore)")
    t.set_defaults(func=cmd_tune)
