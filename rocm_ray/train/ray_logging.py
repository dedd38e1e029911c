"""Log hygiene for Ray processes (imported by every Ray worker process, so it stays import-light)."""

from __future__ import annotations

import logging
import os

SETUP_HOOK = "rocm_ray.train.ray_logging.quiet_worker"


def quiet_worker() -> None:
    """Ray ``worker_process_setup_hook``: silence Ray Train V2's placement-group cleaner.

    The cleaner polls the Ray state API every second; on a Ray started without the dashboard, or on a
    machine running several Ray instances, that API is unavailable and it warns every second. Its own
    job (removing a dead controller's placement group) is unaffected.
    """
    logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner").setLevel(logging.ERROR)


def quiet_ray_train() -> None:
    """Ray Train V2 settings for readable logs, set in the driver before the TorchTrainer is built (Ray Train
    propagates them to its processes): plain ``print`` (its print patch doubles every line on the driver)."""
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
