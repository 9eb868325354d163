"""Run folders: the one module that knows what a run folder holds, how it is staged and published,
its mode and task folder, and where its task's compare report goes. Every other module asks here.

    python -m replicate.runs exports/rooms    # the finished runs of a task, and unfinished folders

A run folder (`exports/TASK/RUN_NAME/`) holds `config.json` (how it was made), `history.csv` (one
row per epoch), `metrics.json` (the results, written last: a folder with it is finished),
`valid_predictions.csv`, the models (`model.onnx`, `model.int8.onnx`, `export.pkl`, and `head.onnx`
for a run whose body is the pretrained network untouched) and plots. A bundle folder (`replicate
bundle`) holds `bundle.onnx` (several such runs' heads on their one body), `bundle.json` (its
attributes, source runs and checksums) and a script that tags photos with it alone.

It is written under a hidden staging name (`.RUN_NAME.partial-XXXX`) and renamed into place when
complete, so a crash never leaves a folder that looks finished. The process writing a staging
folder holds an exclusive lock on a file inside it (flock: the kernel drops it when the process
ends, SIGKILL included), so the next run or compare of that task can tell a folder left by a
process that is gone, and remove it, from one that a live process is still writing.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import sys
import tempfile
import time
from functools import cached_property
from pathlib import Path

import pandas as pd

from .config import mode_name
from .errors import ReplicateError
from .folders import sha256_file

CONFIG, METRICS, HISTORY = "config.json", "metrics.json", "history.csv"
VALID_PREDICTIONS = "valid_predictions.csv"
ONNX, INT8, PICKLE = "model.onnx", "model.int8.onnx", "export.pkl"
HEAD = "head.onnx"  # the head alone, on the body's features: runs whose body is shared
# A bundle folder (`replicate bundle`): several runs' heads on their shared body in one file, its
# int8 twin, and the manifest: the attributes, their source runs and the files' checksums.
BUNDLE, BUNDLE_INT8, MANIFEST = "bundle.onnx", "bundle.int8.onnx", "bundle.json"
MODEL_FILES = (ONNX, PICKLE, BUNDLE)  # a folder with any is a model `predict` can run
PARTIAL = ".partial-"  # in a staging folder's name
LOCK = ".writing"  # the file in a staging folder that its writer holds locked
# A staging folder is locked within microseconds of its creation; one without its lock file and
# older than this was left by a version of replicate that did not lock (or by a crash in between).
UNLOCKED_GRACE_S = 60


class Run:
    """A run folder, read on demand: its config, metrics, history and predictions."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"Run({str(self.path)!r})"

    @cached_property
    def config(self) -> dict:
        return json.loads((self.path / CONFIG).read_text())

    @cached_property
    def metrics(self) -> dict:
        return json.loads((self.path / METRICS).read_text())

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def task(self) -> str:
        return self.config["task"]

    @property
    def mode(self) -> str:
        """'frozen' or 'unfrozen', as in run folder names."""
        return mode_name(self.config["unfreeze"])

    @property
    def title(self) -> str:
        """'TASK: ARCH MODE', the plots' titles."""
        return f"{self.task}: {self.config['arch']} {self.mode}"

    @property
    def classes(self) -> list[str]:
        return self.metrics["classes"]

    @property
    def task_dir(self) -> Path:
        """The task folder the run trained on (absolute since config.json recorded it)."""
        config = self.config
        return Path(config.get("task_dir") or Path(config["data_dir"]) / config["task"])

    @property
    def onnx(self) -> Path:
        return self.path / ONNX

    @property
    def int8(self) -> Path:
        return self.path / INT8

    @property
    def head(self) -> Path:
        return self.path / HEAD

    @property
    def pickle(self) -> Path:
        return self.path / PICKLE

    @property
    def history_csv(self) -> Path:
        return self.path / HISTORY

    @property
    def valid_predictions_csv(self) -> Path:
        return self.path / VALID_PREDICTIONS

    def history(self) -> pd.DataFrame:
        return pd.read_csv(self.history_csv)

    def valid_predictions(self) -> pd.DataFrame:
        return pd.read_csv(self.valid_predictions_csv)

    def write_config(self, config: dict) -> None:
        (self.path / CONFIG).write_text(json.dumps(config, indent=2))
        self.__dict__.pop("config", None)

    def write_metrics(self, metrics: dict) -> None:
        (self.path / METRICS).write_text(json.dumps(metrics, indent=2))
        self.__dict__.pop("metrics", None)

    def record_checksums(self, paths: list[Path], extra: dict | None = None) -> None:
        """metrics.json's "checksums" (file name -> SHA-256) of the files that exist among `paths`,
        which `predict` checks before loading, and `extra` keys beside them; nothing for a folder
        without metrics.json."""
        if not (self.path / METRICS).is_file():
            return
        metrics = self.metrics
        metrics.setdefault("checksums", {}).update(checksums(paths))
        metrics.update(extra or {})
        self.write_metrics(metrics)


def checksums(paths: list[Path]) -> dict[str, str]:
    """{file name: SHA-256} of the files that exist among `paths`: metrics.json's "checksums"."""
    return {p.name: sha256_file(p) for p in paths if p.is_file()}


def is_run(path: Path) -> bool:
    """A folder with a config.json: a run folder, finished or not."""
    return (Path(path) / CONFIG).is_file()


def open_run(path: Path) -> Run:
    """The run folder at `path`; a ReplicateError when it is not one."""
    if not is_run(path):
        raise ReplicateError(
            f"{path} is not a run folder (no {CONFIG}): e.g. exports/rooms/resnet18-frozen"
        )
    return Run(path)


def has_model(path: Path) -> bool:
    """A folder holding a model `predict` can run (model.onnx or export.pkl)."""
    return Path(path).is_dir() and any((Path(path) / f).is_file() for f in MODEL_FILES)


def is_bundle(path: Path) -> bool:
    """A bundle folder (`replicate bundle`), or one of its model files."""
    path = Path(path)
    if path.is_dir():
        return (path / BUNDLE).is_file() and not (path / CONFIG).is_file()
    return path.name in (BUNDLE, BUNDLE_INT8) and (path.parent / MANIFEST).is_file()


def finished(path: Path) -> Run | None:
    """The run at `path` if it is complete (config.json and metrics.json readable), else None."""
    run = Run(path)
    try:
        run.config, run.metrics  # noqa: B018  (read both: a half-written folder fails here)
    except (OSError, ValueError):
        return None
    return run


def finished_runs(task_exports: Path) -> list[Run]:
    """The finished run folders under exports/TASK, by name (compare/, staging and failed runs are
    not run folders)."""
    task_exports = Path(task_exports)
    if not task_exports.is_dir():
        return []
    found = (finished(p) for p in sorted(task_exports.iterdir()) if p.is_dir())
    return [run for run in found if run is not None]


def run_of(model: Path) -> Run:
    """The run folder a model belongs to: the folder itself, or the folder of a model file."""
    model = Path(model)
    return Run(model if model.is_dir() else model.parent)


def checksum_warning(path: Path) -> str:
    """'' when the model file `path` matches the SHA-256 that the metrics.json (or a bundle's
    bundle.json) beside it recorded, else what is wrong."""
    metrics = path.parent / METRICS
    if not metrics.is_file() and (path.parent / MANIFEST).is_file():
        metrics = path.parent / MANIFEST
    if not metrics.is_file():
        return f"{path} has no {METRICS} beside it: no checksum to verify it against"
    recorded = json.loads(metrics.read_text())
    expected = recorded.get("checksums", {}).get(path.name)
    if expected is None and path.name == PICKLE:
        expected = recorded.get("export_sha256")  # run folders from before "checksums"
    if expected is None:
        return f"{metrics} records no checksum for {path.name}: nothing to verify it against"
    if expected != sha256_file(path):
        return f"{path} does not match the SHA-256 recorded in {metrics} when it was written: it was changed"
    return ""


def compare_dir(exports_dir: Path, task: str, recipe: str = "paper") -> Path:
    """Where a task's compare report goes: exports/TASK/compare/ (compare-RECIPE/ for another)."""
    return Path(exports_dir) / task / ("compare" if recipe == "paper" else f"compare-{recipe}")


# --- staging and publishing ----------------------------------------------------------------------


class Staging:
    """A hidden folder beside `run_dir` that becomes the run folder when `publish` renames it;
    locked by this process until then (see the module docstring)."""

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self.run_dir.parent.mkdir(parents=True, exist_ok=True)
        prefix = f".{self.run_dir.name}{PARTIAL}"
        self.path = Path(tempfile.mkdtemp(prefix=prefix, dir=self.run_dir.parent))
        self.path.chmod(0o755)  # mkdtemp makes it private; the published run folder should not be
        self._lock = open(self.path / LOCK, "w")  # held until publish or discard
        fcntl.flock(self._lock, fcntl.LOCK_EX)
        self.run = Run(self.path)

    def publish(self) -> Path:
        """Move the finished folder into place, replacing an earlier run of the same name."""
        old = None
        if self.run_dir.exists():
            old = self.run_dir.with_name(f".{self.run_dir.name}.old-{os.getpid()}")
            self.run_dir.rename(old)
        self.path.rename(self.run_dir)  # still locked: the lock follows the file, not its name
        (self.run_dir / LOCK).unlink()
        self._release()
        if old is not None:
            shutil.rmtree(old)
        return self.run_dir

    def discard(self) -> None:
        """Remove the folder if it was not published (a failed or interrupted run)."""
        if self.path.exists():
            shutil.rmtree(self.path, ignore_errors=True)
        self._release()

    def _release(self) -> None:
        if not self._lock.closed:
            self._lock.close()


def _abandoned(folder: Path) -> bool:
    """A staging folder whose writer is gone: its lock can be taken (or, without a lock file, it is
    older than UNLOCKED_GRACE_S)."""
    lock = folder / LOCK
    try:
        with open(lock) as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False  # a live process holds it
            return True
    except FileNotFoundError:
        try:
            return time.time() - folder.stat().st_mtime > UNLOCKED_GRACE_S
        except FileNotFoundError:
            return False  # published or removed meanwhile


def sweep(task_exports: Path, log=print, name: str = "*") -> list[Path]:
    """Remove the staging folders under exports/TASK whose process is gone (killed mid-run), never
    one that a live process still writes, saying so in one line; returns what was removed.
    `name`: only the staging folders of that folder (a bundle's, in a folder of other things)."""
    task_exports = Path(task_exports)
    if not task_exports.is_dir():
        return []
    found = sorted(task_exports.glob(f".{name}{PARTIAL}*"))
    stale = [p for p in found if p.is_dir() and _abandoned(p)]
    for folder in stale:
        shutil.rmtree(folder, ignore_errors=True)
    if stale:
        names = ", ".join(p.name for p in stale)
        log(
            f"removed {len(stale)} unfinished run folder(s) left by a process that is gone: {names}"
        )
    return stale


if __name__ == "__main__":
    for run in finished_runs(Path(sys.argv[1])):
        print(run.name, f"{run.metrics['best_valid_accuracy']:.2%}")
    for left in sorted(Path(sys.argv[1]).glob(f".*{PARTIAL}*")):
        print(left.name, "abandoned" if _abandoned(left) else "being written")
