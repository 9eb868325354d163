"""A run's configuration -> a fastai Learner set up as in the 2019 study (or fastai's recipe), and
the fit that trains it.

    python -c "from replicate.models import learner; help(learner.create_learner)"

The registry of backbones is `archs`; `archs.resolve` turns a configuration into what it trains
with, once, and `create_learner` builds from that. The paper recipe: the network minus its last
Linear, a new Linear, SGD with momentum through `opt_func`, constant LR (`fit`), frozen or not.
The `fastai` recipe (`--recipe fastai`): fastai's default head on the conv body, Adam, one-cycle.
"""

from __future__ import annotations

import hashlib
import json
from functools import partial

import fastai.callback.channelslast  # noqa: F401  (Learner.to_channelslast)
import fastai.callback.fp16  # noqa: F401  (Learner.to_fp16, to_bf16)
import fastai.callback.schedule  # noqa: F401  (Learner.fit_one_cycle, fine_tune, lr_find)
import torch
from fastai.callback.core import Callback, TrainEvalCallback
from fastai.callback.progress import ProgressCallback
from fastai.learner import Learner
from fastai.metrics import AccumMetric, accuracy
from fastai.optimizer import SGD
from fastai.vision.learner import default_split, model_meta, vision_learner
from torch import nn

from .. import runtime
from ..config import RunConfig
from ..errors import ReplicateError
from . import archs, weights
from .archs import Resolved
from .backbones import Backbone

# Module-level classes: an exported learner pickles them by name (replicate.models.learner.X).


class MainAuxHead(nn.Module):
    """Inception v3's new classifiers: main `fc`, and `aux_fc` for the auxiliary branch (training only)."""

    def __init__(self, n_features: int, n_aux_features: int | None, n_out: int):
        super().__init__()
        self.fc = nn.Linear(n_features, n_out)
        self.aux_fc = nn.Linear(n_aux_features, n_out) if n_aux_features else None

    def forward(self, x):
        # torchvision's InceptionOutputs(logits, aux_logits), train mode only
        if isinstance(x, tuple):
            return self.fc(x[0]), self.aux_fc(x[1])
        return self.fc(x)


class EvalBody(Callback):
    """--freeze-bn: the frozen body runs in eval mode while the new layer trains, as at inference.

    fastai (like the PyTorch tutorial the study followed) puts the whole model in train mode every
    epoch, so a frozen body's BatchNorm normalises by batch statistics and updates its running ones,
    and AlexNet/VGG's kept dropout layers drop. Here the body (`model[0]`) goes back to eval mode
    right after: its BatchNorm uses and keeps the pretrained statistics, dropout is off; a linear
    probe, fastai's `BnFreeze` and timm's `freeze_batch_norm_2d` do the same for BatchNorm."""

    order = TrainEvalCallback.order + 1

    def before_train(self):
        self.learn.model[0].eval()


class AuxLossCallback(Callback):
    """Adds `weight` x the auxiliary classifier's loss during training (Inception v3).

    fastai has no hook for a second model output, so: split the (main, aux) prediction after
    the forward pass, let fastai compute the main loss, then add the auxiliary term.
    """

    def __init__(self, weight: float = 0.4):
        self.weight = weight

    def after_pred(self):
        self.aux = None
        if isinstance(self.learn.pred, tuple):
            self.learn.pred, self.aux = self.learn.pred

    def after_loss(self):
        if self.aux is not None and len(self.learn.yb):
            aux_loss = self.learn.loss_func(self.aux, *self.learn.yb)
            self.learn.loss_grad = self.learn.loss_grad + self.weight * aux_loss
            self.learn.loss = self.learn.loss_grad.clone()


# --- the learner -------------------------------------------------------------------------------


def epoch_accuracy() -> AccumMetric:
    """fastai's `accuracy`, computed once over the epoch's gathered predictions.

    fastai's default wraps it in a running mean of per-batch values, which under `accelerate
    launch` also counts the images fastai's DistributedDL repeats to split a set evenly across
    processes (9 valid images on 2 processes: 10 counted); gathered predictions are unpadded.
    """
    return AccumMetric(accuracy, flatten=False)


def body_record(cfg: RunConfig, r: Resolved) -> dict | None:
    """What a run's body is, when training left it the pretrained network exactly (a frozen paper
    run with --freeze-bn: BatchNorm in eval mode, so not one tensor moved): the arch, the SHA-256
    of the weights file loaded, the preprocessing, and `key`, equal for two runs exactly when
    their bodies are the same tensors fed the same input, so `predict` runs such a body once for
    all their heads. None for a body that trained (finetuning, the study's train-mode BatchNorm,
    the fastai recipe) or started from random weights: it is the run's own."""
    if cfg.unfreeze or not cfg.freeze_bn or cfg.recipe != "paper" or r.loadable is None:
        return None
    record = {
        "arch": r.arch.name,
        "weights_sha256": weights.sha256_now(r.loadable),
        "preprocess": r.record(),
        "frozen_eval": True,
    }
    key = hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()
    return {**record, "key": key}


def create_learner(dls, cfg: RunConfig, r: Resolved) -> Learner:
    """A fastai Learner for `cfg.recipe`, built from the resolved arch `r`, frozen or not, ready
    for `fit(learn, cfg, lr)`.

    It trains in channels-last memory layout (fastai's ChannelsLast): the same arithmetic, about
    8-10% faster per batch on this project's CPU for every arch but VGG (no change), and what
    mixed precision on a GPU's tensor cores wants. `cfg.precision` bf16/fp16 adds fastai's
    MixedPrecision (CUDA only; `train.run` refuses it on a CPU).
    """
    if cfg.recipe == "fastai":
        learn = _fastai_learner(dls, cfg, r)
    elif cfg.recipe == "paper":
        learn = _paper_learner(dls, cfg, r)
    else:
        raise ReplicateError(f"unknown recipe {cfg.recipe!r}: use paper or fastai")
    if cfg.unfreeze:
        learn.unfreeze()
    else:
        learn.freeze()
    learn.to_channelslast(use_amp=False)
    if cfg.precision == "bf16":
        learn.to_bf16()
    elif cfg.precision == "fp16":
        learn.to_fp16()
    return plain_log(learn)


def plain_log(learn: Learner) -> Learner:
    """On a terminal, fastai's progress bars; written to a file or a pipe, one plain line per epoch
    instead (fastprogress would write every bar frame, carriage returns and all)."""
    if not runtime.on_terminal():
        learn.remove_cb(ProgressCallback)
        learn.logger = _no_log
        learn.add_cb(EpochLines())
    return learn


def _no_log(*args, **kwargs) -> None:
    """fastai's Recorder prints each epoch's values as a list; EpochLines says them instead."""


class EpochLines(Callback):
    """One line per epoch of training, `epoch 3/30: train_loss 0.412 ... valid_accuracy 0.902
    (00:12)`, for a log that is not a terminal (see `plain_log`); the main process only. Not for
    the epoch `get_preds` wraps its predictions in (fastai sends it before_fit, before_epoch and
    after_epoch too): only an epoch that trained is said, and none while fastai's `no_logging`
    silences the learner (lr_find's trial epochs)."""

    order = 60  # after the Recorder (50) has the epoch's values
    trained = False

    def before_epoch(self):
        self.trained = False

    def before_train(self):
        self.trained = True

    def after_epoch(self):
        if not self.trained or self.learn.logger is not _no_log or not runtime.is_main_process():
            return
        names = self.recorder.metric_names[1:-1]  # without 'epoch' and 'time'
        values = " ".join(_value(n, v) for n, v in zip(names, self.recorder.log[1:-1]))
        print(
            f"epoch {self.epoch + 1}/{self.n_epoch}: {values} ({self.recorder.log[-1]})", flush=True
        )


def _value(name: str, value) -> str:
    return f"{name} {value:.4g}" if isinstance(value, int | float) else f"{name} {value}"


def check_precision(precision: str, device: torch.device) -> None:
    """ReplicateError unless `precision` can run on `device`."""
    if precision not in ("fp32", "bf16", "fp16"):
        raise ReplicateError(f"unknown precision {precision!r}: use fp32, bf16 or fp16")
    if precision != "fp32" and device.type != "cuda":
        raise ReplicateError(
            f"--precision {precision} needs a CUDA GPU (fastai's mixed precision is CUDA-only, "
            f"and few CPUs compute bf16 fast): use --precision fp32 on a CPU"
        )


def _paper_learner(dls, cfg: RunConfig, r: Resolved) -> Learner:
    """The study's model and optimizer.

    SGD with momentum and no weight decay through `opt_func`; constant LR (`fit`, not one-cycle).
    Frozen mode trains only the new layer(s): `train_bn=False` keeps fastai from training
    the frozen BatchNorm weights, which the study does not do either. The frozen body runs in
    train mode, as in the study, unless `cfg.freeze_bn` (EvalBody).
    """
    arch, n_out = r.arch, len(dls.vocab)
    if arch.aux_features:
        head = MainAuxHead(arch.n_features, arch.aux_features if r.aux else None, n_out)
    else:
        head = nn.Linear(arch.n_features, n_out)
    size = r.size if arch.fixed_input_size else None
    backbone = Backbone(arch.name, aux_logits=r.aux, size=size, weights=r.loadable)
    model_meta[backbone] = {"cut": arch.cut, "split": default_split}
    aux_loss = [AuxLossCallback(cfg.aux_loss_weight)] if r.aux else []
    return vision_learner(
        dls,
        backbone,
        pretrained=cfg.pretrained,
        custom_head=head,
        init=None,  # keep PyTorch's default init of the new Linear, as in the study
        normalize=False,  # the arch's normalisation is already in the DataBlock's batch transforms
        opt_func=partial(SGD, mom=cfg.momentum),
        lr=cfg.lr or 1e-3,
        wd=0.0,
        metrics=epoch_accuracy(),
        train_bn=False,
        cbs=aux_loss + ([EvalBody()] if cfg.freeze_bn else []),
    )


def _fastai_learner(dls, cfg: RunConfig, r: Resolved) -> Learner:
    """fastai's recommended transfer learning: its default head (concat pooling, BatchNorm,
    dropout, two Linear layers) on the conv body, Adam with weight decay, BatchNorm trained
    while frozen (`train_bn=True`), one-cycle schedules (see `fit`). timm models go through
    fastai's own timm support (`vision_learner` given the model's name)."""
    arch = r.arch
    if arch.source == "timm":
        kwargs = archs.timm_kwargs(arch, r.size, r.loadable)
        return vision_learner(
            dls,
            arch.name,
            pretrained=cfg.pretrained,
            normalize=False,
            metrics=epoch_accuracy(),
            **kwargs,
        )
    backbone = Backbone(arch.name, aux_logits=False, recipe="fastai", weights=r.loadable)
    model_meta[backbone] = {"cut": arch.fastai_cut, "split": default_split}
    return vision_learner(
        dls, backbone, pretrained=cfg.pretrained, normalize=False, metrics=epoch_accuracy()
    )


# The fastai recipe's rate from random init: one-cycle's peak for every layer. fastai's own
# from-scratch examples (Imagenette) train at 1e-3 to 8e-3 with Adam; 3e-3 reached 81.6% on Houses
# rooms in 15 epochs (resnet18, 128 px). lr_find's valley is tuned for a pretrained body's head.
FROM_SCRATCH_LR = 3e-3


def learning_rate(learn: Learner, cfg: RunConfig) -> float:
    """--lr, else 0.001 (paper), or for the fastai recipe FROM_SCRATCH_LR from random init and the
    `lr_find` valley suggestion from pretrained weights."""
    if cfg.lr is not None:
        return cfg.lr
    if cfg.recipe == "paper":
        return 1e-3
    if not cfg.pretrained:
        return FROM_SCRATCH_LR
    with learn.no_logging():
        return float(learn.lr_find(show_plot=False).valley)


def lr_source(cfg: RunConfig) -> str:
    """Where the learning rate came from, for the log: '' when given or the paper's."""
    if cfg.lr is not None or cfg.recipe == "paper":
        return ""
    return " (lr_find)" if cfg.pretrained else " (the fastai recipe's rate from random init)"


def fit(learn: Learner, cfg: RunConfig, lr: float) -> None:
    """Train for `cfg.epochs` epochs in all: constant LR (paper); one-cycle (fastai).

    Finetuning a pretrained network with the fastai recipe is fastai's `fine_tune`: one epoch of
    the new head alone, then every layer with the body at lower rates. From random init there is
    nothing to protect in the body, so every layer trains from the first step at one rate."""
    if cfg.recipe == "paper":
        learn.fit(cfg.epochs, lr)
    elif cfg.unfreeze and cfg.pretrained and cfg.epochs > 1:
        learn.fine_tune(cfg.epochs - 1, base_lr=lr, freeze_epochs=1)
    else:
        learn.fit_one_cycle(cfg.epochs, lr)
