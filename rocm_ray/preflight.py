"""Checks that run before a training run writes anything or starts Ray: bad input fails in seconds, not later.

- :func:`check_model`: ``model.pretrained`` is a loadable LCM pipeline (a folder with ``model_index.json``,
  an LCMScheduler, a UNet with a guidance embedding), read from its JSON configs only (no weights loaded).
- :func:`check_cluster_fits`: the Ray Train workers and the reward replicas fit the Ray cluster (pre-flight
  against ``ray.cluster_resources()``), with a message naming the recipe keys and what the cluster has.

Every failure is a :class:`~rocm_ray.config.RecipeError` (exit code 2 at the CLI) naming the recipe file and key.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from rocm_ray.config import Recipe, RecipeError

#: the pipeline components ROCM uses (model_index.json entries that must be present and not null)
LCM_COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
_FIX = ("point model.pretrained at a diffusers LatentConsistencyModelPipeline folder (written by "
        "save_pretrained, e.g. rocm_ray/assets/tiny/lcm) or a Hugging Face id of one in the cache, e.g. "
        "SimianLuo/LCM_Dreamshaper_v7")


def _read_json(path: Path, source: str, key: str) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RecipeError(source, key, f"cannot read {path}: {e}; {_FIX}") from None
    if not isinstance(data, dict):
        raise RecipeError(source, key, f"{path} is not a JSON object; {_FIX}")
    return data


def check_pipeline_folder(folder: Path, source: str, key: str = "model.pretrained") -> None:
    """Raise a :class:`RecipeError` unless ``folder`` holds an LCM pipeline ROCM can train."""
    if not folder.is_dir():
        raise RecipeError(source, key, f"{folder} is a file, not a pipeline folder; {_FIX}")
    index_file = folder / "model_index.json"
    if not index_file.is_file():
        raise RecipeError(source, key, f"{folder} is not a diffusers pipeline folder (no model_index.json); {_FIX}")
    index = _read_json(index_file, source, key)
    missing = [c for c in LCM_COMPONENTS if not (isinstance(index.get(c), list) and index[c][-1])]
    sched_file = folder / "scheduler" / "scheduler_config.json"
    sched = _read_json(sched_file, source, key).get("_class_name") if sched_file.is_file() else None
    if missing or sched != "LCMScheduler":
        what = index.get("_class_name", "unknown pipeline")
        why = f"it lacks {', '.join(missing)}" if missing else f"its scheduler is {sched or 'missing'}"
        raise RecipeError(source, key, f"{folder} is not a latent consistency model pipeline ({what}: {why}; "
                          f"ROCM needs {', '.join(LCM_COMPONENTS)} with an LCMScheduler); {_FIX}")
    unet_cfg = folder / "unet" / "config.json"
    if not unet_cfg.is_file():
        raise RecipeError(source, key, f"{folder}/unet has no config.json; {_FIX}")
    if _read_json(unet_cfg, source, key).get("time_cond_proj_dim") is None:
        raise RecipeError(source, key, f"the UNet in {folder} has no guidance embedding (unet/config.json "
                          "time_cond_proj_dim is null), so algorithm.guidance_scale would be silently ignored; "
                          "use an LCM distilled with a guidance embedding, e.g. SimianLuo/LCM_Dreamshaper_v7")


def _hub_snapshot(repo_id: str, revision: str | None, cache_dir: str | None) -> Path | None:
    """The cached snapshot folder of a Hugging Face repo (its model_index.json), or None if not cached."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - a dependency of diffusers
        return None
    found = try_to_load_from_cache(repo_id, "model_index.json", cache_dir=cache_dir, revision=revision)
    return Path(found).parent if isinstance(found, str) else None


def check_model(recipe: Recipe) -> None:
    """``model.pretrained`` names an LCM pipeline that exists here (``random:`` toy pipelines always do)."""
    from rocm_ray.paths import EMBEDDED_PREFIX, resolve_path

    m, src, key = recipe.model, recipe.source, "model.pretrained"
    spec = m.pretrained
    if spec.startswith("random:"):
        if not spec[len("random:"):].strip().isdigit() and spec != "random:":
            raise RecipeError(src, key, f"random:<seed> takes an integer seed, got {spec!r}")
        return
    path = Path(resolve_path(spec)).expanduser()
    if path.exists():
        check_pipeline_folder(path, src, key)
        return
    if spec.startswith(EMBEDDED_PREFIX):
        raise RecipeError(src, key, f"embedded model {spec!r} is not in this installation ({path} is missing): "
                          "rebuild it with `rocm-ray build-tiny` or reinstall rocm_ray from a clone with "
                          "rocm_ray/assets/")
    if _REPO_ID.match(spec) and not spec.startswith((".", "/", "~")):
        snapshot = _hub_snapshot(spec, m.revision, m.cache_dir)
        offline = os.environ.get("HF_HUB_OFFLINE", "0") in ("1", "true", "True", "yes")
        complete = snapshot is not None and (snapshot / "unet" / "config.json").is_file() and \
            (snapshot / "scheduler" / "scheduler_config.json").is_file()
        if snapshot is not None and (complete or offline):  # online, a partial cache is completed by diffusers
            check_pipeline_folder(snapshot, src, key)
            return
        if offline:
            raise RecipeError(src, key, f"{spec!r} is not in the Hugging Face cache (model.cache_dir: "
                              f"{m.cache_dir or 'the default'}) and HF_HUB_OFFLINE is set; download it once with "
                              f"`huggingface-cli download {spec}` or give a local folder")
        return  # diffusers downloads it
    raise RecipeError(src, key, f"no such folder: {path}; {_FIX}")


# --------------------------------------------------------------------------------------------- resources


def requested_resources(recipe: Recipe) -> list[tuple[str, str, float]]:
    """``(resource, recipe keys, amount)`` the run needs at once: the Ray Train workers and the reward replicas.

    Ray Train also places a controller (0 CPUs in Ray Train V2), so only workers and replicas count.
    """
    t, r = recipe.train, recipe.ray
    need: list[tuple[str, str, float]] = []
    workers = t.num_workers
    replicas = r.reward_replicas if r.reward_placement == "remote" else 0  # colocated: no replicas
    wkeys, rkeys = "train.num_workers x ray.cpus_per_worker", "ray.reward_replicas x ray.reward_num_cpus"
    if workers * r.cpus_per_worker + replicas * r.reward_num_cpus > 0:
        need.append(("CPU", f"{wkeys} + {rkeys}", workers * r.cpus_per_worker + replicas * r.reward_num_cpus))
    gpus = (workers if t.use_gpu else 0) + replicas * r.reward_num_gpus
    if gpus > 0:
        need.append(("GPU", "train.num_workers (train.use_gpu: true) + ray.reward_replicas x ray.reward_num_gpus",
                     gpus))
    custom: dict[str, list] = {}
    for name, amount in r.worker_resources.items():
        custom.setdefault(name, [0.0, []])
        custom[name][0] += workers * amount
        custom[name][1].append(f"train.num_workers x ray.worker_resources.{name}")
    for name, amount in r.reward_resources.items():
        custom.setdefault(name, [0.0, []])
        custom[name][0] += replicas * amount
        custom[name][1].append(f"ray.reward_replicas x ray.reward_resources.{name}")
    need += [(name, " + ".join(keys), amount) for name, (amount, keys) in custom.items() if amount > 0]
    return need


def _per_node_fit(recipe: Recipe, nodes: list[dict]) -> str | None:
    """Why one worker or one replica fits on no single node (None: each fits somewhere)."""
    t, r = recipe.train, recipe.ray
    worker = {"CPU": r.cpus_per_worker, "GPU": 1.0 if t.use_gpu else 0.0, **r.worker_resources}
    replica = {"CPU": r.reward_num_cpus, "GPU": r.reward_num_gpus, **r.reward_resources}
    asks = [("a train worker", "ray.cpus_per_worker / train.use_gpu / ray.worker_resources", worker)]
    if r.reward_placement == "remote":
        asks.append(("a reward replica", "ray.reward_num_cpus / ray.reward_num_gpus / ray.reward_resources",
                     replica))
    for what, keys, ask in asks:
        ask = {k: v for k, v in ask.items() if v > 0}
        if not any(all(n.get(k, 0.0) >= v for k, v in ask.items()) for n in nodes):
            return f"no node can hold {what} ({_fmt(ask)}, from {keys})"
    return None


def _fmt(res: dict[str, float]) -> str:
    return ", ".join(f"{k}: {v:g}" for k, v in sorted(res.items())) or "nothing"


def autoscaler_max_resources() -> dict[str, float] | None:
    """The most resources the cluster's autoscaler may bring up (None: a fixed cluster, no autoscaler config)."""
    try:
        from ray._private.state import state

        found = state.get_max_resources_from_cluster_config()
    except Exception:  # noqa: BLE001 - a private API: absent or changed means "no autoscaler known"
        return None
    return {k: float(v) for k, v in found.items()} if found else None


def _useful(res: dict[str, float]) -> dict[str, float]:
    """The resources a recipe can ask for (no node ids, memory, or placement-group bundles)."""
    return {k: v for k, v in res.items()
            if not k.startswith(("node:", "memory", "object_store_memory", "accelerator_type", "bundle_group"))
            and "_group_" not in k}


def check_cluster_fits(recipe: Recipe, total: dict[str, float] | None = None,
                       nodes: list[dict[str, float]] | None = None) -> None:
    """Raise a :class:`RecipeError` if the run's workers and reward replicas cannot all be placed on the cluster.

    ``total`` defaults to ``ray.cluster_resources()`` (or, with an autoscaler, the most it may bring up) and
    ``nodes`` to each alive node's resources; a Ray that cannot hold the run would otherwise retry the
    placement forever (seen: > 400 s, still going).
    """
    import ray

    scaled = None
    if total is None:
        scaled = autoscaler_max_resources()
        total = scaled or {k: float(v) for k, v in ray.cluster_resources().items()}
    if nodes is None:
        nodes = [{k: float(v) for k, v in n.get("Resources", {}).items()} for n in ray.nodes() if n.get("Alive")]
    have = _useful(total)
    short = []
    for res, keys, amount in requested_resources(recipe):
        avail = total.get(res, 0.0)
        if amount > avail + 1e-9:
            short.append(f"{amount:g} {res} ({keys})" + ("" if res in total else f": the cluster has no '{res}' "
                                                                                 "resource at all"))
    why = f"it asks for {'; '.join(short)}" if short else (None if scaled else _per_node_fit(recipe, nodes))
    if why:
        where = "at most (autoscaler)" if scaled else f"on {len(nodes)} node(s)"
        raise RecipeError(recipe.source, "ray", f"the run does not fit the Ray cluster: {why}. The cluster has "
                          f"{_fmt(have)} {where}. Lower train.num_workers / ray.reward_replicas / "
                          "the per-worker and per-replica resources, or add nodes that advertise them "
                          "(custom resources: `ray start --resources='{\"reward\": 1}'`)")


def describe_cluster() -> str:
    """The resources of the connected Ray cluster, in one line (for timeout messages)."""
    import ray

    total = _useful({k: float(v) for k, v in ray.cluster_resources().items()})
    return f"{_fmt(total)} on {sum(1 for n in ray.nodes() if n.get('Alive'))} node(s)"


# --------------------------------------------------------------------------------------------- bounded waits

#: seconds Ray Train waits for its workers' placement group before giving up (Ray's own default: 60)
PLACEMENT_WAIT_S = 20.0
#: placement retries of Ray Train's controller with an autoscaler (new nodes take minutes); none without one
AUTOSCALER_PLACEMENT_RETRIES = 10
_START_TIMEOUT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"


class PlacementTimeoutError(TimeoutError):
    """The Ray Train workers could not be placed in the bounded wait (the message names the recipe keys)."""


#: at most this many worker-group start-up retries without an autoscaler (``train.max_failures`` below it)
FIXED_CLUSTER_PLACEMENT_RETRIES = 2


def placement_retries(recipe: Recipe) -> int:
    """``FailureConfig.controller_failure_limit``: Ray's default (-1) retries an unplaceable worker group forever.

    With an autoscaler: :data:`AUTOSCALER_PLACEMENT_RETRIES` (new nodes take minutes); on a fixed cluster
    ``train.max_failures`` (a start-up can fail for a transient reason too), at most
    :data:`FIXED_CLUSTER_PLACEMENT_RETRIES`.
    """
    if autoscaler_max_resources():
        return AUTOSCALER_PLACEMENT_RETRIES
    return min(max(recipe.train.max_failures, 0), FIXED_CLUSTER_PLACEMENT_RETRIES)


def bounded_placement(recipe: Recipe) -> None:
    """Pre-flight resource check plus a bounded placement wait for the Ray Train workers of this run.

    Needs a connected Ray. The wait is Ray Train's ``RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S`` (propagated from
    this driver to the Train controller); a value the user set is kept.
    """
    check_cluster_fits(recipe)
    os.environ.setdefault(_START_TIMEOUT_ENV, str(PLACEMENT_WAIT_S))


def raise_if_placement_timeout(recipe: Recipe, err: BaseException) -> None:
    """Re-raise a Ray Train worker-group start-up timeout behind ``err`` as a :class:`PlacementTimeoutError`."""
    seen, todo = set(), [err]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if type(e).__name__ == "WorkerGroupStartupTimeoutError":
            wait = os.environ.get(_START_TIMEOUT_ENV, str(PLACEMENT_WAIT_S))
            raise PlacementTimeoutError(
                f"{recipe.source}: train.num_workers / ray.cpus_per_worker / ray.worker_resources: the "
                f"{recipe.train.num_workers} Ray Train worker(s) could not be placed within {float(wait):.0f} s: "
                f"the cluster has {describe_cluster()}, but other jobs or actors hold part of it; wait for them, "
                f"lower the recipe's demands, or raise {_START_TIMEOUT_ENV}") from err
        todo += [e.__cause__, e.__context__, getattr(e, "controller_failure", None),
                 *getattr(e, "worker_failures", {}).values()]


# --------------------------------------------------------------------------------------------- reward node lost

#: seconds a reward replica may stay unplaceable (its node gone, no other node with its resources) before the run
#: is stopped; a node coming back (or the autoscaler adding one) within this time lets Ray place it again
REPLICA_LOST_GRACE_S = 20.0


def replica_demand(recipe: Recipe) -> dict[str, float]:
    r = recipe.ray
    return {k: v for k, v in {"CPU": r.reward_num_cpus, "GPU": r.reward_num_gpus, **r.reward_resources}.items()
            if v > 0}


class ReplicaWatch:
    """Driver-side watch of the reward replicas while Ray Train runs (a daemon thread, polling every 2 s).

    Ray restarts a replica whose node died (``ray.max_restarts``) on any node that has its resources; when no
    alive node has them (the only ``reward`` node was removed) the restart would wait forever, and so would
    the train workers' calls. After :data:`REPLICA_LOST_GRACE_S` of that, the watch records why and ends the
    replicas (no restart), so the workers' calls fail at once and the run stops; ``train_ray`` then raises
    :class:`~rocm_ray.rewards.base.RewardServiceUnavailable` with :attr:`reason`.
    """

    def __init__(self, recipe: Recipe, actors: list, grace_s: float = REPLICA_LOST_GRACE_S, poll_s: float = 2.0):
        import threading

        self.recipe, self.actors, self.grace_s, self.poll_s = recipe, list(actors), grace_s, poll_s
        self.demand = replica_demand(recipe)
        self.reason: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rocm-ray-replica-watch", daemon=True)

    def __enter__(self) -> ReplicaWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=2 * self.poll_s)

    def _message(self, how_long: str) -> str:
        keys = ", ".join(f"{k}: {v:g}" for k, v in sorted(self.demand.items()))
        return (f"{self.recipe.source}: ray.reward_resources / ray.reward_num_cpus / ray.reward_num_gpus: the reward "
                f"replicas lost their node and no alive node offers what one asks for ({keys}) {how_long}; the "
                f"cluster now has {describe_cluster()}. Add a node with these resources (e.g. `ray start "
                "--resources='{\"reward\": 1}'`) and resume with --resume")

    def why_failed(self) -> str | None:
        """After a failed run: the reason if the replicas were, or are now, impossible to place; else None."""
        try:
            return self.reason or (None if self.placeable() else self._message("now"))
        except Exception:  # noqa: BLE001 - no cluster to ask
            return self.reason

    def placeable(self) -> bool:
        """Whether some alive node has the resources one replica asks for."""
        import ray

        nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
        return any(all(n.get(k, 0.0) >= v for k, v in self.demand.items()) for n in nodes)

    def _run(self) -> None:
        import time

        import ray

        since: float | None = None
        while not self._stop.wait(self.poll_s):
            try:
                ok = self.placeable()
            except Exception:  # noqa: BLE001 - the GCS is busy or going away: look again later
                continue
            if ok:
                since = None
                continue
            since = since if since is not None else time.monotonic()
            if time.monotonic() - since >= self.grace_s:
                self.reason = self._message(f"for {self.grace_s:.0f} s")
                print(f"rocm-ray: {self.reason}", flush=True)
                for a in self.actors:
                    try:
                        ray.kill(a, no_restart=True)
                    except Exception:  # noqa: BLE001 - already gone
                        pass
                return
