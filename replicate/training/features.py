"""--cache-features K: a frozen run computes its frozen body's outputs once, then trains only the head.

    replicate run rooms --arch resnet18 --cache-features 3

In a frozen (feature extraction) run the body never changes, yet an uncached run pushes every
photo through it in every epoch, which is nearly all of the run's time. Here the body runs K
times over the training set (K augmented views: random crop and flip, as an uncached epoch
draws them) and once over the validation set; the new layer then trains for all epochs on
those tensors, epoch e on view e mod K. What changes against an uncached run: the augmentations
come from K fixed draws instead of a fresh one per epoch; the run's config (`cache_features`), the
run folder's name (`-cachedK`) and the report say so. The exported learner is the whole
network (body + trained head) and predicts from photos like any other export.
"""

from __future__ import annotations

import torch
from fastai.callback.core import Callback
from fastai.data.core import DataLoaders
from fastai.data.load import DataLoader
from fastai.learner import Learner

from .. import runtime
from ..config import RunConfig
from ..errors import ReplicateError
from ..models import learner


def check(cfg: RunConfig) -> None:
    """--cache-features is for frozen runs of the paper recipe; ReplicateError otherwise."""
    if cfg.cache_features < 0:
        raise ReplicateError(
            f"--cache-features {cfg.cache_features}: give a number of views (1 or more), or 0 for none"
        )
    if cfg.cache_features and (cfg.unfreeze or cfg.recipe != "paper"):
        raise ReplicateError(
            "--cache-features needs a frozen run of the paper recipe: finetuning changes the "
            "body every step, and the fastai recipe trains the body's BatchNorm while frozen"
        )


class CachedViews(torch.utils.data.Dataset):
    """Body outputs for K views of a split; `view` picks the one the current epoch reads."""

    def __init__(self, views: list, targets: list[torch.Tensor]):
        self.views, self.targets, self.view = views, targets, 0

    def __len__(self):
        return len(self.targets[self.view])

    def __getitem__(self, i):
        x = self.views[self.view]
        return (tuple(t[i] for t in x) if isinstance(x, tuple) else x[i]), self.targets[self.view][
            i
        ]


class NextView(Callback):
    """Epoch e trains on view e mod K."""

    def __init__(self, views: CachedViews):
        self.views = views

    def before_epoch(self):
        self.views.view = self.epoch % len(self.views.views)


def body_outputs(body: torch.nn.Module, dl, train: bool, what: str) -> tuple:
    """One pass of `dl` through `body` without gradients: (outputs, targets) on the CPU.

    fastai's `get_preds` runs the model in eval mode; a frozen paper run trains with the body in
    train mode (BatchNorm on batch statistics, dropout in AlexNet/VGG's kept classifier layers),
    so the training views are computed that way (in eval mode with --freeze-bn, as such a run
    trains), and the validation view in eval mode, as fastai validates. Outputs are a tuple
    (main, auxiliary) for Inception v3 with its auxiliary branch.
    """
    body.train(train)
    outputs, targets = [], []
    with torch.no_grad():
        for xb, yb in runtime.progress(dl, len(dl), what, unit="batches"):
            out = body(xb)
            parts = tuple(out) if isinstance(out, tuple) else (out,)
            outputs.append([p.as_subclass(torch.Tensor).float().cpu() for p in parts])
            targets.append(yb.as_subclass(torch.Tensor).cpu())
    columns = [torch.cat(c) for c in zip(*outputs)]
    return (tuple(columns) if len(columns) > 1 else columns[0]), torch.cat(targets)


def head_learner(learn: Learner, cfg: RunConfig, aux: bool, log) -> Learner:
    """A Learner that trains `learn`'s head (the same module) on cached body outputs.

    Its optimizer, loss and metrics are `learn`'s; after fitting it, `learn` holds the trained
    head and is exported as usual. `aux`: Inception v3's auxiliary classifier trains too.
    """
    body, head = learn.model[0], learn.model[1]
    # as fastai's ChannelsLast does when a fit starts; caching is no fit
    if hasattr(learn, "channels_last"):
        learn.model.to(memory_format=torch.channels_last)
    log(
        f"caching features: {cfg.cache_features} augmented view(s) of {len(learn.dls.train_ds)} train "
        f"and 1 of {len(learn.dls.valid_ds)} valid images through the frozen body"
    )
    train = [
        body_outputs(body, learn.dls.train, not cfg.freeze_bn, f"view {k + 1}/{cfg.cache_features}")
        for k in range(cfg.cache_features)
    ]
    valid = body_outputs(body, learn.dls.valid, False, "valid")
    train_views = CachedViews([x for x, _ in train], [y for _, y in train])
    dls = DataLoaders(
        DataLoader(train_views, bs=cfg.bs, shuffle=True, drop_last=learn.dls.train.drop_last),
        DataLoader(CachedViews([valid[0]], [valid[1]]), bs=learn.dls.valid.bs),
        device=learn.dls.device,
    )
    cbs = [NextView(train_views)] + ([learner.AuxLossCallback(cfg.aux_loss_weight)] if aux else [])
    head_learn = Learner(
        dls,
        head,
        loss_func=learn.loss_func,
        opt_func=learn.opt_func,
        lr=learn.lr,
        wd=learn.wd,
        metrics=learner.epoch_accuracy(),
        cbs=cbs,
    )
    head_learn.recorder.train_metrics = True
    return learner.plain_log(head_learn)
