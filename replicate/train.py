"""One experiment -> one self-describing run folder.

    replicate run rooms --arch resnet18 --no-pretrained --epochs 1 --size 64

`run(cfg)` checks the data, builds the learner, trains with fastai's `fit` (constant LR),
keeps the weights of the best validation epoch and writes exports/TASK/ARCH-MODE/:
config.json, history.csv, metrics.json, valid_predictions.csv, export.pkl and the plots.
The folder is built under a hidden name and renamed when complete, so a crash never
leaves a half-written folder that looks finished.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from fastai.callback.core import Callback
import fastai.callback.progress  # noqa: F401  (registers the progress bar and Learner.no_bar)
from fastai.callback.tracker import SaveModelCallback, TrackerCallback
from fastai.torch_core import set_seed

from . import data, features, models, report
from .data import sha256_file
from .config import RunConfig, environment
from .errors import ReplicateError


def resolve_device(name: str) -> torch.device:
    """'auto' -> CUDA when present else CPU; 'cuda' without CUDA is a ReplicateError."""
    if name not in ("auto", "cpu", "cuda"):
        raise ReplicateError(f"unknown device {name!r}: use auto, cpu or cuda")
    if name == "cuda" and not torch.cuda.is_available():
        raise ReplicateError(f"--device cuda, but torch {torch.__version__} sees no CUDA GPU "
                             f"(check nvidia-smi and CUDA_VISIBLE_DEVICES), or use --device cpu")
    return torch.device("cuda" if name != "cpu" and torch.cuda.is_available() else "cpu")


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"cpu ({torch.get_num_threads()} threads)"


class KeepBest(SaveModelCallback):
    """fastai's SaveModelCallback without its "Better model found at epoch N" line: fastai counts
    epochs from 0 (and anew in each fit of fine_tune), history.csv from 1; the summary names the epoch."""

    def after_epoch(self):
        TrackerCallback.after_epoch(self)
        if self.new_best:
            self._save(self.fname)


class HistoryCallback(Callback):
    """Writes one history.csv row per epoch, as soon as the epoch ends.

    fastai's CSVLogger records time as "mm:ss" and the Recorder's train loss is an
    exponentially smoothed running value; the study reports the epoch's mean train loss,
    and images per second need real seconds with training timed apart from validation.
    """

    order = 55  # after Recorder (50) has logged the epoch, before SaveModelCallback (61)

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
        row = {"epoch": len(self.rows) + 1, **{n: float(v) for n, v in zip(names, self.recorder.values[-1])}}
        row["train_loss"] = self.loss_sum / max(1, self.n_seen)
        row["seconds"] = time.time() - self.recorder.start_epoch
        row["train_seconds"] = self.train_seconds
        self.rows.append(row)
        pd.DataFrame(self.rows).to_csv(self.path, index=False)


def valid_predictions(learn) -> pd.DataFrame:
    """One row per validation image: path, actual, predicted, probability, loss, p_<class>..."""
    probs, targs, losses = learn.get_preds(ds_idx=1, with_loss=True)
    vocab = list(learn.dls.vocab)
    pred = probs.argmax(dim=1)
    frame = pd.DataFrame({
        "path": [str(Path(p).resolve()) for p in learn.dls.valid_ds.items],
        "actual": [vocab[i] for i in targs.tolist()],
        "predicted": [vocab[i] for i in pred.tolist()],
        "probability": probs.max(dim=1).values.numpy(),
        "loss": losses.numpy(),
    })
    for i, c in enumerate(vocab):
        frame[f"p_{c}"] = probs[:, i].numpy()
    return frame


def _metrics(history: pd.DataFrame, images: data.TaskImages, extra: dict) -> dict:
    """metrics.json. Time spent caching features counts as training time, in seconds and images/s."""
    best = history.loc[history["valid_accuracy"].idxmax()]
    n_train = int(images.counts["train"].sum())
    cache_seconds = extra.get("feature_cache_seconds", 0.0)
    return {
        **extra,
        "best_valid_accuracy": float(best["valid_accuracy"]),
        "best_epoch": int(best["epoch"]),
        "last_valid_accuracy": float(history["valid_accuracy"].iloc[-1]),
        "train_seconds": float(history["seconds"].sum()) + cache_seconds,
        "train_images_per_second": n_train * len(history) / (float(history["train_seconds"].sum()) + cache_seconds),
        "n_train": n_train,
        "n_valid": int(images.counts["valid"].sum()),
        "classes": images.classes,
        "epochs_run": len(history),
        "skipped_images": [str(p) for p in images.skipped],
    }


def _publish(staging: Path, run_dir: Path) -> None:
    """Move the finished staging folder into place, replacing an earlier run of the same name."""
    old = None
    if run_dir.exists():
        old = run_dir.with_name(f".{run_dir.name}.old-{os.getpid()}")
        run_dir.rename(old)
    staging.rename(run_dir)
    if old is not None:
        shutil.rmtree(old)


def _describe(cfg: RunConfig, arch: models.Arch, size: int, images: data.TaskImages, device, log) -> None:
    """Say at the start what is about to be trained, on what, and where."""
    for path in images.skipped:
        log(f"warning: skipping unreadable image {path}")
    log(f"device: {describe_device(device)}")
    log(f"task {cfg.task}: {len(images.classes)} classes {images.classes}, "
        f"{int(images.counts['train'].sum())} train / {int(images.counts['valid'].sum())} valid images")
    aux = " with auxiliary loss" if models.uses_aux(arch, size, cfg.recipe) else ""
    if arch.aux_features and cfg.recipe == "paper" and not aux:
        aux = f" without auxiliary classifier (it needs {arch.aux_min_size}px)"
    log(f"{cfg.arch} {cfg.mode} ({cfg.recipe} recipe){aux}, {size}px, {cfg.epochs} epochs, "
        f"{'ImageNet weights' if cfg.pretrained else 'random init (--no-pretrained)'}")


def _train(learn, cfg: RunConfig, lr: float, staging: Path, log) -> dict:
    """Fit, writing history.csv as it goes; ends with the best validation epoch's weights loaded.

    Returns extra metrics: with --cache-features, the seconds spent computing the cache."""
    extra = {}
    if cfg.cache_features:
        start = time.perf_counter()
        learn = features.head_learner(learn, cfg, log)
        extra["feature_cache_seconds"] = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as weights_dir:
        learn.model_dir = Path(weights_dir)  # best-epoch checkpoints: scratch, export.pkl keeps them
        tracking = [HistoryCallback(staging / "history.csv"),
                    KeepBest(monitor="valid_accuracy", comp=np.greater, fname="best", reset_on_fit=False)]
        with learn.added_cbs(tracking):
            models.fit(learn, cfg, lr)
    return extra


def _write_results(learn, images: data.TaskImages, staging: Path, extra: dict) -> None:
    """Predictions, export (with its checksum), metrics and plots, into the staging folder."""
    valid_predictions(learn).to_csv(staging / "valid_predictions.csv", index=False)
    learn.path, learn.model_dir = staging, "models"
    learn.export("export.pkl")
    metrics = _metrics(pd.read_csv(staging / "history.csv"), images, extra)
    metrics["export_sha256"] = sha256_file(staging / "export.pkl")
    (staging / "metrics.json").write_text(json.dumps(metrics, indent=2))
    report.render_run(staging)


def run(cfg: RunConfig, log=print, images: data.TaskImages | None = None) -> Path:
    """Train one experiment and write its run folder; returns the folder.

    `images`: the task already scanned (a compare scans once for all its cells)."""
    arch = models.get_arch(cfg.arch)
    size = models.input_size(cfg)
    features.check(cfg)
    device = resolve_device(cfg.device)
    if cfg.pretrained:
        models.ensure_weights(arch)  # fail on missing weights before any data is read
    images = images or data.scan_task(cfg.task_dir)
    _describe(cfg, arch, size, images, device, log)
    set_seed(cfg.seed, reproducible=True)
    learn = models.create_learner(data.dataloaders(images, cfg, size, device), cfg)
    learn.recorder.train_metrics = True  # the study reports train accuracy per epoch too
    lr = models.learning_rate(learn, cfg)
    log(f"learning rate {lr:.2e}" + (" (lr_find)" if cfg.recipe == "fastai" and cfg.lr is None else ""))

    cfg.run_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{cfg.run_dir.name}.partial-", dir=cfg.run_dir.parent))
    staging.chmod(0o755)  # mkdtemp makes it private; the published run folder should not be
    try:
        config = {**cfg.to_dict(), "task_dir": str(cfg.task_dir.resolve()), "size": size, "lr": lr,
                  "aux_logits": models.uses_aux(arch, size, cfg.recipe), "workers": data.workers(cfg),
                  "device_used": describe_device(device), "environment": environment()}
        (staging / "config.json").write_text(json.dumps(config, indent=2))
        extra = _train(learn, cfg, lr, staging, log)
        _write_results(learn, images, staging, extra)
        _publish(staging, cfg.run_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return cfg.run_dir


def demo_config(data_dir: Path, exports_dir: Path) -> tuple[RunConfig, str]:
    """The demo run for this machine, and a sentence saying what was chosen and why.

    On a GPU with ImageNet weights: the study's protocol (resnet18, finetuned, 30 epochs, 224 px).
    On a CPU: 5 epochs at 128 px, so it ends in minutes. Without weights: from scratch, said plainly.
    """
    device = resolve_device("auto")
    try:
        models.ensure_weights(models.get_arch("resnet18"))
        pretrained, why = True, "ImageNet weights found"
    except ReplicateError as e:
        pretrained, why = False, f"{e}; training from scratch instead"
    base = dict(task="rooms", arch="resnet18", unfreeze=True, pretrained=pretrained,
                data_dir=data_dir, exports_dir=exports_dir)
    if device.type == "cuda":
        return RunConfig(**base), f"demo: GPU, the study's protocol (30 epochs, 224 px). {why}."
    return RunConfig(**base, epochs=5, size=128), f"demo: no GPU, so a short run (5 epochs, 128 px). {why}."
