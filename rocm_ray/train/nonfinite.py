"""Non-finite steps: a NaN/inf reward, reward gradient, divergence, loss or parameter gradient skips the step.

A skipped step changes nothing: no optimizer step (weights and optimizer state as before), gradients
zeroed. It is counted and logged: its metrics row has ``skipped = 1`` and NaN where nothing finite was
measured, and every row carries ``nonfinite_steps``, the number skipped so far. After
``train.max_nonfinite_steps`` skipped steps in a row the run stops with a :class:`NonFiniteError` that
says what to change, after saving the last good state (in-process: ``<output_dir>/last_good/``; Ray:
a Ray Train checkpoint, ``--resume`` continues from it).

Data parallel: the workers decide together. :func:`guarded_step` runs :func:`rocm_step` with a backward that
first agrees with the other ranks (one all-reduce of a "finite" flag); a rank that found a non-finite
reward or loss joins that agreement with "no", so every rank skips the same steps and no rank waits in a
gradient all-reduce the others never enter. The gradient norm is global (all-reduced), the same on every rank.

In the Ray path a stop is not a failure: the workers save the checkpoint, report ``nonfinite_stop = 1``
and return, so Ray Train's ``FailureConfig`` never retries a run that would diverge again; the driver
raises the :class:`NonFiniteError`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from torch import Tensor

from rocm_ray.train.step import NonFiniteError

#: metrics columns this module adds to every row
SKIPPED, NONFINITE_STEPS = "skipped", "nonfinite_steps"
#: the last report's metric that tells the Ray driver the workers stopped on non-finite steps
STOP_METRIC = "nonfinite_stop"
STOP_STATE_KEY = "nonfinite_stop"


class _OtherRankNonFinite(Exception):
    """Raised inside the backward of a rank whose own step was finite when another rank's was not."""


def guarded_step(step_fn: Callable[[Callable[[Tensor], None]], Any], backward: Callable[[Tensor], None],
                 agree: Callable[[bool], bool] = lambda ok: ok) -> tuple[Any | None, str | None]:
    """Run ``step_fn(backward)`` (a :func:`rocm_step`) unless some rank's step is non-finite.

    Returns ``(result, None)`` when the step was backpropagated, ``(None, reason)`` when it is skipped
    (nothing was backpropagated on any rank). ``agree(ok)`` is a collective over the ranks: True iff all
    were ok (in one process: ``ok`` itself).
    """
    agreed = [False]

    def together(t: Tensor) -> None:
        agreed[0] = True
        if not agree(True):
            raise _OtherRankNonFinite
        backward(t)

    try:
        return step_fn(together), None
    except NonFiniteError as e:
        # raised before this (micro-)batch's backward, where the other ranks wait in ``agree``: tell them,
        # whether or not an earlier micro-batch of the step was already backpropagated
        agree(False)
        return None, str(e)
    except _OtherRankNonFinite:
        return None, "another worker's reward, divergence or loss was non-finite"


def all_ranks_agree(device: Any, world: int) -> Callable[[bool], bool]:
    """``agree(ok)`` over the default process group: True iff every rank passed True."""
    if world <= 1:
        return lambda ok: ok
    import torch
    import torch.distributed as dist

    def agree(ok: bool) -> bool:
        flag = torch.tensor([1.0 if ok else 0.0], device=device)  # [1]
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item() > 0)

    return agree


class NonFiniteGuard:
    """Counts skipped steps (in a row and in all) and knows when to stop."""

    def __init__(self, max_in_a_row: int, skipped_before: int = 0):
        self.max_in_a_row = max_in_a_row
        self.in_a_row = 0
        self.skipped = skipped_before
        self.last_reason = ""

    @classmethod
    def from_rows(cls, max_in_a_row: int, rows: list[dict]) -> NonFiniteGuard:
        """A guard that continues the count of a resumed run's metrics rows."""
        guard = cls(max_in_a_row, int(rows[-1].get(NONFINITE_STEPS, 0)) if rows else 0)
        for r in reversed(rows):
            if not r.get(SKIPPED):
                break
            guard.in_a_row += 1
        return guard

    def skip(self, step: int, reason: str) -> None:
        self.in_a_row += 1
        self.skipped += 1
        self.last_reason = reason
        print(f"rocm-ray: step {step} skipped: {reason} ({self.in_a_row} in a row, {self.skipped} in all; "
              f"stop after {self.max_in_a_row} in a row: train.max_nonfinite_steps)", flush=True)

    def ok(self) -> None:
        self.in_a_row = 0

    @property
    def exhausted(self) -> bool:
        return self.in_a_row >= self.max_in_a_row

    def annotate(self, row: dict, skipped: bool) -> dict:
        """Add the two metrics columns to ``row`` (in place) and return it."""
        row[SKIPPED] = 1 if skipped else 0
        row[NONFINITE_STEPS] = self.skipped
        return row

    def stop_error(self, step: int, saved: str) -> NonFiniteError:
        return NonFiniteError(
            f"{self.in_a_row} non-finite steps in a row (train.max_nonfinite_steps = {self.max_in_a_row}), the "
            f"last at step {step}: {self.last_reason}. The last good state (step {step - self.in_a_row}) is "
            f"saved in {saved}. Lower train.lr or algorithm.beta, set train.max_grad_norm, or use "
            "algorithm.reduction=mean, then resume or restart")


def skipped_row(step: int, template: dict | None, res: Any | None, grad_norm: float, dt: float, batch: int,
                lr: float) -> dict:
    """The metrics row of a skipped step: what was measured (if anything), NaN elsewhere."""
    nan = float("nan")
    row = {k: nan for k in (template or {})}
    row.update(step=step, loss=nan, reward=nan, divergence=nan, grad_norm=grad_norm, images_per_s=batch / dt,
               it_per_s=1.0 / dt, lr=lr)
    if res is not None:
        row.update(loss=res.loss.loss, reward=res.loss.reward, divergence=res.loss.divergence)
        for i, d in enumerate(res.loss.step_divergences):
            row[f"div_step_{i + 1}"] = d
    return row


def finite(x: float | Tensor) -> bool:
    return math.isfinite(float(x))


def save_last_good(policy: Any, out_dir: Any, step: int, reason: str) -> str:
    """In-process stop: the trainable weights as they are (the last good state) in ``<out_dir>/last_good/``."""
    import json
    from pathlib import Path

    from rocm_ray.models.policy import save_policy_weights

    d = Path(out_dir) / "last_good"
    save_policy_weights(policy, d)
    (d / "state.json").write_text(json.dumps({"step": step, STOP_STATE_KEY: reason}))
    return str(d)


def stop_on_nonfinite(guard: NonFiniteGuard, step: int, reason: str, engine: Any, rows: list[dict],
                      timing: list[dict], t0: float, row: dict, save_and_report: Callable, world: int,
                      checkpoint: bool) -> bool:
    """Ray worker: log and report a skipped step; True when the run must stop (then the checkpoint is saved).

    The stop checkpoint holds the last good state under ``step = last good step`` (``--resume`` continues
    from there) and, under ``nonfinite_stop``, the message and the skipped rows.
    """
    import time

    import ray.train

    if engine.zero_optimization_stage() == 0:
        engine.zero_grad()  # ZeRO 1-3 cleared their (partitioned) gradients on the skipped update
    guard.skip(step, reason)
    rows.append(guard.annotate(row, skipped=True))
    dt = time.perf_counter() - t0
    timing.append({"step": step, "compute_s": dt, "reward_s": 0.0, "total_s": dt})
    metrics = {**row, "world_size": world}
    if not guard.exhausted:
        if checkpoint:  # a checkpoint step (or the last step) skipped: its checkpoint is still written
            save_and_report(step, metrics)
        else:
            ray.train.report(metrics)
        return False
    last_good = step - guard.in_a_row
    kept = [r for r in rows if r["step"] <= last_good]
    stop = {"message": str(guard.stop_error(step, "{saved}")), "at_step": step, "rows": rows[len(kept):]}
    save_and_report(step, {**metrics, STOP_METRIC: 1}, {"step": last_good, "metrics": kept, STOP_STATE_KEY: stop})
    return True


def raise_if_stopped(result: Any) -> None:
    """Ray driver: if the workers stopped on non-finite steps, raise the :class:`NonFiniteError` naming the
    checkpoint that holds the last good state (rank 0 wrote every row, the skipped ones too, to
    ``metrics.csv`` as it went)."""
    if not (result.metrics or {}).get(STOP_METRIC) or result.checkpoint is None:
        return
    from rocm_ray.train.ray_worker import read_state

    with result.checkpoint.as_directory() as d:
        state = read_state(d) or {}
    stop = state.get(STOP_STATE_KEY) or {"message": "non-finite steps ({saved})", "rows": []}
    raise NonFiniteError(stop["message"].replace("{saved}", f"{result.checkpoint.path} (--resume continues from it)"))


#: what :func:`inject_nonfinite` corrupts (tests and the docs' fault table)
INJECT_KINDS = ("reward", "reward_grad", "gradient")


def _checked_kinds(at: dict) -> dict[int, str]:
    bad = {int(k): v for k, v in at.items()}
    for kind in bad.values():
        if kind not in INJECT_KINDS:
            raise ValueError(f"inject_nonfinite: unknown kind {kind!r}; one of {INJECT_KINDS}")
    return bad


def _corrupt(kind: str | None, r: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
    if kind == "reward":
        r = r.clone()
        r[0] = float("nan")
    elif kind == "reward_grad":
        g = g.clone()
        g[0, 0, 0, 0] = float("inf")
    elif kind == "gradient":
        g = g.sign().add(0.5).sign() * 3e38  # [B, 3, H, W], finite
    return r, g


def inject_nonfinite(reward_fn: Callable, at: dict[int, str], current_step: Callable[[], int]) -> Callable:
    """Test hook: ``reward_fn`` returning a NaN reward (``reward``), an inf reward gradient (``reward_grad``)
    or a finite reward gradient so large (3e38) that the parameter gradients overflow (``gradient``) at the
    steps in ``at``."""
    bad = _checked_kinds(at)

    def fn(images: Tensor, prompts: list[str]):
        r, g, parts = reward_fn(images, prompts)
        r, g = _corrupt(bad.get(current_step()), r, g)
        return r, g, parts

    return fn


class InjectedReward:
    """:func:`inject_nonfinite` for a reward with ``submit(images, prompts) -> pending`` and
    ``pending.result() -> (r, g, parts)`` (the Ray workers' remote or colocated reward)."""

    def __init__(self, reward: Any, at: dict[int, str], current_step: Callable[[], int]):
        self._reward, self._bad, self._step = reward, _checked_kinds(at), current_step

    def submit(self, images: Tensor, prompts: list[str], **kw: Any) -> _InjectedPending:
        return _InjectedPending(self._reward.submit(images, prompts, **kw), self._bad.get(self._step()))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._reward, name)


class _InjectedPending:
    def __init__(self, pending: Any, kind: str | None):
        self._pending, self._kind = pending, kind

    def result(self) -> tuple[Tensor, Tensor, Any]:
        r, g, parts = self._pending.result()
        r, g = _corrupt(self._kind, r, g) if g is not None or self._kind == "reward" else (r, g)
        return r, g, parts
