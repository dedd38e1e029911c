"""What a run writes: progress lines, metrics (CSV), curves and grids (PNG), the Parquet sample log, summary."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from torch import Tensor

from rocm_ray.train.progress import Progress, summary_table


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class MetricsLog:
    """Per-step metrics: progress lines on stdout, ``metrics.csv``, and optional W&B / TensorBoard."""

    def __init__(self, out_dir: Path, total_steps: int, log_every: int = 1, wandb_project: str | None = None,
                 tensorboard: bool = False, run_name: str = "run", config: dict | None = None, append: bool = False):
        self.out_dir, self.total, self.log_every = out_dir, total_steps, log_every
        self.path = out_dir / "metrics.csv"
        self.rows: list[dict] = []
        if append and self.path.exists():
            with self.path.open() as f:
                self.rows = [{k: float(v) for k, v in r.items()} for r in csv.DictReader(f)]
        self._t0 = time.perf_counter()
        self._progress = Progress(total_steps, log_every)
        self._wandb = None
        self._tb = None
        if wandb_project:
            import wandb

            self._wandb = wandb.init(project=wandb_project, name=run_name, config=config or {},
                                     dir=str(out_dir), resume="allow")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(out_dir / "tensorboard"))

    def log(self, row: dict) -> None:
        self.rows = [r for r in self.rows if r["step"] < row["step"]] + [row]
        step = int(row["step"])
        self._progress.update(row)  # a live bar on a terminal, else the periodic line (train/progress.py)
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in row.items() if k != "step"}, step=step)
        if self._tb is not None:
            for k, v in row.items():
                if k != "step":
                    self._tb.add_scalar(k, v, step)
        self.flush()

    def flush(self) -> None:
        if not self.rows:
            return
        keys = list(dict.fromkeys(k for r in self.rows for k in r))
        tmp = self.path.with_name("metrics.csv.tmp")
        with tmp.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            w.writerows(self.rows)
        os.replace(tmp, self.path)

    def close(self) -> None:
        self.flush()
        self._progress.close()
        if self._wandb is not None:
            self._wandb.finish()
        if self._tb is not None:
            self._tb.close()


def plot_curves(rows: Sequence[dict], path: Path, title: str = "") -> None:
    """Reward and divergence per step, side by side, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    axes[0].plot(steps, [r["reward"] for r in rows], color="tab:blue", alpha=0.35, label="batch")
    k = max(1, len(rows) // 10)
    smooth = np.convolve([r["reward"] for r in rows], np.ones(k) / k, mode="valid")
    axes[0].plot(steps[k - 1:], smooth, color="tab:blue", label=f"mean of {k}")
    axes[0].set(xlabel="step", ylabel="reward", title="reward")
    axes[0].legend()
    for key in sorted(key for key in rows[0] if key.startswith("div_step_")):
        axes[1].plot(steps, [r[key] for r in rows], label=key.replace("div_step_", "step "))
    axes[1].plot(steps, [r["divergence"] for r in rows], color="black", label="sum")
    axes[1].set(xlabel="step", ylabel="divergence", title="divergence to the reference")
    if any(r["divergence"] > 0 for r in rows):
        axes[1].set_yscale("symlog", linthresh=1e-6)
    axes[1].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def to_uint8(images: Tensor) -> np.ndarray:
    """[B, 3, H, W] in [0, 1] -> [B, H, W, 3] uint8."""
    return (images.detach().float().clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)


def image_grid(images: Tensor, nrow: int, scale: int = 1, pad: int = 2) -> np.ndarray:
    """Tile [B, 3, H, W] images into one [rows*H, nrow*W, 3] uint8 array (row-major)."""
    arr = to_uint8(images)  # [B, H, W, 3]
    if scale > 1:
        arr = arr.repeat(scale, axis=1).repeat(scale, axis=2)
    b, h, w, _ = arr.shape
    rows = math.ceil(b / nrow)
    grid = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, 3), 255, np.uint8)
    for i in range(b):
        r, c = divmod(i, nrow)
        grid[pad + r * (h + pad):pad + r * (h + pad) + h, pad + c * (w + pad):pad + c * (w + pad) + w] = arr[i]
    return grid


def save_grid(images: Tensor, nrow: int, path: Path, scale: int = 1) -> None:
    from PIL import Image

    Image.fromarray(image_grid(images, nrow, scale)).save(path)


def save_before_after(before: Tensor, after: Tensor, nrow: int, row_labels: Sequence[str], path: Path,
                      title_before: str = "before (reference)", title_after: str = "after") -> None:
    """Two labeled panels, one row per prompt, for fixed prompts and seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    h = before.shape[-2]
    scale = max(1, 96 // h)
    g1, g2 = image_grid(before, nrow, scale), image_grid(after, nrow, scale)
    fig, axes = plt.subplots(1, 2, figsize=(2 + 2 * nrow * 0.9, 0.6 + 0.9 * len(row_labels)))
    for ax, g, t in ((axes[0], g1, title_before), (axes[1], g2, title_after)):
        ax.imshow(g)
        ax.set_title(t)
        ax.set_xticks([])
        step = g.shape[0] / max(1, len(row_labels))
        ax.set_yticks([step * (i + 0.5) for i in range(len(row_labels))])
        ax.set_yticklabels([lbl[:28] for lbl in row_labels], fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def png_bytes(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


SAMPLE_LOG_SCHEMA_DOC = """samples.parquet: one row per generated image.
  step (int64)            training step the image was generated at (0 = before training)
  model (string)          eval logs only (rocm-ray eval): "base" or "fine-tuned"
  prompt (string)         the prompt
  seed (int64)            the noise seed: torch.Generator().manual_seed(seed) reproduces the image
  reward (double)         the weighted training reward
  reward_<name> (double)  each reward model's own score
  divergence (double)     sum over steps of the regularizer's divergence
  divergences (list<double>) the regularizer's divergence per sampling step
  image_png (binary)      the image as PNG bytes
"""


class SampleLog:
    """The Parquet samples log (see :data:`SAMPLE_LOG_SCHEMA_DOC`), rewritten atomically at each append."""

    def __init__(self, path: Path, append: bool = False):
        self.path = path
        self.rows: list[dict] = []
        if append and path.exists():
            import pyarrow.parquet as pq

            self.rows = pq.read_table(path).to_pylist()

    def add(self, step: int, prompts: Sequence[str], seeds: Sequence[int], images: Tensor, rewards: Tensor,
            components: dict[str, Tensor], divergences: Tensor | None, extra: dict[str, str] | None = None) -> None:
        """Append (replace) the rows of ``step``; ``extra`` adds constant columns (eval: ``{"model": "base"}``),
        and rows replace only rows of the same step with the same extra values."""
        arr = to_uint8(images)
        extra = dict(extra or {})
        self.rows = [r for r in self.rows
                     if not (r["step"] == step and all(r.get(k) == v for k, v in extra.items()))]
        for i, (p, s) in enumerate(zip(prompts, seeds, strict=True)):
            row = {"step": int(step), **extra, "prompt": p, "seed": int(s), "reward": float(rewards[i])}
            for name, v in components.items():
                row[f"reward_{name}"] = float(v[i])
            divs = [] if divergences is None else [float(d) for d in divergences[i]]
            row["divergence"] = float(sum(divs))
            row["divergences"] = divs
            row["image_png"] = png_bytes(arr[i])
            self.rows.append(row)
        self.write()

    def write(self) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        # explicit types for the documented columns (an all-empty ``divergences`` would otherwise be list<null>),
        # and the union of every row's keys (from_pylist alone takes the first row's)
        fixed = {"step": pa.int64(), "model": pa.string(), "prompt": pa.string(), "seed": pa.int64(),
                 "reward": pa.float64(), "divergence": pa.float64(), "divergences": pa.list_(pa.float64()),
                 "image_png": pa.binary()}
        keys = list(dict.fromkeys(k for r in self.rows for k in r))
        keys = [k for k in keys if k != "image_png"] + ["image_png"] * ("image_png" in keys)
        schema = pa.schema([(k, fixed[k] if k in fixed else pa.float64() if k.startswith("reward_")
                             else pa.array([r.get(k) for r in self.rows]).type) for k in keys])
        table = pa.Table.from_pylist(self.rows, schema=schema)
        tmp = self.path.with_name(self.path.name + ".tmp")
        pq.write_table(table, tmp)
        os.replace(tmp, self.path)


def write_summary(out_dir: Path, summary: dict) -> None:
    atomic_write_text(out_dir / "summary.json", json.dumps(summary, indent=2))
    lines = [f"# {summary.get('name', 'run')}", "", "| metric | before | after |", "|---|---|---|"]
    for key in sorted({k[: -len("_before")] for k in summary if k.endswith("_before")}):
        b, a = summary.get(f"{key}_before"), summary.get(f"{key}_after")
        lines.append(f"| {key} | {b:.4f} | {a:.4f} |" if a is not None else f"| {key} | {b:.4f} | |")
    lines.append("")
    for key in ("steps", "regularizer", "beta", "wall_time_s", "images_per_s"):
        if key in summary:
            lines.append(f"- {key}: {summary[key]}")
    atomic_write_text(out_dir / "summary.md", "\n".join(lines) + "\n")
    print(summary_table(summary), flush=True)
