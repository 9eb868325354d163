"""One experiment -> one self-describing run folder.

    replicate run rooms --arch resnet18 --no-pretrained --epochs 1 --size 64

`run(cfg)` checks the data, builds the learner, trains with fastai's `fit` (constant LR),
keeps the weights of the best validation epoch and writes the run folder exports/TASK/ARCH-MODE/
(its files: `runs`), the models (model.onnx, export.pkl) and the plots. The folder is staged under
a hidden name and renamed when complete (runs.Staging), so a crash never leaves a half-written
folder that looks finished, and the next run removes one whose process was killed.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import fastai.distributed
import numpy as np
import pandas as pd
import torch
from fastai.callback.core import Callback
from fastai.callback.progress import ProgressCallback
from fastai.callback.tracker import SaveModelCallback, TrackerCallback
from fastai.torch_core import distrib_barrier, get_model, num_distrib, rank_distrib, set_seed

from .. import runs, runtime
from ..audit import checks
from ..config import RunConfig, environment
from ..engine import fastai_models, filters
from ..models import archs, learner
from ..models.archs import Resolved
from ..report import plots
from ..runs import Run
from ..runtime import alone, describe_device, is_main_process, resolve_device
from . import dataloaders, export, features


def _quiet(*args, **kwargs) -> None:
    """The log of processes other than the main one."""


class KeepBest(TrackerCallback):
    """Keeps the best epoch's weights in memory and loads them when fitting ends.

    fastai's SaveModelCallback saves them to a file on the main process only and loads it on every
    process behind a barrier, which needs a folder all processes (all machines) share; in memory
    works the same in one process or many. It also prints "Better model found at epoch N",
    counting from 0 (and anew in each fit of fine_tune), where history.csv counts from 1.
    """

    order = SaveModelCallback.order
    best_state = None

    def after_epoch(self):
        super().after_epoch()
        if self.new_best:
            self.best_state = {
                k: v.detach().clone() for k, v in get_model(self.model).state_dict().items()
            }

    def after_fit(self):
        if self.best_state is not None:
            get_model(self.model).load_state_dict(self.best_state)


class HistoryCallback(Callback):
    """Writes one history.csv row per epoch, as soon as the epoch ends.

    fastai's CSVLogger records time as "mm:ss" and the Recorder's train loss is an
    exponentially smoothed running value; the study reports the epoch's mean train loss,
    and images per second need real seconds with training timed apart from validation.
    """

    order = 55  # after Recorder (50) has logged the epoch, before KeepBest (61)

    def __init__(self, path: Path):
        self.path, self.rows = path, []  # rows persist across the two fits of fastai's fine_tune

    def before_train(self):
        self.t_train = time.perf_counter()
        self.loss_sum, self.n_seen = 0.0, 0

    def after_batch(self):
        if self.training:
            n = len(self.learn.yb[0])
            self.loss_sum += self.learn.loss.detach().item() * n
            self.n_seen += n

    def after_train(self):
        self.train_seconds = time.perf_counter() - self.t_train

    def after_epoch(self):
        names = self.recorder.metric_names[1:-1]  # without 'epoch' and 'time'
        row = {
            "epoch": len(self.rows) + 1,
            **{n: float(v) for n, v in zip(names, self.recorder.values[-1])},
        }
        row["train_loss"] = self.loss_sum / max(1, self.n_seen)
        row["seconds"] = time.time() - self.recorder.start_epoch
        row["train_seconds"] = self.train_seconds
        self.rows.append(row)
        pd.DataFrame(self.rows).to_csv(self.path, index=False)


def _metrics(history: pd.DataFrame, images: dataloaders.TaskImages, extra: dict) -> dict:
    """The run's metrics. Time spent caching features counts as training time, in seconds and images/s."""
    best = history.loc[history["valid_accuracy"].idxmax()]
    n_train = int(images.counts["train"].sum())
    cache_seconds = extra.get("feature_cache_seconds", 0.0)
    return {
        **extra,
        "best_valid_accuracy": float(best["valid_accuracy"]),
        "best_epoch": int(best["epoch"]),
        "last_valid_accuracy": float(history["valid_accuracy"].iloc[-1]),
        "train_seconds": float(history["seconds"].sum()) + cache_seconds,
        "train_images_per_second": n_train
        * len(history)
        / (float(history["train_seconds"].sum()) + cache_seconds),
        "n_train": n_train,
        "n_valid": int(images.counts["valid"].sum()),
        "classes": images.classes,
        "epochs_run": len(history),
        "skipped_images": [str(p) for p in images.skipped],
    }


def _describe(cfg: RunConfig, r: Resolved, images: dataloaders.TaskImages, device, log) -> None:
    """Say at the start what is about to be trained, on what, and where."""
    for path in images.skipped:
        log(f"warning: skipping unreadable image {path}")
    log(f"device: {describe_device(device)}")
    n_train, n_valid = int(images.counts["train"].sum()), int(images.counts["valid"].sum())
    log(
        f"task {cfg.task}: {len(images.classes)} classes {images.classes}, {n_train} train / {n_valid} valid images"
    )
    arch = r.arch
    aux = " with auxiliary loss" if r.aux else ""
    if arch.aux_features and cfg.recipe == "paper" and not aux:
        aux = f" without auxiliary classifier (it needs {arch.aux_min_size}px)"
    start = (
        f"pretrained weights ({arch.weights.where()})"
        if cfg.pretrained
        else "random init (--no-pretrained)"
    )
    bn = ", body in eval mode (--freeze-bn)" if cfg.freeze_bn else ""
    log(f"{cfg.arch} ({arch.source}) {cfg.mode}{bn} ({cfg.recipe} recipe){aux}, {r.size}px")
    log(f"{cfg.epochs} epochs from {start}")


def audit_counts(cfg: RunConfig, images: dataloaders.TaskImages, log) -> dict | None:
    """The audit's fast part before training (fingerprints cached per file): its counts for
    the run's metrics, and one warning line when the split leaks or labels conflict. None: --no-audit."""
    if not cfg.audit:
        return None
    counts = checks.audit_task(cfg.task_dir, images.files).counts()
    line = checks.warning_line(counts)
    if line:
        log(line.replace("TASK", cfg.task))
    return counts


class DistributedDL(fastai.distributed.DistributedDL):
    """fastai's DistributedDL, also for CPU processes: fastai broadcasts the batch order as a CUDA
    tensor (NCCL needs one); with gloo (processes on CPUs) it must stay on the CPU."""

    def _broadcast(self, t, rank):
        if torch.distributed.get_backend() == "nccl":
            return super()._broadcast(t, rank)
        t = torch.tensor(t, dtype=torch.long)
        torch.distributed.broadcast(t, rank)
        return t.tolist()


class DistributedTrainer(fastai.distributed.DistributedTrainer):
    """fastai's DistributedTrainer (accelerate's DDP) with the DistributedDL above."""

    def _wrap_dl(self, dl):
        return (
            dl
            if isinstance(dl, DistributedDL)
            else DistributedDL(dl, device=self.learn.model.device)
        )


@contextlib.contextmanager
def distributed(learn):
    """fastai's `distrib_ctx` when started by `accelerate launch` or `torchrun` (WORLD_SIZE > 1),
    else nothing: DDP through accelerate, each process reading its share of every epoch.

    BatchNorm is synchronised across GPUs (fastai's default); torch has no SyncBatchNorm on CPUs.
    """
    if num_distrib() <= 1:
        yield learn
        return
    on_cpu = learn.dls.device.type == "cpu"
    learn.add_cb(DistributedTrainer(sync_bn=not on_cpu, cpu=on_cpu))
    if rank_distrib():
        learn.remove_cb(ProgressCallback)
    try:
        yield learn
    finally:
        learn.detach_distributed()


def _train(learn, cfg: RunConfig, r: Resolved, lr: float, staging: Run | None, log) -> dict:
    """Fit, writing history.csv as it goes; ends with the best validation epoch's weights loaded.

    Returns extra metrics: with --cache-features, the seconds spent computing the cache."""
    extra = {}
    if cfg.cache_features:
        start = time.perf_counter()
        learn = features.head_learner(learn, cfg, r.aux, log)
        extra["feature_cache_seconds"] = time.perf_counter() - start
    # With cached features every process computes the same cache (same seed) and trains the same
    # head on its own, without gathering (training a Linear on cached outputs takes seconds, not
    # worth splitting); the main process's result is written. That keeps the processes in step.
    parallel = alone() if cfg.cache_features else distributed(learn)
    tracking = [KeepBest(monitor="valid_accuracy", comp=np.greater, reset_on_fit=False)]
    if staging is not None:  # the main process
        tracking.append(HistoryCallback(staging.history_csv))
    with learn.added_cbs(tracking), parallel:
        learner.fit(learn, cfg, lr)
    return extra


def _write_results(learn, images: dataloaders.TaskImages, run: Run, extra: dict, log=print) -> None:
    """Predictions, model.onnx (unless --no-onnx) and export.pkl (with their checksums), metrics and
    plots, into the staging folder. model.onnx comes first: it is what `predict` runs, and it needs
    no pickle."""
    paths = [Path(p).resolve() for p in learn.dls.valid_ds.items]
    preds = fastai_models.predictions(learn, learn.dls.valid, paths, with_labels=True)
    preds.to_csv(run.valid_predictions_csv, index=False)
    if run.config["onnx"]:
        export.write_onnx(learn, run.onnx, run.config)
    metrics = _metrics(run.history(), images, extra)
    error = _export_pickle(learn, run, log)
    if error:
        metrics["export_pkl_error"] = error
    metrics["checksums"] = runs.checksums([run.onnx, run.head, run.pickle])
    run.write_metrics(metrics)
    plots.render_run(run.path)


def _export_pickle(learn, run: Run, log) -> str:
    """Write fastai's export.pkl (for `--engine fastai` and `interpret`); '' or why it failed.

    On an H200 (torch 2.11, CUDA) fastai's pickler met a '_thread.RLock' it cannot pickle (cause not
    established), after the whole training. So a failed export is tried once more from the CPU, and
    if that fails too the run still completes with model.onnx, saying so, rather than being lost."""
    learn.path, learn.model_dir = run.path, "models"
    error = ""
    for attempt in ("as trained", "on the CPU"):
        try:
            if attempt == "on the CPU":
                learn.dls.cpu()
                learn.model.cpu()
            learn.export(run.pickle.name)
            return ""
        except Exception as e:  # a pickling error: TypeError, PicklingError, AttributeError...
            error = f"{type(e).__name__}: {e}".splitlines()[0]
            run.pickle.unlink(missing_ok=True)
    log(
        f"warning: export.pkl could not be written ({error}); model.onnx is complete and `predict` uses it"
    )
    return error


def check(cfg: RunConfig) -> tuple[Resolved, torch.device]:
    """Everything about `cfg` that can fail before any photo is read (arch, size, options, device,
    weights): a ReplicateError saying what to change. Returns the resolved arch (archs.resolve:
    passed down whole) and the device to train on."""
    r = archs.resolve(cfg)
    features.check(cfg)
    device = resolve_device(cfg.device)
    learner.check_precision(cfg.precision, device)
    return r, device


def run(
    cfg: RunConfig,
    log=print,
    images: dataloaders.TaskImages | None = None,
    audited: dict | None = None,
    checked: tuple[Resolved, torch.device] | None = None,
) -> Path:
    """Train one experiment and write its run folder; returns the folder.

    `images`, `audited`, `checked`: the task already scanned and audited, and `cfg` already checked
    (`check`): a compare does all three before its first cell. Under `accelerate launch` / `torchrun` every process calls this; they
    train data-parallel (each epoch's batches shared out, so the global batch is bs x processes)
    and only the main process writes the run folder."""
    if not is_main_process():
        log = _quiet
    r, device = checked or check(cfg)
    images = images or dataloaders.scan_task(cfg.task_dir)
    filters.check_positive(cfg.positive, images.classes, cfg.task)
    _describe(cfg, r, images, device, log)
    if is_main_process():
        runs.sweep(cfg.exports_dir / cfg.task, log)
        if audited is None:
            audited = audit_counts(cfg, images, log)
    set_seed(cfg.seed, reproducible=True)
    learn = learner.create_learner(
        dataloaders.dataloaders(images, cfg, r.preprocess, device), cfg, r
    )
    learn.recorder.train_metrics = True  # the study reports train accuracy per epoch too
    lr = learner.learning_rate(learn, cfg)
    log(f"learning rate {lr:.2e}" + learner.lr_source(cfg))
    staging = runs.Staging(cfg.run_dir) if is_main_process() else None  # the others train and wait
    try:
        if staging is not None:
            staging.run.write_config(_config_record(cfg, r, lr, device))
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        extra = {**_train(learn, cfg, r, lr, staging and staging.run, log), "audit": audited}
        if device.type == "cuda":
            extra["peak_gpu_memory_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
        if staging is not None:
            with alone():
                _write_results(learn, images, staging.run, extra, log)
                staging.publish()
    finally:
        if staging is not None:
            staging.discard()
    distrib_barrier()  # every process returns once the run folder is in place
    return cfg.run_dir


def _config_record(cfg: RunConfig, r: Resolved, lr: float, device) -> dict:
    """The run's config: the RunConfig, and what it resolved to on this machine."""
    return {
        **cfg.to_dict(),
        "task_dir": str(cfg.task_dir.resolve()),
        "size": r.size,
        "lr": lr,
        "aux_logits": r.aux,
        "workers": runtime.workers(cfg.workers),
        "processes": runtime.processes(),
        "device_used": describe_device(device),
        "arch_source": r.arch.source,
        # Where the starting weights came from, by source: torchvision (url, file), hub (repo,
        # file), package (package, version, file, sha256); None: random init.
        "weights": r.arch.weights.record(r.weights) if r.weights else None,
        "preprocess": r.record(),
        # The body's identity when it is the pretrained network untouched (models.body_record):
        # runs with the same key share one body pass in `predict`.
        "body": learner.body_record(cfg, r),
        "environment": environment(),
    }


def summary(run_dir: Path) -> str:
    """The lines a finished run ends with: its accuracy, time and folder."""
    m = runs.Run(run_dir).metrics
    return (
        f"\nbest valid accuracy {m['best_valid_accuracy']:.2%} at epoch {m['best_epoch']} "
        f"(last {m['last_valid_accuracy']:.2%}); {m['train_seconds']:.0f}s, "
        f"{m['train_images_per_second']:.1f} train images/s\nresults: {run_dir}"
    )


def main(cfg: RunConfig, quantize: bool = False, log=print) -> Path:
    """`replicate run`: train, then with `quantize` write model.int8.onnx, and say the result."""
    run_dir = run(cfg, log=log)
    if quantize and is_main_process():
        export.quantize_run(run_dir, log=log)
    log(summary(run_dir))
    return run_dir
