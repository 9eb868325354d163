"""`replicate predict`: trained models -> a tag table of new photos, per photo and per listing.

    replicate predict exports/rooms/resnet18-unfrozen photos/ --out tags.csv

`run(Job)` is the command: it picks the engine (onnx: model.onnx with ONNX Runtime, the default,
no pickle and no PyTorch; fastai: export.pkl), loads the models once and tags every photo once for
all of them with the tagging engine (`engine.model_set`: each two-class run's search filter
applied), writes the table, and with a listing pattern the per-listing table and the listing rules. Under `accelerate launch` or
`torchrun` the photos are shared out over the processes and the main process writes the table.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from .. import runs, runtime
from ..engine import filters, model_set
from ..errors import ReplicateError
from ..folders import find_images

UNLISTED = "listings_unmatched.txt"  # the photos a listing pattern does not match, one a line


@dataclass(frozen=True, kw_only=True)
class Job:
    """One `replicate predict`: the models and photos (`items`, models first) and the options;
    built by keyword. Its defaults are the CLI's."""

    items: list[Path]
    out: Path = Path("tags.csv")
    format: str = "csv"  # csv | json
    listing_pattern: str | None = None  # regex whose first group is the listing id
    bs: int = 64
    engine: str = "onnx"  # onnx | fastai
    workers: int | None = None  # threads decoding photos (onnx); None: one per core
    device: str = "auto"  # auto | cpu | cuda


def run(job: Job, log=print, warn=print) -> pd.DataFrame | None:
    """Tag the job's photos and write its tables; returns the photo table (None on the processes of
    `accelerate launch` other than the main one). `warn`: notes and warnings (stderr in the CLI)."""
    model_paths, photo_paths = model_set.split_items(job.items)
    files = find_images(photo_paths)
    if not files:
        raise ReplicateError("no images found in " + ", ".join(str(p) for p in photo_paths))
    if job.listing_pattern:  # before any photo is tagged
        filters.check_names(files, job.listing_pattern)
    engine_used, device, note = plan(job.engine, job.device, model_paths)
    if note:
        warn(f"note: {note}")
    models = model_set.ModelSet(model_paths, engine_used, device)
    for warning in models.warnings:
        warn(f"warning: {warning}")
    start = time.time()
    table = models.tag(files, job.bs, job.workers)
    if table is None:  # another process of `accelerate launch`: the main one writes
        return None
    seconds = time.time() - start
    found = models.filters  # two-class runs: has_<attribute> at the run's threshold
    write_table(table, job.out, job.format)
    bodies, count = len(models.groups), len(models.models)
    shared = f" on {bodies} body pass(es)" if bodies < count else ""
    log(
        f"{runtime.plural(len(table), 'image')}, {count} model(s){shared}, "
        f"{engine_used} on {device}, "
        f"{seconds:.1f}s ({len(table) / seconds:.1f} images/s); table: {job.out}"
    )
    for row in table[table.error != ""].itertuples():
        log(f"  unreadable: {row.path}: {row.error}")
    for name, spec in found.items():
        log(
            f"{name}_{spec['column']}: p_{spec['positive']} >= {spec['threshold']:.3f}, chosen "
            f"for precision {spec['target_precision']:g} on the run's own validation photos "
            f"(there: precision {spec['precision']:.1%}, recall {spec['recall']:.1%}; on photos "
            "unlike them it can be lower)"
        )
    if job.listing_pattern:
        _write_listings(table, models.classes, found, job, log)
    return table


def _write_listings(table: pd.DataFrame, classes: dict, found: dict, job: Job, log) -> None:
    """The per-listing table beside the photo table, and the listing rules of the search filters."""
    per_listing, unlisted = filters.listings(table, job.listing_pattern, classes, found)
    path = job.out.with_name(f"{job.out.stem}_listings{job.out.suffix}")
    write_table(per_listing, path, job.format)
    unread = per_listing.error != ""
    none = f", {int(unread.sum())} with no readable photo" if unread.any() else ""
    log(f"{runtime.plural(len(per_listing), 'listing')}{none}; table: {path}")
    if unlisted:
        named = job.out.with_name(f"{job.out.stem}_{UNLISTED}")
        named.write_text("".join(f"{p}\n" for p in unlisted))
        log(
            f"{runtime.plural(len(unlisted), 'photo')} in no listing (the pattern does not match "
            f"their names): {named}"
        )
    if not found:
        return
    side = job.out.with_name(f"{job.out.stem}_listings_filters.json")
    for name, rule in filters.write_listing_rules(found, job.listing_pattern, side).items():
        column = f"{name}_{rule['column']}"
        has = per_listing[column].dropna()  # the listings with a readable photo
        if rule["valid_listings"] is None:  # a bundle's, away from its run's folder
            measured = "not measured per listing (its run's validation photos are not here)"
        elif not rule["valid_listings"]:
            measured = "not measured per listing (the pattern matches none of its run's validation photos' names)"  # fmt: skip
        else:
            measured = (
                f"measured on the run's own validation listings: precision "
                f"{_share(rule['listing_precision'])}, recall {_share(rule['listing_recall'])} "
                f"({rule['valid_listings_with']} of {rule['valid_listings']} have it)"
            )
        log(
            f"{column}: a listing has it when any photo passes ({int(has.sum())} of {len(has)} "
            f"listings in this table); {measured}; {side}"
        )


def _share(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1%}"


def write_table(table: pd.DataFrame, path: Path, format: str = "csv") -> None:
    """`table` as CSV, or as JSON records."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if format == "json":
        path.write_text(table.to_json(orient="records", indent=1))
    else:
        table.to_csv(path, index=False)


def plan(engine: str, device: str, model_paths: list[Path]) -> tuple[str, str, str]:
    """(engine, device, note) to run: `--device cuda` (or auto on a GPU machine) runs ONNX Runtime's
    CUDA provider where onnxruntime-gpu is installed, else PyTorch (the fastai engine: export.pkl)."""
    import onnxruntime as ort

    if device == "cpu" or (device == "auto" and not runtime.gpu_present()):
        return engine, "cpu", ""
    if engine == "onnx" and "CUDAExecutionProvider" in ort.get_available_providers():
        return "onnx", "cuda", ""
    if runtime.resolve_device(device).type != "cuda":  # with --device cuda, PyTorch's own error
        return engine, "cpu", ""
    if engine == "onnx":
        if not all(_has_pickle(p) for p in model_paths):
            note = "ONNX Runtime here has no CUDA provider (pip install onnxruntime-gpu): running on the CPU"
            return "onnx", "cpu", note
        return (
            "fastai",
            "cuda",
            (
                "ONNX Runtime here has no CUDA provider (pip install onnxruntime-gpu): "
                "running export.pkl with PyTorch on the GPU (a pickle: trusted files only)"
            ),
        )
    return "fastai", "cuda", ""


def _has_pickle(model: Path) -> bool:
    return model.suffix == ".pkl" or (model.is_dir() and (model / runs.PICKLE).is_file())
