"""The whole configuration of one training run (and of one server), built once by the CLI and
passed whole.

    python -c "from replicate.config import RunConfig; print(RunConfig('rooms', 'resnet18'))"

The run folder records it (runs.Run.config), so every result says how it was made. `ServeOptions`
is `replicate serve`'s: its defaults are the CLI's, so they are written once.
"""

from __future__ import annotations

import dataclasses
import platform
import sys
from dataclasses import dataclass
from pathlib import Path

# The study's five backbones in its tables' order: the names `models.archs.ARCHS` registers (a test keeps
# them equal), here so that the command line can name them without loading PyTorch.
STUDY_ARCHS = ("resnet18", "alexnet", "vgg11_bn", "densenet121", "inception_v3")


CALIBRATION_PHOTOS = 256  # training photos that set int8 activation ranges (export, bundle)


def mode_name(unfreeze: bool) -> str:
    """'unfrozen' (finetuning) or 'frozen' (feature extraction), as in run folder names."""
    return "unfrozen" if unfreeze else "frozen"


@dataclass(frozen=True)
class RunConfig:
    """One experiment: a task, a backbone and the study's training protocol (its defaults)."""

    task: str
    arch: str
    unfreeze: bool = False  # False: feature extraction (new layer only); True: finetune everything
    # paper: the 2019 protocol; fastai: today's fastai defaults (see models.py)
    recipe: str = "paper"
    epochs: int = 30
    bs: int = 32
    lr: float | None = None  # None: 0.001 for the paper recipe, lr_find's suggestion for fastai
    momentum: float = 0.9
    aux_loss_weight: float = 0.4  # Inception v3 only: loss = main + 0.4 * auxiliary
    size: int | None = None  # None: the architecture's own input size (224, 299 for Inception v3)
    pretrained: bool = True
    seed: int = 42
    device: str = "auto"  # auto | cpu | cuda
    workers: int | None = None  # DataLoader worker processes; None: one per CPU core, at most 8
    # Frozen paper runs only: compute the frozen body's outputs once for this many augmented views
    # of the training set and train the new layer on them (0: no cache, the body runs every epoch).
    cache_features: int = 0
    # Frozen paper runs only: the frozen body runs in eval mode, as at inference (BatchNorm on its
    # pretrained running statistics, which stay untouched; dropout off), as a linear probe and
    # fastai's BnFreeze do. False: the study's way, the body in train mode (see models.EvalBody).
    freeze_bn: bool = False
    precision: str = "fp32"  # fp32 (the study's) | bf16 | fp16: fastai's mixed precision, CUDA only
    # check the split for leaks and conflicting labels first (replicate audit's fast part)
    audit: bool = True
    onnx: bool = True  # write model.onnx (what `predict` runs); False: `replicate export RUN_DIR` writes it later
    # Two-class tasks only, read when the run's report is written: the class the search filter looks
    # for (None: `yes`, else the rarer one) and the precision on valid its threshold must reach.
    positive: str | None = None
    target_precision: float = 0.95
    data_dir: Path = Path("data")
    exports_dir: Path = Path("exports")

    @property
    def mode(self) -> str:
        return mode_name(self.unfreeze)

    @property
    def task_dir(self) -> Path:
        return self.data_dir / self.task

    @property
    def run_name(self) -> str:
        """ARCH-MODE, plus -fastai for that recipe, -cachedK for cached features, -freezebn for a
        body in eval mode, -bf16/-fp16 for mixed precision, -seedN for a seed other than 42."""
        name = f"{self.arch}-{self.mode}"
        if self.recipe != "paper":
            name += f"-{self.recipe}"
        if self.cache_features:
            name += f"-cached{self.cache_features}"
        if self.freeze_bn:
            name += "-freezebn"
        if self.precision != "fp32":
            name += f"-{self.precision}"
        if self.seed != 42:
            name += f"-seed{self.seed}"
        return name

    @property
    def run_dir(self) -> Path:
        """Where this run's results land: exports/TASK/RUN_NAME."""
        return self.exports_dir / self.task / self.run_name

    def to_dict(self) -> dict:
        """The config as JSON-ready values (paths as strings)."""
        return {
            k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(self).items()
        }


def environment() -> dict:
    """Library versions and machine facts to store beside a run's config."""
    import fastai
    import timm
    import torch
    import torchvision

    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "fastai": fastai.__version__,
        "timm": timm.__version__,
        "cuda": torch.version.cuda,
        "command": " ".join(Path(sys.argv[0]).name.split() + sys.argv[1:]),
    }


@dataclass(frozen=True, kw_only=True)
class ServeOptions:
    """One `replicate serve`: the models and every limit; built by keyword. The defaults here are
    the only ones: the CLI's options, the server and its batcher read them."""

    models: tuple[Path, ...]
    host: str = "127.0.0.1"
    port: int = 8000
    token: str | None = None  # required as Authorization: Bearer <token> when set
    max_bytes: int = 20_000_000  # per request body
    max_pixels: int = 50_000_000  # per photo, from its header
    max_photos: int = 50  # per listing
    max_batch: int = 32
    max_wait_ms: float = 5.0
    max_queue: int = 256  # photos in hand (decoding, waiting, running) before 429
    timeout: float = 10.0  # seconds a photo may wait for its batch before 504
    grace: float = 30.0  # seconds SIGTERM waits for the requests in hand
    workers: int | None = None  # decoding threads; None: one per core
