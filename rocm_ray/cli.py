"""``rocm-ray``: the command line.

    rocm-ray train RECIPE [key=value ...] [--resume | --force] [--verbose]
    rocm-ray keys                         every recipe key, its type, default and meaning
    rocm-ray check RECIPE [key=value ...] validate a recipe and print it resolved
    rocm-ray build-tiny --out DIR         rebuild the embedded tiny world from scikit-learn's digits

Bad input (a recipe error, a missing model or reward file) prints one clear ``error:`` line and exits
with code 2; a run that diverges (NaN/inf) exits with code 1. Bugs still show their traceback.
"""

from __future__ import annotations

import argparse
import os
import sys

EXIT_BAD_INPUT = 2


def _fail(msg: str, code: int = EXIT_BAD_INPUT) -> int:
    print(f"error: {msg}", file=sys.stderr, flush=True)
    return code


def _load(args) -> object:
    from rocm_ray.config import load_recipe

    return load_recipe(args.recipe, args.overrides)


def cmd_train(args) -> int:
    from rocm_ray.preflight import check_model

    recipe = _load(args)
    check_model(recipe)  # before anything is written or Ray starts
    uses_ray = recipe.train.num_workers >= 1
    if uses_ray:
        from rocm_ray.train.ray_trainer import train_ray

        train_ray(recipe, resume=args.resume, force=args.force)
    else:
        from rocm_ray.train.inprocess import train_inprocess

        train_inprocess(recipe, resume=args.resume, force=args.force)
    return 0


def cmd_check(args) -> int:
    import json

    recipe = _load(args)
    print(json.dumps(recipe.to_dict(), indent=2))
    return 0


def cmd_keys(args) -> int:
    from rocm_ray.config import describe

    print("\n".join(describe()))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rocm-ray", description="RLHF for consistency models with regularized ROCM")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="fine-tune an LCM with ROCM (in-process, or Ray Train if train.num_workers>=1)")
    t.add_argument("recipe", help="recipes/<name>.yaml")
    t.add_argument("overrides", nargs="*", help="key.path=value overrides, e.g. algorithm.beta=0.1")
    t.add_argument("--resume", action="store_true", help="resume from the run's latest complete checkpoint")
    t.add_argument("--force", action="store_true", help="replace (delete) an existing run at train.output_dir")
    t.add_argument("--verbose", action="store_true", help="show library warnings, INFO logs and loading bars")
    t.set_defaults(func=cmd_train)

    c = sub.add_parser("check", help="validate a recipe and print it with overrides applied")
    c.add_argument("recipe")
    c.add_argument("overrides", nargs="*")
    c.set_defaults(func=cmd_check)

    k = sub.add_parser("keys", help="list every recipe key with its type, default and meaning")
    k.set_defaults(func=cmd_keys)

    # handled in main() before parsing; listed here for --help
    sub.add_parser("build-tiny", help="rebuild the embedded tiny world (see rocm-ray build-tiny --help)")

    for register in _extra_commands():
        register(sub)
    return p


def _extra_commands():
    """Subcommands that live in their own modules (each exposes ``register(subparsers)``)."""
    import importlib

    out = []
    for mod in ("rocm_ray.tune", "rocm_ray.use", "rocm_ray.export", "rocm_ray.cluster"):
        try:
            m = importlib.import_module(mod)
        except ImportError:
            continue
        if hasattr(m, "register_cli"):
            out.append(m.register_cli)
    return out


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["build-tiny"]:  # its own argument parser (python -m rocm_ray.models.tiny_world)
        from rocm_ray.models.tiny_world import main as build_main

        return build_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    from rocm_ray._quiet import quiet_library_warnings
    from rocm_ray.train.progress import quiet_libraries, set_verbose

    if getattr(args, "verbose", False):
        set_verbose(True)
    quiet_libraries()  # unless --verbose: no library warnings / loading bars (train/progress.py)
    quiet_library_warnings()
    from rocm_ray.config import RecipeError
    from rocm_ray.models.policy import ModelLoadError
    from rocm_ray.preflight import PlacementTimeoutError
    from rocm_ray.train.step import NonFiniteError

    bad_input: tuple[type[BaseException], ...] = (RecipeError, ModelLoadError, PlacementTimeoutError)
    try:
        from rocm_ray.rewards.base import RewardModelLoadError, RewardModelNotFoundError, RewardServiceUnavailable

        bad_input += (RewardModelNotFoundError, RewardModelLoadError, RewardServiceUnavailable)
    except ImportError:
        pass
    try:
        from rocm_ray.use import UseError

        bad_input += (UseError,)
    except ImportError:
        pass
    from rocm_ray.cluster import ClusterError

    bad_input += (ClusterError,)

    try:
        return int(args.func(args) or 0)
    except bad_input as e:
        return _fail(str(e))
    except NonFiniteError as e:
        return _fail(f"training diverged: {e}", code=1)
    except Exception as e:  # the RewardService gave up (replicas dead, restarts exhausted, a hung replica)
        service = sys.modules.get("rocm_ray.rewards.service")  # only loaded by runs that use it
        if service is not None and isinstance(e, service.RewardServiceError):
            return _fail(f"the run stopped: {e}", code=1)
        raise
    except KeyboardInterrupt:
        return _fail("interrupted", code=130)
    except BrokenPipeError:  # output piped into head & co.
        return 0


if __name__ == "__main__":
    sys.exit(main())
