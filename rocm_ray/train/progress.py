"""The run log: quiet libraries, a live progress bar on a terminal, periodic lines elsewhere, a summary table.

* :func:`quiet_libraries` (called by the CLI, and in every Ray worker by the runtime env's setup hook) turns
  off what diffusers / transformers / huggingface_hub / DeepSpeed print while loading (``Loading pipeline
  components...`` bars, ``torch_dtype is deprecated`` FutureWarnings, INFO lines) unless ``--verbose``
  (``ROCM_RAY_VERBOSE=1``) asks for them. Warnings raised by rocm_ray itself are never hidden.
* :class:`Progress` draws one self-updating bar (step, reward, divergence, it/s, ETA) when stdout is a
  terminal, and otherwise prints the classic ``step N/M | loss ... | reward ...`` line every
  ``logging.log_every`` steps, which is what CI logs and ``ray job logs`` want.
* :func:`summary_table` is the one table printed at the end of a run (before / after / change).

Import-light on purpose (no torch): Ray workers import it from their setup hook.
"""

from __future__ import annotations

import math
import os
import sys
import warnings
from collections.abc import Mapping
from typing import IO, Any

VERBOSE_ENV = "ROCM_RAY_VERBOSE"
# The libraries whose warnings and INFO logs are noise in a normal run (their module name prefixes).
NOISY_LIBRARIES = ("diffusers", "transformers", "huggingface_hub", "peft", "deepspeed", "accelerate", "torch",
                   "tokenizers", "open_clip", "timm")
# Environment variables read by those libraries at import time, so child processes (Ray workers on this
# machine) start quiet too.
QUIET_ENV = {"HF_HUB_DISABLE_PROGRESS_BARS": "1", "DIFFUSERS_VERBOSITY": "error", "TRANSFORMERS_VERBOSITY": "error",
             "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1", "DS_ACCELERATOR_LOG_LEVEL": "warning"}


def is_verbose() -> bool:
    """Whether library warnings and loading bars were asked for (``--verbose`` / ``ROCM_RAY_VERBOSE=1``)."""
    return os.environ.get(VERBOSE_ENV, "0").lower() in ("1", "true", "yes")


def set_verbose(verbose: bool) -> None:
    """Record the choice in the environment, which Ray worker processes started from here inherit."""
    os.environ[VERBOSE_ENV] = "1" if verbose else "0"


class _ErrorsOnly:
    """A logging filter that keeps errors and drops everything below."""

    def filter(self, record) -> bool:
        return record.levelno >= 40  # logging.ERROR


_QUIET = False  # quiet_libraries() ran in this process (the CLI, a Ray worker's setup hook)


def quiet_libraries() -> bool:
    """Silence third-party warnings, INFO logs and loading bars unless verbose; returns whether it did.

    Idempotent and cheap: libraries not imported yet are configured through their environment variables,
    those already imported through their logging APIs (diffusers has no variable for its bars: code that
    imports diffusers later calls :func:`requiet`).
    """
    global _QUIET
    if is_verbose():
        return False
    _QUIET = True
    for k, v in QUIET_ENV.items():
        os.environ.setdefault(k, v)
    pattern = r"(" + "|".join(NOISY_LIBRARIES) + r")(\.|$)"
    for category in (FutureWarning, DeprecationWarning, UserWarning):
        warnings.filterwarnings("ignore", category=category, module=pattern)
    import logging

    for name in ("DeepSpeed", "deepspeed", "torch.distributed", "torch.distributed.elastic"):
        logger = logging.getLogger(name)
        logger.setLevel(logging.ERROR)
        # DeepSpeed re-sets its logger's level when it is imported (and warns "Setting accelerator to CPU"
        # on every rank right then); a filter survives that
        if not any(isinstance(f, _ErrorsOnly) for f in logger.filters):
            logger.addFilter(_ErrorsOnly())
    if "diffusers" in sys.modules:
        import diffusers.utils.logging as dl

        dl.set_verbosity_error()
        dl.disable_progress_bar()
    if "transformers" in sys.modules:
        import transformers.utils.logging as tl

        tl.set_verbosity_error()
        tl.disable_progress_bar()
    if "huggingface_hub" in sys.modules:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    return True


def requiet() -> None:
    """Apply :func:`quiet_libraries` again to libraries imported since, if this process asked for quiet.

    Called right after rocm_ray imports diffusers (its progress bars have no environment switch); a
    notebook that never called :func:`quiet_libraries` keeps its own settings.
    """
    if _QUIET:
        quiet_libraries()


def format_line(row: Mapping[str, Any], total: int, extra: str = "") -> str:
    """The periodic progress line of one metrics row (both trainers print exactly this)."""
    divs = " ".join(f"{row[k]:.4g}" for k in sorted(row) if k.startswith("div_step_"))
    line = (f"step {int(row['step']):>4d}/{total} | loss {row['loss']:+.4f} | reward {row['reward']:.4f} | "
            f"div {row['divergence']:.4g} [{divs}] | grad {row['grad_norm']:.3g} | "
            f"{row['images_per_s']:.2f} img/s | {row['it_per_s']:.2f} it/s")
    return f"{line} | {extra}" if extra else line


def _clock(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    s = int(round(seconds))
    return f"{s // 3600:d}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60:02d}:{s % 60:02d}"


class Progress:
    """Per-step progress output: a live bar on a terminal, periodic lines otherwise.

    ``live=None`` decides from ``stream.isatty()``; ``ROCM_RAY_PROGRESS=lines|bar`` forces either.
    """

    def __init__(self, total: int, log_every: int = 1, stream: IO[str] | None = None, live: bool | None = None):
        self.total, self.log_every = int(total), max(int(log_every), 1)
        self.stream = stream if stream is not None else sys.stdout
        forced = os.environ.get("ROCM_RAY_PROGRESS", "").lower()
        if live is None:
            live = forced == "bar" or (forced != "lines" and _isatty(self.stream))
        self.live = bool(live)
        self._busy, self._steps = 0.0, 0  # seconds spent in the steps shown, and how many
        self._width = 0

    def bar_text(self, row: Mapping[str, Any]) -> str:
        """``[#####.....] 12/100 | reward 5.5 | div 0.12 | 1.4 it/s | 00:08<01:02``: the live bar's content.

        it/s and the ETA come from the steps' own durations (``it_per_s`` of each row), so evaluation and
        start-up before the first step do not skew them.
        """
        step = int(row["step"])
        rate = float(row.get("it_per_s", 0.0))
        if rate > 0:
            self._busy += 1.0 / rate
            self._steps += 1
        mean_rate = self._steps / self._busy if self._busy > 0 else 0.0
        eta = (self.total - step) / mean_rate if mean_rate > 0 else math.inf
        frac = step / self.total if self.total else 1.0
        n = 20
        filled = min(n, int(frac * n))
        return (f"[{'#' * filled}{'.' * (n - filled)}] {step}/{self.total} | reward {row['reward']:.4f} | "
                f"div {row['divergence']:.4g} | {mean_rate:.2f} it/s | {_clock(self._busy)}<{_clock(eta)}")

    def update(self, row: Mapping[str, Any], line: str | None = None) -> None:
        """Show one finished step. ``line``: the periodic line to print (default :func:`format_line`)."""
        step = int(row["step"])
        if self.live:
            text = self.bar_text(row)
            pad = max(self._width - len(text), 0)
            self._width = len(text)
            self.stream.write("\r" + text + " " * pad)
            if step >= self.total:
                self.stream.write("\n")
                self._width = 0
            self.stream.flush()
        elif step % self.log_every == 0 or step == self.total:
            print(line if line is not None else format_line(row, self.total), file=self.stream, flush=True)

    def close(self) -> None:
        """End a live bar's line (a run that stopped before its last step)."""
        if self.live and self._width:
            self.stream.write("\n")
            self.stream.flush()
            self._width = 0


def _isatty(stream: IO[str]) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 1e4 else f"{v:.4g}"
    return str(v)


def summary_table(summary: Mapping[str, Any]) -> str:
    """The end-of-run table: every ``<metric>_before`` / ``<metric>_after`` pair with its change, then the
    run's facts (steps, regularizer, beta, wall time, throughput), aligned for a terminal or a log."""
    rows = [("metric", "before", "after", "change")]
    for key in sorted({k[: -len("_before")] for k in summary if k.endswith("_before")}):
        b, a = summary.get(f"{key}_before"), summary.get(f"{key}_after")
        change = f"{a - b:+.4f}" if isinstance(a, (int, float)) and isinstance(b, (int, float)) else ""
        rows.append((key, _fmt(b), "" if a is None else _fmt(a), change))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    rule = "+-" + "-+-".join("-" * w for w in widths) + "-+"
    lines = [f"{summary.get('name', 'run')}: summary", rule]
    for i, r in enumerate(rows):
        lines.append("| " + " | ".join(c.ljust(w) if j == 0 else c.rjust(w)
                                       for j, (c, w) in enumerate(zip(r, widths, strict=True))) + " |")
        if i == 0:
            lines.append(rule)
    lines.append(rule)
    facts = [f"{k} {summary[k]}" for k in ("steps", "regularizer", "beta", "wall_time_s", "images_per_s")
             if k in summary]
    if facts:
        lines.append(", ".join(facts))
    return "\n".join(lines)
