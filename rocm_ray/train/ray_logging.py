"""Log hygiene for Ray processes (imported by every Ray worker process, so it stays import-light)."""

from __future__ import annotations

import logging
import os

SETUP_HOOK = "rocm_ray.train.ray_logging.quiet_worker"


def quiet_worker() -> None:
    """Ray ``worker_process_setup_hook``: silence Ray Train V2's placement-group cleaner and, unless
    ``ROCM_RAY_VERBOSE=1``, third-party library warnings and loading bars (:func:`quiet_libraries`).

    The cleaner polls the Ray state API every second; on a Ray started without the dashboard, or on a
    machine running several Ray instances, that API is unavailable and it warns every second. Its own
    job (removing a dead controller's placement group) is unaffected.
    """
    logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner").setLevel(logging.ERROR)
    from rocm_ray.train.progress import quiet_libraries

    if quiet_libraries():  # no library warnings / loading bars in the job log unless ROCM_RAY_VERBOSE=1
        quiet_train_reports()


# Ray Train V2 INFO lines printed on every report ("Reporting training result N: TrainingReport(...)", the
# whole metrics dict, per worker) and checkpoint; the first logger is named after its file's path.
_REPORT_LOGGERS = ("train/v2/_internal/execution/context.py", "ray.train.v2._internal.execution.storage",
                   "ray.train._internal.storage")


def quiet_train_reports() -> None:
    """Drop Ray Train's per-report INFO lines (rocm_ray prints its own progress line per step)."""
    import ray

    root = os.path.dirname(ray.__file__)
    for name in _REPORT_LOGGERS:
        logging.getLogger(os.path.join(root, name) if name.endswith(".py") else name).setLevel(logging.WARNING)


# Ray Train V2 controller polls the workers every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (default: 2 s), and
# a worker's ray.train.report blocks until the controller has taken its previous report (a queue of one):
# reporting every step would make every step shorter than the interval last the interval (measured: a
# 0.2 s tiny step took 2.0 s). 0.1 s keeps the per-step report nearly free for the polling cost of
# 10 cheap calls per second per worker.
POLL_INTERVAL_S = "0.1"


def quiet_ray_train() -> None:
    """Ray Train V2 settings, set in the driver before the TorchTrainer is built (Ray Train propagates them
    to its processes); values already in the environment win: plain ``print`` (the print patch doubles every
    line on the driver) and a 0.1 s controller poll (per-step reports stay cheap, see POLL_INTERVAL_S)."""
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", POLL_INTERVAL_S)
