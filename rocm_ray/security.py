"""Safety defaults of the Ray that rocm_ray starts itself (``rocm-ray train`` / ``tune`` without an address).

Two settings, applied to this process's environment (Ray's processes inherit it) just before ``ray.init``:

- Loopback only: ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``. Without it Ray 2.60 rewrites the node address
  127.0.0.1 to the machine's external IP, and its agents follow: the runtime-env agent listens on the
  external IP, the metrics exporter on 0.0.0.0, the GCS, raylet and every worker's gRPC server on ``::``.
  With it, every one of them listens on 127.0.0.1 (``tests/test_safety.py`` lists them and probes them).
- Token authentication on, with a token of this process: ``RAY_AUTH_MODE=token`` and a fresh random
  ``RAY_AUTH_TOKEN``, never written to disk. A plain local ``ray.init()`` would turn token mode on and
  write ``~/.ray/auth_token`` into the user's home, after which a ``ray start --head`` on the same
  machine silently requires that token. Loopback is still reachable by other users of a shared machine,
  so the token stays on. A user's own ``RAY_AUTH_MODE`` / ``RAY_AUTH_TOKEN`` / ``RAY_AUTH_TOKEN_PATH`` win.

:func:`restore_env` undoes both when that Ray is stopped (``stop_local_ray``), so a later connection to a
real cluster uses the user's own settings.
"""

from __future__ import annotations

import os
import secrets

LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
AUTH_VARS = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")

_saved: dict = {}  # variable -> value before apply_local_ray_env (None: unset)


def local_ray_env() -> dict[str, str]:
    """The variables a loopback-only, token-protected local Ray needs that are not set already."""
    env = {LOOPBACK_ENV: "0"}
    if not any(v in os.environ for v in AUTH_VARS):
        env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32))
    return {k: v for k, v in env.items() if os.environ.get(k) != v}


def apply_local_ray_env() -> None:
    """Set :func:`local_ray_env` in ``os.environ`` (and Ray's cached loopback switch) before a local ``ray.init``."""
    for k, v in local_ray_env().items():
        _saved.setdefault(k, os.environ.get(k))
        os.environ[k] = v
    try:  # read once at import: a Ray imported before this call needs the constant too
        import ray._private.ray_constants as rc

        _saved.setdefault("_ENABLE_RAY_CLUSTER", rc.ENABLE_RAY_CLUSTER)
        rc.ENABLE_RAY_CLUSTER = False
    except (ImportError, AttributeError):  # pragma: no cover - another Ray version
        pass
    _reload_ray_auth()


def _reload_ray_auth() -> None:
    """Make this process's Ray (C++ config and token cache, read once) see the current auth variables."""
    try:
        from ray._raylet import AuthenticationTokenLoader, Config
    except ImportError:  # pragma: no cover - another Ray version
        return
    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


def restore_env() -> None:
    """Undo :func:`apply_local_ray_env` (after the local Ray stopped)."""
    cluster = _saved.pop("_ENABLE_RAY_CLUSTER", None)
    if cluster is not None:
        import ray._private.ray_constants as rc

        rc.ENABLE_RAY_CLUSTER = cluster
    for k, v in _saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    if _saved:
        _saved.clear()
        _reload_ray_auth()
