"""Where a run lives: one location (a local folder, a shared mount or a ``pyarrow.fs`` URI) for everything.

``train.output_dir`` (``{name}`` = the recipe name) is the run location; a relative one is put under
``$ROCM_RAY_OUTPUT_ROOT`` when that is set (itself a folder or a URI such as ``s3://bucket/rocm_ray``),
else under the current directory. Ray Train's ``storage_path`` is ``<location>/ray`` and every output
(metrics.csv, TensorBoard events, samples.parquet, weights/, summary, curves/grid PNGs, recipe.json)
goes to the same location through :class:`RunStorage`, so nothing assumes a local path:

- S3 / GCS: ``s3://bucket/prefix``, ``gs://bucket/prefix`` (credentials and endpoint the usual way:
  ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` / ``AWS_ENDPOINT_URL``, or the node's IAM role;
  Google's application default credentials);
- a local or shared folder (NFS/EFS mounted at the same path on every node).

A multi-node Ray cluster needs storage every node reaches; :func:`check_storage_shared` proves it before
training (a marker file written by the driver, looked for by a task on every node) and refuses node-local
storage within seconds (:class:`StorageError`, exit code 2 at the CLI).

Rank 0 streams the metrics as training goes (:class:`LiveMetrics`): one ``metrics.csv`` row per finished
step, TensorBoard events and W&B, so a crash leaves every row up to the last finished step and a resume
(trimming the rows after its checkpoint's step) appends without duplicates or gaps.
"""

from __future__ import annotations

import csv
import io
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any

from rocm_ray.config import Recipe, RecipeError

OUTPUT_ROOT_ENV = "ROCM_RAY_OUTPUT_ROOT"
METRICS_FILE = "metrics.csv"


class StorageError(RecipeError):
    """The run location cannot serve this run (node-local on a cluster, unreachable, or an existing run)."""

    def __init__(self, source: str, message: str, key: str = "train.output_dir"):
        super().__init__(source, key, message)


def is_uri(location: str) -> bool:
    """Whether ``location`` is a URI (``s3://``, ``gs://``, ``file://``...) rather than a plain path."""
    return "://" in location


def run_location(recipe: Recipe) -> str:
    """The run location: ``train.output_dir`` under ``$ROCM_RAY_OUTPUT_ROOT`` if relative; an absolute
    local path or a URI (no trailing slash)."""
    out = recipe.train.output_dir.replace("{name}", recipe.name)
    root = os.environ.get(OUTPUT_ROOT_ENV, "")
    if is_uri(out):
        return out.rstrip("/")
    if not Path(out).is_absolute() and root:
        if is_uri(root):
            return root.rstrip("/") + "/" + out.strip("/").removeprefix("./")
        out = str(Path(root) / out)
    return str(Path(out).resolve())


class RunStorage:
    """Files of one run location, read and written through ``pyarrow.fs`` (local, S3, GCS, ...).

    Paths are relative to the location (``"metrics.csv"``, ``"ray/<name>/checkpoint_000004"``). Picklable
    (the filesystem is re-resolved where it is unpickled, e.g. in a Ray worker on another node).
    """

    def __init__(self, location: str):
        self.location = location.rstrip("/") if is_uri(location) else str(Path(location).resolve())
        self._fs = None
        self._root = ""

    def __getstate__(self) -> dict:
        return {"location": self.location}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["location"])

    def __repr__(self) -> str:
        return f"RunStorage({self.location!r})"

    @property
    def fs(self):
        """The ``pyarrow.fs.FileSystem`` (resolved on first use)."""
        if self._fs is None:
            import pyarrow.fs

            if is_uri(self.location):
                self._fs, self._root = pyarrow.fs.FileSystem.from_uri(self.location)
            else:
                self._fs, self._root = pyarrow.fs.LocalFileSystem(), self.location
            self._root = self._root.rstrip("/")
        return self._fs

    @property
    def is_local(self) -> bool:
        """A plain path on this machine's filesystem (possibly a shared mount)."""
        import pyarrow.fs

        return isinstance(self.fs, pyarrow.fs.LocalFileSystem)

    @property
    def local_path(self) -> Path | None:
        return Path(self.path()) if self.is_local else None

    def path(self, *parts: str) -> str:
        """The filesystem path (bucket/prefix/... for object stores) of ``parts`` under the location."""
        self.fs  # noqa: B018 - resolves _root
        rel = "/".join(p.strip("/") for p in parts if p and p.strip("/"))
        return f"{self._root}/{rel}" if rel else self._root

    def uri(self, *parts: str) -> str:
        """The location of ``parts`` as a string Ray / pyarrow accept (a URI for object stores)."""
        rel = "/".join(p.strip("/") for p in parts if p and p.strip("/"))
        return f"{self.location}/{rel}" if rel else self.location

    def child(self, *parts: str) -> RunStorage:
        return RunStorage(self.uri(*parts))

    # ------------------------------------------------------------------------------------------- files

    def exists(self, rel: str = "") -> bool:
        import pyarrow.fs

        return self.fs.get_file_info(self.path(rel)).type != pyarrow.fs.FileType.NotFound

    def is_file(self, rel: str) -> bool:
        import pyarrow.fs

        return self.fs.get_file_info(self.path(rel)).type == pyarrow.fs.FileType.File

    def read_bytes(self, rel: str) -> bytes:
        with self.fs.open_input_stream(self.path(rel)) as f:
            return f.read()

    def read_text(self, rel: str) -> str:
        return self.read_bytes(rel).decode("utf-8")

    def write_bytes(self, rel: str, data: bytes) -> None:
        """Write a whole file atomically: a local file is renamed into place, an object is one PUT."""
        target = self.path(rel)
        parent = target.rsplit("/", 1)[0]
        if self.is_local:
            Path(parent).mkdir(parents=True, exist_ok=True)
            tmp = f"{target}.tmp-{os.getpid()}"
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
            return
        self.fs.create_dir(parent, recursive=True)
        with self.fs.open_output_stream(target) as f:
            f.write(data)

    def write_text(self, rel: str, text: str) -> None:
        self.write_bytes(rel, text.encode("utf-8"))

    def files(self, rel: str = "") -> dict[str, int]:
        """Every file under ``rel`` (recursively): relative path -> size in bytes. Empty if none."""
        import pyarrow.fs

        base = self.path(rel)
        if not self.exists(rel):
            return {}
        infos = self.fs.get_file_info(pyarrow.fs.FileSelector(base, recursive=True, allow_not_found=True))
        return {i.path[len(base):].lstrip("/"): i.size for i in infos if i.type == pyarrow.fs.FileType.File}

    def listdir(self, rel: str = "") -> list[str]:
        """Names directly under ``rel`` (files and folders)."""
        import pyarrow.fs

        if not self.exists(rel):
            return []
        infos = self.fs.get_file_info(pyarrow.fs.FileSelector(self.path(rel), allow_not_found=True))
        return sorted(i.base_name for i in infos)

    def delete(self, rel: str) -> None:
        """Delete a file or a folder (recursively) under the location; nothing if absent."""
        import pyarrow.fs

        info = self.fs.get_file_info(self.path(rel))
        if info.type == pyarrow.fs.FileType.Directory:
            self.fs.delete_dir(self.path(rel))
        elif info.type == pyarrow.fs.FileType.File:
            self.fs.delete_file(self.path(rel))

    def upload(self, local_dir: str | Path, rel: str = "") -> None:
        """Copy a local folder's files into ``rel`` (files of the same name are replaced)."""
        import pyarrow.fs

        if self.is_local and Path(self.path(rel)).resolve() == Path(local_dir).resolve():
            return
        self.fs.create_dir(self.path(rel), recursive=True)
        pyarrow.fs.copy_files(str(local_dir), self.path(rel), source_filesystem=pyarrow.fs.LocalFileSystem(),
                              destination_filesystem=self.fs)

    def download(self, rel: str, local_dir: str | Path) -> Path:
        """Copy the folder ``rel`` into ``local_dir`` (created); returns ``local_dir``."""
        import pyarrow.fs

        Path(local_dir).mkdir(parents=True, exist_ok=True)
        pyarrow.fs.copy_files(self.path(rel), str(local_dir), source_filesystem=self.fs,
                              destination_filesystem=pyarrow.fs.LocalFileSystem())
        return Path(local_dir)


class Staging:
    """A local folder to write outputs into, uploaded to the run location by :meth:`commit`.

    For a local location the folder *is* the location (no copy); for a URI it is a temporary folder.
    """

    def __init__(self, storage: RunStorage):
        self.storage = storage
        if storage.is_local:
            self.dir = storage.local_path
            self.dir.mkdir(parents=True, exist_ok=True)
        else:
            self.dir = Path(tempfile.mkdtemp(prefix="rocm_ray_stage_"))

    def commit(self) -> None:
        if not self.storage.is_local:
            self.storage.upload(self.dir)


# --------------------------------------------------------------------------------------- cluster check


def _sees_marker(location: str, rel: str) -> bool:
    """Runs on one node: whether that node reaches the driver's marker file."""
    try:
        return RunStorage(location).is_file(rel)
    except Exception:  # noqa: BLE001 - unreachable storage is exactly what this reports
        return False


def check_storage_shared(storage: RunStorage, source: str, timeout_s: float = 60.0) -> None:
    """Refuse node-local storage on a Ray cluster of several nodes, before anything is trained.

    The driver writes a marker file at the run location; a zero-CPU task pinned to every alive node looks
    for it. A location every node sees (a shared mount, an object store) passes; otherwise a
    :class:`StorageError` names ``train.output_dir`` / ``$ROCM_RAY_OUTPUT_ROOT`` and what to set. A
    single-node Ray is always fine. Needs a connected Ray.
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) <= 1:
        return
    rel = f".rocm_ray_probe/{uuid.uuid4().hex}"
    created = not storage.exists()
    try:
        storage.write_text(rel, "rocm_ray storage probe\n")
    except Exception as e:  # noqa: BLE001 - any failure to write is a storage error for the user
        raise StorageError(source, f"cannot write to the run location {storage.location}: {e}") from None
    probe = ray.remote(num_cpus=0, max_retries=0)(_sees_marker)
    try:
        refs = {n["NodeID"]: probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
                .remote(storage.location, rel) for n in nodes}
        ready, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=timeout_s)
        seen = {nid: (ray.get(ref) if ref in ready else None) for nid, ref in refs.items()}
    finally:
        try:
            storage.delete(".rocm_ray_probe")
            if created and storage.is_local and not storage.listdir():
                storage.local_path.rmdir()  # leave nothing behind where nothing was
        except Exception:  # noqa: BLE001 - best effort
            pass
    ips = {n["NodeID"]: n.get("NodeManagerAddress", "?") for n in nodes}
    blind = [f"{nid[:8]} ({ips[nid]})" for nid, ok in seen.items() if ok is False]
    silent = [f"{nid[:8]} ({ips[nid]})" for nid, ok in seen.items() if ok is None]
    if blind:
        raise StorageError(source, (
            f"the run location {storage.location} is node-local: {len(blind)} of the cluster's {len(nodes)} "
            f"nodes cannot see it ({', '.join(blind)}), so Ray Train's checkpoints and the outputs would be "
            "scattered over the nodes. Set train.output_dir (or $ROCM_RAY_OUTPUT_ROOT for a relative "
            "output_dir) to storage every node reaches: a shared mount at the same path on every node "
            "(NFS/EFS, e.g. ROCM_RAY_OUTPUT_ROOT=/mnt/shared/rocm_ray) or an object store URI "
            "(e.g. ROCM_RAY_OUTPUT_ROOT=s3://<bucket>/rocm_ray)"))
    if silent:
        raise StorageError(source, (
            f"could not check within {timeout_s:.0f} s that nodes {', '.join(silent)} reach the run location "
            f"{storage.location} (no task started there); set train.output_dir / $ROCM_RAY_OUTPUT_ROOT to "
            "shared storage (a shared mount or s3://...) and check that the nodes are healthy"))


# ---------------------------------------------------------------------------------------- live metrics


def read_metrics(storage: RunStorage) -> list[dict]:
    """The rows of ``metrics.csv`` at the location (numbers as floats; ``step`` as int); [] if none."""
    if not storage.is_file(METRICS_FILE):
        return []
    rows = []
    for r in csv.DictReader(io.StringIO(storage.read_text(METRICS_FILE))):
        row = {k: float(v) for k, v in r.items() if v not in ("", None)}
        row["step"] = int(row["step"])
        rows.append(row)
    return rows


class LiveMetrics:
    """Rank 0's per-step metrics, written as training goes: ``metrics.csv``, TensorBoard, W&B.

    ``resume_step``: the step of the checkpoint this attempt starts from; rows after it (written by an
    attempt that crashed) are dropped and will be written again, so the file never holds a step twice
    nor misses one. A local ``metrics.csv`` is appended line by line (flushed and fsynced per step); on
    an object store the file is rewritten per step (one PUT, atomic). TensorBoard events go to
    ``tensorboard/`` (written locally and uploaded per step for URIs; ``purge_step`` on resume hides the
    crashed attempt's later events). W&B resumes one run id per location; if W&B cannot start (no key,
    no network) the run continues without it and says so; ``WANDB_MODE=offline`` keeps it local.
    """

    def __init__(self, storage: RunStorage, resume_step: int = 0, tensorboard: bool = False,
                 wandb_project: str | None = None, run_name: str = "run", config: dict | None = None):
        self.storage = storage
        self.rows = [r for r in read_metrics(storage) if r["step"] <= resume_step]
        self._keys: list[str] = list(dict.fromkeys(k for r in self.rows for k in r))
        self._rewrite()
        self._tb = self._tb_dir = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb_dir = storage.local_path / "tensorboard" if storage.is_local else \
                Path(tempfile.mkdtemp(prefix="rocm_ray_tb_"))
            self._tb = SummaryWriter(str(self._tb_dir), purge_step=resume_step + 1 if resume_step else None)
        self._wandb = None
        if wandb_project:
            self._wandb = _start_wandb(wandb_project, run_name, storage, config)

    def _rewrite(self) -> None:
        buf = io.StringIO()
        if self.rows:
            w = csv.DictWriter(buf, fieldnames=self._keys)
            w.writeheader()
            w.writerows(self.rows)
        if self.rows or self.storage.is_file(METRICS_FILE):
            self.storage.write_text(METRICS_FILE, buf.getvalue())

    def log(self, row: dict) -> None:
        """Record one finished step (rows arrive in step order)."""
        row = dict(row)
        self.rows.append(row)
        new_keys = [k for k in row if k not in self._keys]
        path = self.storage.local_path
        if path is not None and not new_keys and self.rows[:-1]:
            with open(path / METRICS_FILE, "a", newline="") as f:
                csv.DictWriter(f, fieldnames=self._keys).writerow(row)
                f.flush()
                os.fsync(f.fileno())
        else:
            self._keys += new_keys
            self._rewrite()
        step = int(row["step"])
        if self._tb is not None:
            for k, v in row.items():
                if k != "step":
                    self._tb.add_scalar(k, v, step)
            self._tb.flush()
            if not self.storage.is_local:
                self.storage.upload(self._tb_dir, "tensorboard")
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in row.items() if k != "step"}, step=step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            if not self.storage.is_local:
                self.storage.upload(self._tb_dir, "tensorboard")
                shutil.rmtree(self._tb_dir, ignore_errors=True)
        if self._wandb is not None:
            self._wandb.finish()


def _start_wandb(project: str, name: str, storage: RunStorage, config: dict | None) -> Any:
    """A W&B run that resumes the same id for the same location; None (with a message) if W&B fails."""
    import hashlib

    run_id = hashlib.sha1(storage.location.encode()).hexdigest()[:16]
    wdir = storage.local_path or Path(tempfile.gettempdir()) / "rocm_ray_wandb" / run_id
    wdir.mkdir(parents=True, exist_ok=True)
    try:
        import wandb

        return wandb.init(project=project, name=name, id=run_id, resume="allow", config=config or {},
                          dir=str(wdir))
    except Exception as e:  # noqa: BLE001 - logging must never stop training
        print(f"rocm-ray: W&B unavailable ({type(e).__name__}: {e}); continuing without it "
              "(WANDB_MODE=offline logs locally)", flush=True)
        return None

