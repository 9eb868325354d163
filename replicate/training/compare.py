"""The study's grid: every backbone x {frozen, unfrozen} (x seeds) on a task, resumable.

    replicate compare rooms --no-pretrained --epochs 2 --size 64

Each cell is one `train.run` (the same code path as `replicate run`) writing its own run
folder. A cell whose folder holds a finished run with the same configuration is reused, so
an interrupted compare picks up where it stopped; run folders appear only when complete
(see `train.run`), so a killed cell is simply trained again.
"""

from __future__ import annotations

import dataclasses
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

from .. import runs, runtime
from ..config import RunConfig
from ..engine import filters
from ..errors import ReplicateError
from ..models import archs
from ..report import compare_report, plots
from . import train

MODES = ("frozen", "unfrozen")
# What must match for a finished run folder to stand in for a cell. The device, worker count
# and folders do not change what is computed in a way the study's figures resolve.
SAME_RESULT_KEYS = (
    "task",
    "arch",
    "unfreeze",
    "recipe",
    "epochs",
    "bs",
    "lr",
    "momentum",
    "aux_loss_weight",
    "size",
    "pretrained",
    "seed",
    "cache_features",
    "precision",
    "freeze_bn",
)
# Keys newer than some run folders: what those runs did.
ADDED_LATER = {"cache_features": 0, "precision": "fp32", "freeze_bn": False}


@dataclass
class Cell:
    """One grid cell's outcome: 'reused', 'trained' or 'failed' (with the error)."""

    cfg: RunConfig
    status: str = "pending"
    error: str = ""
    seconds: float = 0.0


def grid(base: RunConfig, names: list[str], modes: list[str], seeds: int) -> list[RunConfig]:
    """The configurations of a grid; a size below an arch's minimum is raised to it (each cell's log
    line and config show the size used)."""
    for m in modes:
        if m not in MODES:
            raise ReplicateError(f"unknown mode {m!r}: use frozen, unfrozen or both")
    cfgs = []
    for arch in names:
        spec = archs.get_arch(arch)
        size = max(base.size, spec.min_size) if base.size else None
        for mode in modes:
            for seed in range(base.seed, base.seed + seeds):
                # --cache-features and --freeze-bn apply to the frozen cells only: finetuning changes the body
                frozen = mode == "frozen"
                cfgs.append(
                    dataclasses.replace(
                        base,
                        arch=arch,
                        unfreeze=not frozen,
                        size=size,
                        seed=seed,
                        cache_features=base.cache_features if frozen else 0,
                        freeze_bn=base.freeze_bn and frozen,
                    )
                )
    return cfgs


def _expected(cfg: RunConfig) -> dict:
    """The config values a finished run of `cfg` would hold, for the keys that matter."""
    values = {**cfg.to_dict(), "size": archs.resolve(cfg, fetch=False).size}
    if cfg.lr is None and cfg.recipe == "paper":
        values["lr"] = 1e-3
    return {k: values[k] for k in SAME_RESULT_KEYS}


def is_finished(cfg: RunConfig) -> bool:
    """A complete run folder (runs.finished: its metrics are written last) made with the same configuration."""
    run = runs.finished(cfg.run_dir)
    if run is None:
        return False
    done = run.config
    expected = _expected(cfg)
    if cfg.lr is None and cfg.recipe == "fastai":
        expected["lr"] = done.get("lr")  # chosen by lr_find: any value it chose stands
    return all(done.get(k, ADDED_LATER.get(k)) == v for k, v in expected.items())


def run_grid(
    cfgs: list[RunConfig], force: bool = False, log=print, scanned: tuple | None = None
) -> list[Cell]:
    """Run every cell not already finished, one after another; a failing cell does not stop the grid.

    `scanned`: what `preflight` found ({task folder: (TaskImages, audit counts)}, {cell config:
    train.check's answer}), so the images are checked and audited once and each cell is not
    resolved again."""
    tasks_seen, checked = scanned or ({}, {})
    cells = [Cell(cfg) for cfg in cfgs]
    start, trained_seconds, trained = time.time(), 0.0, 0
    for k, cell in enumerate(cells, 1):
        todo = sum(1 for c in cells[k - 1 :] if force or not is_finished(c.cfg))
        eta = f", about {trained_seconds / trained * todo / 60:.1f} min left" if trained else ""
        log(
            f"\n[cell {k}/{len(cells)}] {cell.cfg.run_name}: {time.time() - start:.0f}s elapsed{eta}"
        )
        if not force and is_finished(cell.cfg):
            cell.status = "reused"
            log(f"reusing finished run {cell.cfg.run_dir}")
            # The filter at this grid's --positive and --target-precision.
            plots.render_filter(
                runs.Run(cell.cfg.run_dir), cell.cfg.positive, cell.cfg.target_precision
            )
            continue
        t0 = time.time()
        try:
            images, audited = tasks_seen.get(cell.cfg.task_dir, (None, None))
            train.run(cell.cfg, log, images, audited, checked.get(cell.cfg))
            cell.status = "trained"
        except KeyboardInterrupt:
            raise
        except Exception as e:  # one failing cell (say, out of GPU memory) must not end the grid
            cell.status = "failed"
            cell.error = f"{type(e).__name__}: {e}".splitlines()[0]
            log(f"cell failed: {cell.error}")
            (cell.cfg.exports_dir / cell.cfg.task).mkdir(parents=True, exist_ok=True)
            (cell.cfg.exports_dir / cell.cfg.task / f".{cell.cfg.run_name}.failed.txt").write_text(
                traceback.format_exc()
            )
        cell.seconds = time.time() - t0
        if cell.status == "trained":
            trained_seconds, trained = trained_seconds + cell.seconds, trained + 1
    return cells


def tasks(data_dir: Path, task: str) -> list[str]:
    """[task], or every task folder under data_dir for 'all'."""
    if task != "all":
        return [task]
    found = (
        sorted(d.name for d in data_dir.iterdir() if (d / "train").is_dir())
        if data_dir.is_dir()
        else []
    )
    if not found:
        raise ReplicateError(f"no task folders (TASK/train, TASK/valid) under {data_dir}")
    return found


def preflight(cfgs: list[RunConfig], log=print) -> tuple[dict, dict]:
    """Fail before the first cell on what would fail every cell: options, device, weights, the task
    folders (`train.check` for each cell, then the images once per task), and audit each task once
    (one warning line per task, not per cell).

    Returns ({task folder: (TaskImages, audit counts or None)}, {cell config: train.check's
    answer}) for `run_grid`."""
    from . import dataloaders

    checked = {cfg: train.check(cfg) for cfg in cfgs}
    first = {cfg.task_dir: cfg for cfg in reversed(cfgs)}  # one cell's config per task
    scanned = {}
    for task_dir, cfg in first.items():
        images = dataloaders.scan_task(task_dir)
        filters.check_positive(cfg.positive, images.classes, cfg.task)
        scanned[task_dir] = (
            images,
            train.audit_counts(cfg, images, log) if runtime.is_main_process() else None,
        )
    return scanned, checked


def quantize_cells(cells: list[Cell], log=print) -> None:
    """--quantize int8: write model.int8.onnx for each finished cell that has none yet (a reused cell
    too: its run folder is the input, nothing retrains), recording its accuracy for the report."""
    from . import export

    for cell in cells:
        if cell.status != "failed" and not runs.Run(cell.cfg.run_dir).int8.is_file():
            log(f"{cell.cfg.run_name}: int8")
            export.quantize_run(cell.cfg.run_dir, log=log)


def run(
    base: RunConfig,
    names: list[str],
    modes: list[str],
    seeds: int,
    *,
    force: bool = False,
    quantize: bool = False,
    log=print,
) -> int:
    """`replicate compare`: for the base config's task (or every task, for 'all'), train the grid's
    unfinished cells (`force`: all of them), then on the main process write model.int8.onnx
    (`quantize`), record the failed cells and rebuild the report. Returns the number that failed."""
    failed = 0
    for task in tasks(base.data_dir, base.task):
        cfgs = grid(dataclasses.replace(base, task=task), names, modes, seeds)
        scanned = preflight(cfgs, log=log)
        runs.sweep(base.exports_dir / task, log)
        cells = run_grid(cfgs, force, log=log, scanned=scanned)
        failed += sum(c.status == "failed" for c in cells)
        if not runtime.is_main_process():  # under accelerate launch, one process writes the report
            continue
        if quantize:
            quantize_cells(cells, log=log)
        errors = [{"cell": c.cfg.run_name, "error": c.error} for c in cells if c.status == "failed"]
        compare_report.record_failures(base.exports_dir, task, base.recipe, errors)
        compare_report.rebuild(base.exports_dir, task, base.recipe, log)
        counts = {s: sum(c.status == s for c in cells) for s in ("trained", "reused", "failed")}
        log(
            f"cells: {counts['trained']} trained, {counts['reused']} reused, {counts['failed']} failed"
        )
        for c in cells:
            if c.status == "failed":
                log(f"  failed: {c.cfg.run_name}: {c.error}")
    return failed
