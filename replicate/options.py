"""Every option and argument that several `replicate` commands take, declared once, and the
choices they offer; `cli` reads them.

    python -c "from replicate import options; print([c.value for c in options.Device])"

Each alias carries its help; a command's default is read from the dataclass that holds it
(RunConfig, tagging.predict.Job, index.plan.IndexJob, config.ServeOptions), so it is written in one
place. One meaning per name: --workers is a run's DataLoader processes, --decode-threads the
threads that decode photos for tagging, -k the top losses.
"""

from __future__ import annotations

import dataclasses
import functools
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from .config import RunConfig
from .index.plan import IndexJob
from .tagging.predict import Job as PredictJob


class Recipe(str, Enum):
    paper = "paper"
    fastai = "fastai"


class Precision(str, Enum):
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"


class Device(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class Engine(str, Enum):
    onnx = "onnx"
    fastai = "fastai"


class Quantize(str, Enum):
    int8 = "int8"


class Split(str, Enum):
    valid = "valid"
    train = "train"
    both = "both"


class Format(str, Enum):
    csv = "csv"
    json = "json"


def option(help: str, *names: str, **kw):
    return typer.Option(*names, help=help, **kw)


# Options and arguments that several commands take, each declared once here; a command's
# default is read from the dataclass that holds it (RunConfig, predict.Job, IndexJob,
# ServeOptions), so it is written in one place.
DataDir = Annotated[Path, option("Folder holding one folder per task.")]
ExportsDir = Annotated[Path, option("Where run folders are written (exports/TASK/ARCH-MODE/).")]
TaskName = Annotated[str, typer.Argument(help="Task folder under --data-dir, e.g. rooms.")]
RunDir = Annotated[
    Path, typer.Argument(help="A run folder, e.g. exports/rooms/resnet18-unfrozen.", exists=True)
]
Force = Annotated[bool, option("Replace what is there (a task folder: the old one kept as .bak).")]
ValidPct = Annotated[float, option("Share of the photos for validation.")]
Seed = Annotated[int, option("Random seed.")]
Undo = Annotated[Path | None, option("A log written by an earlier call: undo what it did.")]
Top = Annotated[int, option("How many top-loss images per split.", "-k", "--top", min=1)]
SplitOption = Annotated[Split, option("Which split's images.")]
ModelsThenPhotos = Annotated[
    list[Path],
    typer.Argument(
        help="One or more models (run folders, bundle folders, .onnx files; predict also "
        "export.pkl) followed by images or folders (searched recursively).",
        exists=True,
    ),
]
Models = Annotated[
    list[Path],
    typer.Argument(help="Models: run folders, .onnx files or bundle folders.", exists=True),
]
ListingPattern = Annotated[
    str | None,
    option(
        "Regex whose first group is the listing id, searched in the file name (or the path, if it "
        "has a /), e.g. '^(\\d+)_': also writes the per-listing table."
    ),
]
Batch = Annotated[int, option("Batch size.", "--bs", min=1)]
DecodeThreads = Annotated[
    int | None,
    option(
        "Threads decoding photos (default: one per core, at most 8; 0: in the main thread).", min=0
    ),
]
QuantizeOption = Annotated[
    Quantize | None,
    option(
        "Also write an int8 model (ONNX Runtime static int8, calibrated on the training photos) "
        "and record its validation accuracy beside fp32's."
    ),
]
Calibration = Annotated[int, option("Training photos to calibrate int8 on.", min=1)]
# `run` and `compare`: RunConfig's fields
RecipeOption = Annotated[
    Recipe,
    option(
        "paper: the 2019 protocol. fastai: fastai's default head, Adam, one-cycle, aug_transforms."
    ),
]
Epochs = Annotated[int, option("Epochs of training.", min=1)]
LearningRate = Annotated[
    float | None,
    option(
        "Learning rate (default: 0.001 constant for paper; for fastai lr_find's suggestion, or "
        "3e-3 from random init)."
    ),
]
Size = Annotated[
    int | None,
    option(
        "Input size in px (default: the arch's own: 224, 299 for inception_v3, a timm model's "
        "pretrained size); a compare raises it to an arch's minimum."
    ),
]
Pretrained = Annotated[
    bool,
    option(
        "Start from pretrained weights (cached, else downloaded and verified; see `replicate "
        "weights`)."
    ),
]
DeviceOption = Annotated[Device, option("auto: CUDA when available.")]
LoaderWorkers = Annotated[
    int | None, option("DataLoader worker processes (default: CPU cores, max 8).", "--workers")
]
CacheFeatures = Annotated[
    int,
    option(
        "Frozen runs (a compare's frozen cells): compute the body's outputs once for this many "
        "augmented views of each photo and train the new layer on them (much faster; 0: run the "
        "body every epoch)."
    ),
]
FreezeBn = Annotated[
    bool,
    option(
        "Frozen runs (a compare's frozen cells): keep the frozen body in eval mode, as at "
        "inference: BatchNorm uses and keeps its pretrained statistics, dropout is off (a linear "
        "probe; fastai's BnFreeze). Default: the study's way, the body in train mode, where "
        "BatchNorm normalises by batch statistics and its running statistics drift."
    ),
]
PrecisionOption = Annotated[
    Precision,
    option(
        "fp32 (the study's), or bf16/fp16 mixed precision on a CUDA GPU (recorded in the run's "
        "config and its name)."
    ),
]
Audit = Annotated[
    bool,
    option(
        "First check the split for near-duplicate photos in train and valid and photos under two "
        "labels (cached; recorded in the run's metrics). --no-audit skips it."
    ),
]
Onnx = Annotated[
    bool,
    option(
        "Write model.onnx (what `predict` runs, no pickle) beside export.pkl. --no-onnx (or "
        "REPLICATE_ONNX=0) saves the export's seconds to minutes per run; `replicate export "
        "RUN_DIR` writes it later.",
        envvar="REPLICATE_ONNX",
    ),
]
Positive = Annotated[
    str | None,
    option(
        "Two-class tasks: the class the search filter looks for (default: yes, else the rarer "
        "class on valid)."
    ),
]
TargetPrecision = Annotated[
    float,
    option(
        "Two-class tasks: the precision on valid the filter's threshold must reach; filter.json "
        "and pr_curve.png record it with the recall it keeps, and predict applies it.",
        min=0.01,
        max=1.0,
    ),
]


# Files that must exist say so: a missing one is a usage error before the command starts. (The
# --undo logs do not: their stage says more, e.g. that a log was undone already.)
ExistingFile = functools.partial(typer.Option, exists=True, dir_okay=False)

# `serve`'s limits (their defaults: config.ServeOptions)
MaxBytes = Annotated[int, option("Largest request body, in bytes (413).", min=1)]
MaxPixels = Annotated[
    int, option("Most pixels a photo's header may claim (422, before decoding).", min=1)
]
MaxPhotos = Annotated[int, option("Most photos in one listing request.", min=1)]
MaxBatch = Annotated[int, option("Most photos run together.", min=1)]
MaxWaitMs = Annotated[float, option("How long a batch waits for more photos, in ms.", min=0)]
MaxQueue = Annotated[int, option("Photos in hand (decoding, waiting, running) before 429.", min=1)]
Timeout = Annotated[float, option("Seconds a photo may wait for its batch before 504.", min=0)]
Grace = Annotated[float, option("Seconds SIGTERM waits for the requests in hand.", min=0)]


def run_config(values: dict, **more) -> RunConfig:
    """The RunConfig of a command's options (`values`: its locals), enum choices as their values."""
    names = {f.name for f in dataclasses.fields(RunConfig)} - {"task", "arch", *more}
    chosen = {k: getattr(v, "value", v) for k, v in values.items() if k in names}
    return RunConfig(**chosen, **more)


# The defaults of `run` and `compare` (RunConfig's), of `predict` (predict.Job's) and of `index`
# (IndexJob's), the choices among them as the CLI's enums.
RUN = RunConfig("-", "-")
RECIPE, DEVICE, PRECISION = Recipe(RUN.recipe), Device(RUN.device), Precision(RUN.precision)
PREDICT = PredictJob(items=[])
TABLE_FORMAT, ENGINE, PREDICT_DEVICE = (
    Format(PREDICT.format),
    Engine(PREDICT.engine),
    Device(PREDICT.device),
)
INDEX = IndexJob(items=[])

# The options of a training run, as `run` and `compare` take them, in --help's order: (name, its
# alias, its default).
TRAINING = (
    ("recipe", RecipeOption, RECIPE),
    ("epochs", Epochs, RUN.epochs),
    ("bs", Batch, RUN.bs),
    ("lr", LearningRate, RUN.lr),
    ("size", Size, RUN.size),
    ("pretrained", Pretrained, RUN.pretrained),
    ("seed", Seed, RUN.seed),
    ("device", DeviceOption, DEVICE),
    ("workers", LoaderWorkers, RUN.workers),
    ("cache_features", CacheFeatures, RUN.cache_features),
    ("freeze_bn", FreezeBn, RUN.freeze_bn),
    ("precision", PrecisionOption, PRECISION),
    ("audit", Audit, RUN.audit),
    ("onnx", Onnx, RUN.onnx),
    ("quantize", QuantizeOption, None),
    ("positive", Positive, RUN.positive),
    ("target_precision", TargetPrecision, RUN.target_precision),
    ("data_dir", DataDir, RUN.data_dir),
    ("exports_dir", ExportsDir, RUN.exports_dir),
)


def training_options(command):
    """`command` taking the TRAINING options too, after its own, passed to it as keywords
    (`run_config` makes them a RunConfig). Typer reads a command's options from its signature, so
    the signature is extended: `run` and `compare` declare the same options once, here."""
    import inspect

    own = inspect.signature(command, eval_str=True)
    added = [
        inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=alias, default=default)
        for name, alias, default in TRAINING
    ]

    @functools.wraps(command)
    def with_training(**kwargs):
        return command(**kwargs)

    kept = [p for p in own.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    with_training.__signature__ = own.replace(parameters=[*kept, *added])
    with_training.__annotations__ = {p.name: p.annotation for p in with_training.__signature__.parameters.values()}  # fmt: skip
    return with_training
