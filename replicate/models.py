"""Architecture registry: arch name -> a fastai `vision_learner` set up as in the 2019 study.

    python -m replicate.models        # lists the registry

Each entry knows its torchvision constructor and ImageNet weights, its input size, how to
cut the network into (pretrained body, new classifier) and which parameters are "new".
The study (after the PyTorch tutorial "Finetuning Torchvision Models") replaces only the
network's own last Linear layer, so the body here is the whole network minus that layer,
not fastai's default cut-at-the-pooling-layer with a new two-layer head. The `fastai` recipe
(`--recipe fastai`) is that default, for comparison. A new backbone is one entry in `ARCHS`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable
from urllib.parse import urlparse

import fastai.callback.channelslast  # noqa: F401  (Learner.to_channelslast)
import fastai.callback.fp16  # noqa: F401  (Learner.to_fp16, to_bf16)
import fastai.callback.schedule  # noqa: F401  (Learner.fit_one_cycle, fine_tune, lr_find)
import torch
import torchvision.models as tvm
from fastai.callback.core import Callback
from fastai.learner import Learner
from fastai.metrics import AccumMetric, accuracy
from fastai.optimizer import SGD
from fastai.vision.learner import default_split, model_meta, vision_learner
from torch import nn

from .config import RunConfig
from .errors import ReplicateError


# --- cutting each torchvision network into (body, new classifier) --------------------------
# Module-level functions, not lambdas: an exported learner pickles them by name.

def _cut_resnet(model: nn.Module) -> nn.Module:
    """Everything before `fc` (conv layers and global average pool), then flatten."""
    return nn.Sequential(*list(model.children())[:-1], nn.Flatten())


def _cut_classifier6(model: nn.Module) -> nn.Module:
    """AlexNet / VGG: features, pool, and the pretrained `classifier[0:6]`; drops `classifier[6]`."""
    return nn.Sequential(model.features, model.avgpool, nn.Flatten(), *list(model.classifier)[:-1])


def _cut_densenet(model: nn.Module) -> nn.Module:
    """DenseNet's forward() applies ReLU and pooling outside its modules; spell them out."""
    return nn.Sequential(model.features, nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1), nn.Flatten())


def _cut_inception(model: nn.Module) -> nn.Module:
    """Inception v3 keeps its own forward (the auxiliary branch lives inside it).

    Both `fc` and the auxiliary classifier's `fc` become Identity; their replacements live
    in `MainAuxHead`, so every new layer is in the head and fastai's default split applies.
    """
    model.fc = nn.Identity()
    if model.AuxLogits is not None:
        model.AuxLogits.fc = nn.Identity()
    return model


def _features(model: nn.Module) -> nn.Module:
    """The convolutional feature extractor (AlexNet, VGG, DenseNet): what fastai's own recipe keeps."""
    return model.features


def _resnet_features(model: nn.Module) -> nn.Module:
    """ResNet without pooling and `fc`, as fastai cuts it (`model_meta` cut -2)."""
    return nn.Sequential(*list(model.children())[:-2])


def _inception_features(model: nn.Module) -> nn.Module:
    """Inception v3's main path up to Mixed_7c. fastai has no meta for it, and its default
    cut would keep the auxiliary branch inline, in the main path."""
    keep = []
    for name, child in model.named_children():
        if name == "avgpool":
            break
        if name != "AuxLogits":
            keep.append(child)
    return nn.Sequential(*keep)


class MainAuxHead(nn.Module):
    """Inception v3's new classifiers: main `fc`, and `aux_fc` for the auxiliary branch (training only)."""

    def __init__(self, n_features: int, n_aux_features: int | None, n_out: int):
        super().__init__()
        self.fc = nn.Linear(n_features, n_out)
        self.aux_fc = nn.Linear(n_aux_features, n_out) if n_aux_features else None

    def forward(self, x):
        if isinstance(x, tuple):  # torchvision's InceptionOutputs(logits, aux_logits), train mode only
            return self.fc(x[0]), self.aux_fc(x[1])
        return self.fc(x)


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


# --- the registry ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Arch:
    """One backbone: how to build it, its input size, and how its classifier is replaced."""

    name: str
    constructor: Callable[..., nn.Module]
    weights: str  # torchvision weights enum member, e.g. "ResNet18_Weights.IMAGENET1K_V1"
    input_size: int
    min_size: int  # smallest square input the network accepts
    n_features: int  # inputs of the replaced last Linear
    cut: Callable[[nn.Module], nn.Module]  # the network without its last Linear (paper recipe)
    fastai_cut: Callable[[nn.Module], nn.Module]  # the conv body fastai's own head goes on (fastai recipe)
    aux_features: int | None = None  # Inception v3: inputs of the auxiliary classifier's Linear
    aux_min_size: int | None = None  # ... which needs at least this input size


ARCHS: dict[str, Arch] = {a.name: a for a in [
    # IMAGENET1K_V1 everywhere: the weights torchvision shipped in 2019 (PyTorch 1.0), as in the study.
    Arch("resnet18", tvm.resnet18, "ResNet18_Weights.IMAGENET1K_V1", 224, 32, 512, _cut_resnet, _resnet_features),
    Arch("alexnet", tvm.alexnet, "AlexNet_Weights.IMAGENET1K_V1", 224, 63, 4096, _cut_classifier6, _features),
    Arch("vgg11_bn", tvm.vgg11_bn, "VGG11_BN_Weights.IMAGENET1K_V1", 224, 32, 4096, _cut_classifier6, _features),
    Arch("densenet121", tvm.densenet121, "DenseNet121_Weights.IMAGENET1K_V1", 224, 32, 1024, _cut_densenet, _features),
    Arch("inception_v3", tvm.inception_v3, "Inception_V3_Weights.IMAGENET1K_V1", 299, 75, 2048,
         _cut_inception, _inception_features, aux_features=768, aux_min_size=299),
]}


def get_arch(name: str) -> Arch:
    """The registry entry for `name`, or a ReplicateError listing the choices."""
    if name not in ARCHS:
        raise ReplicateError(f"unknown arch {name!r}: choose one of {', '.join(ARCHS)}")
    return ARCHS[name]


def input_size(cfg: RunConfig) -> int:
    """The run's square input size: --size, else the architecture's own; checked against its minimum."""
    arch = get_arch(cfg.arch)
    size = cfg.size or arch.input_size
    if size < arch.min_size:
        raise ReplicateError(f"--size {size} is too small for {arch.name}: use at least {arch.min_size}")
    return size


def uses_aux(arch: Arch, size: int, recipe: str = "paper") -> bool:
    """Inception v3 trains with its auxiliary classifier (paper recipe) where the input is large enough."""
    return recipe == "paper" and arch.aux_features is not None and size >= arch.aux_min_size


# --- pretrained weights, from the torch hub cache, downloaded only when missing --------------

def weights_path(arch: Arch) -> tuple[Path, str]:
    """(file in the torch hub cache, download URL) of an architecture's ImageNet weights."""
    url = tvm.get_weight(arch.weights).url
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(url).path).name, url


def ensure_weights(arch: Arch) -> Path:
    """The cached weights file, downloading it when absent; ReplicateError when it can't be had."""
    path, url = weights_path(arch)
    if path.is_file():
        return path
    hint = (f"pretrained weights for {arch.name} not found: put {path.name} (from {url}) in "
            f"{path.parent} (set TORCH_HOME to move the cache) or pass --no-pretrained")
    if os.environ.get("REPLICATE_OFFLINE") or os.environ.get("HF_HUB_OFFLINE"):
        raise ReplicateError(hint)
    try:
        torch.hub.download_url_to_file(url, str(path.with_suffix(".partial")), progress=True)
    except Exception as e:  # no network, proxy, DNS, HTTP errors: all end the same way for the user
        path.with_suffix(".partial").unlink(missing_ok=True)
        raise ReplicateError(f"{hint} (download failed: {e})") from None
    path.with_suffix(".partial").rename(path)
    return path


@dataclass(frozen=True)
class Backbone:
    """A picklable, hashable `arch` for fastai: `Backbone("resnet18")(pretrained=True)` -> torchvision network.

    fastai's `vision_learner` calls `arch(pretrained=...)` and looks up how to cut it in
    `fastai.vision.learner.model_meta` (it does not pass its own `cut` argument on for
    torchvision models), so each Backbone is registered there with its registry entry's cut.
    """

    name: str
    aux_logits: bool = True  # Inception v3 only
    recipe: str = "paper"  # which cut fastai applies: the study's (last Linear) or fastai's (conv body)

    def __call__(self, pretrained: bool = False) -> nn.Module:
        arch = get_arch(self.name)
        kwargs = {}
        if arch.aux_features:
            # transform_input: the ImageNet weights expect torchvision's own input rescaling.
            kwargs = dict(aux_logits=self.aux_logits, init_weights=not pretrained, transform_input=pretrained)
        model = arch.constructor(weights=None, **kwargs)
        if pretrained:
            state = torch.load(ensure_weights(arch), map_location="cpu", weights_only=True)
            if not self.aux_logits:
                state = {k: v for k, v in state.items() if not k.startswith("AuxLogits.")}
            model.load_state_dict(state)
        return model


# --- the learner -------------------------------------------------------------------------------

def epoch_accuracy() -> AccumMetric:
    """fastai's `accuracy`, computed once over the epoch's gathered predictions.

    fastai's default wraps it in a running mean of per-batch values, which under `accelerate
    launch` also counts the images fastai's DistributedDL repeats to split a set evenly across
    processes (9 valid images on 2 processes: 10 counted); gathered predictions are unpadded.
    """
    return AccumMetric(accuracy, flatten=False)


def create_learner(dls, cfg: RunConfig) -> Learner:
    """A fastai Learner for `cfg.recipe`, frozen or not, ready for `fit(learn, cfg, lr)`.

    It trains in channels-last memory layout (fastai's ChannelsLast): the same arithmetic, about
    8-10% faster per batch on this project's CPU for every arch but VGG (no change), and what
    mixed precision on a GPU's tensor cores wants. `cfg.precision` bf16/fp16 adds fastai's
    MixedPrecision (CUDA only; `train.run` refuses it on a CPU).
    """
    if cfg.recipe == "fastai":
        learn = _fastai_learner(dls, cfg)
    elif cfg.recipe == "paper":
        learn = _paper_learner(dls, cfg)
    else:
        raise ReplicateError(f"unknown recipe {cfg.recipe!r}: use paper or fastai")
    learn.to_channelslast(use_amp=False)
    if cfg.precision == "bf16":
        learn.to_bf16()
    elif cfg.precision == "fp16":
        learn.to_fp16()
    return learn


def check_precision(precision: str, device: torch.device) -> None:
    """ReplicateError unless `precision` can run on `device`."""
    if precision not in ("fp32", "bf16", "fp16"):
        raise ReplicateError(f"unknown precision {precision!r}: use fp32, bf16 or fp16")
    if precision != "fp32" and device.type != "cuda":
        raise ReplicateError(f"--precision {precision} needs a CUDA GPU (fastai's mixed precision is CUDA-only, "
                             f"and few CPUs compute bf16 fast): use --precision fp32 on a CPU")


def _paper_learner(dls, cfg: RunConfig) -> Learner:
    """The study's model, optimizer and freezing.

    SGD with momentum and no weight decay through `opt_func`; constant LR (`fit`, not one-cycle).
    Frozen mode trains only the new layer(s): `train_bn=False` keeps fastai from training
    the frozen BatchNorm weights, which the study does not do either.
    """
    arch = get_arch(cfg.arch)
    aux = uses_aux(arch, input_size(cfg))
    n_out = len(dls.vocab)
    if arch.aux_features:
        head = MainAuxHead(arch.n_features, arch.aux_features if aux else None, n_out)
    else:
        head = nn.Linear(arch.n_features, n_out)
    backbone = Backbone(arch.name, aux_logits=aux)
    model_meta[backbone] = {"cut": arch.cut, "split": default_split}
    learn = vision_learner(
        dls, backbone, pretrained=cfg.pretrained, custom_head=head,
        init=None,  # keep PyTorch's default init of the new Linear, as in the study
        normalize=False,  # ImageNet normalisation is already in the DataBlock's batch transforms
        opt_func=partial(SGD, mom=cfg.momentum), lr=cfg.lr or 1e-3, wd=0.0,
        metrics=epoch_accuracy(), train_bn=False, cbs=[AuxLossCallback(cfg.aux_loss_weight)] if aux else None,
    )
    if cfg.unfreeze:
        learn.unfreeze()
    else:
        learn.freeze()
    return learn


def _fastai_learner(dls, cfg: RunConfig) -> Learner:
    """fastai's recommended transfer learning: its default head (concat pooling, BatchNorm,
    dropout, two Linear layers) on the conv body, Adam with weight decay, BatchNorm trained
    while frozen (`train_bn=True`), one-cycle schedules (see `fit`)."""
    arch = get_arch(cfg.arch)
    backbone = Backbone(arch.name, aux_logits=False, recipe="fastai")
    model_meta[backbone] = {"cut": arch.fastai_cut, "split": default_split}
    learn = vision_learner(dls, backbone, pretrained=cfg.pretrained, normalize=False, metrics=epoch_accuracy())
    if cfg.unfreeze:
        learn.unfreeze()
    else:
        learn.freeze()
    return learn


def learning_rate(learn: Learner, cfg: RunConfig) -> float:
    """--lr, else 0.001 (paper) or the `lr_find` valley suggestion (fastai)."""
    if cfg.lr is not None:
        return cfg.lr
    if cfg.recipe == "paper":
        return 1e-3
    with learn.no_logging():
        return float(learn.lr_find(show_plot=False).valley)


def fit(learn: Learner, cfg: RunConfig, lr: float) -> None:
    """Train for `cfg.epochs` epochs in all: constant LR (paper); one-cycle, and for finetuning
    fastai's `fine_tune` (one frozen epoch, then the rest unfrozen) (fastai)."""
    if cfg.recipe == "paper":
        learn.fit(cfg.epochs, lr)
    elif cfg.unfreeze and cfg.epochs > 1:
        learn.fine_tune(cfg.epochs - 1, base_lr=lr, freeze_epochs=1)
    else:
        learn.fit_one_cycle(cfg.epochs, lr)


if __name__ == "__main__":
    for a in ARCHS.values():
        print(f"{a.name:14s} input {a.input_size}px (min {a.min_size})  weights {weights_path(a)[0]}")
