"""`replicate predict`: trained models -> a tag table of new photos, per photo and per listing.

    replicate predict exports/rooms/resnet18-unfrozen photos/ --out tags.csv

`run(Job)` is the command: it picks the engine (`onnx_engine`: model.onnx with ONNX Runtime, the
default, no pickle and no PyTorch; `fastai_engine`: export.pkl), tags every photo once for all
the models, adds each two-class run's search filter (filters.apply), writes the table, and with a
listing pattern the per-listing table and the listing rules. Under `accelerate launch` or
`torchrun` the photos are shared out over the processes and the main process writes the table.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from . import filters, onnx_engine, runs, runtime
from .errors import ReplicateError
from .folders import image_files


@dataclass(frozen=True)
class Job:
    """One `replicate predict`: the models and photos (`items`, models first) and the options."""

    items: list[Path]
    out: Path = Path("tags.csv")
    format: str = "csv"  # csv | json
    listing_pattern: str | None = None  # regex whose first group is the listing id
    threshold: float = 0.5  # per listing: a class counts as shown above this probability
    bs: int = 64
    engine: str = "onnx"  # onnx | fastai
    workers: int | None = None  # threads decoding photos (onnx); None: one per core
    device: str = "auto"  # auto | cpu | cuda


def run(job: Job, log=print, warn=print) -> pd.DataFrame | None:
    """Tag the job's photos and write its tables; returns the photo table (None on the processes of
    `accelerate launch` other than the main one). `warn`: notes and warnings (stderr in the CLI)."""
    model_paths, photo_paths = split_items(job.items)
    files = find_images(photo_paths)
    if not files:
        raise ReplicateError("no images found in " + ", ".join(str(p) for p in photo_paths))
    engine_used, device, note = plan(job.engine, job.device, model_paths)
    if note:
        warn(f"note: {note}")
    models = load_models(model_paths, engine_used, device)
    for m in models:
        if m.warning:
            warn(f"warning: {m.warning}")
    start = time.time()
    table = tag_any(models, files, job.bs, job.workers)
    if table is None:  # another process of `accelerate launch`: the main one writes
        return None
    seconds = time.time() - start
    found = filters.of_models(models)  # two-class runs: has_<attribute> at the run's threshold
    table = filters.apply(table, found)
    write_table(table, job.out, job.format)
    bodies = len(onnx_engine.sharing(models)) if engine_used == "onnx" else len(models)
    shared = f" on {bodies} body pass(es)" if bodies < len(models) else ""
    log(
        f"{len(table)} images, {len(models)} model(s){shared}, {engine_used} on {device}, "
        f"{seconds:.1f}s ({len(table) / seconds:.1f} images/s); table: {job.out}"
    )
    for row in table[table.error != ""].itertuples():
        log(f"  unreadable: {row.path}: {row.error}")
    for name, spec in found.items():
        log(
            f"{name}_{spec['column']}: p_{spec['positive']} >= {spec['threshold']:.3f} (valid "
            f"photos: precision {spec['precision']:.1%}, recall {spec['recall']:.1%}; target "
            f"{spec['target_precision']:g})"
        )
    if job.listing_pattern:
        _write_listings(table, found, job, log)
    return table


def _write_listings(table: pd.DataFrame, found: dict, job: Job, log) -> None:
    """The per-listing table beside the photo table, and the listing rules of the search filters."""
    per_listing = filters.listings(table, job.listing_pattern, job.threshold, found)
    path = job.out.with_name(f"{job.out.stem}_listings{job.out.suffix}")
    write_table(per_listing, path, job.format)
    log(f"{len(per_listing)} listings; table: {path}")
    if not found:
        return
    side = job.out.with_name(f"{job.out.stem}_listings_filters.json")
    for name, rule in filters.write_listing_rules(found, job.listing_pattern, side).items():
        if rule["valid_listings"] is None:  # a bundle's, away from its run, for another pattern
            log(f"{name}_{rule['column']}: a listing has it when any photo passes; {side}")
            continue
        log(
            f"{name}_{rule['column']}: a listing has it when any photo passes; on the run's valid "
            f"listings: precision {_share(rule['listing_precision'])}, recall "
            f"{_share(rule['listing_recall'])} ({rule['valid_listings_with']} of "
            f"{rule['valid_listings']} listings have it); {side}"
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


def split_items(items: list[Path]) -> tuple[list[Path], list[Path]]:
    """(models, photos): the leading run folders (with model.onnx or export.pkl), bundle folders
    and model files (.onnx, .pkl), then the images and folders to tag."""
    n = 0
    while n < len(items) and (
        items[n].suffix in (".onnx", ".pkl") or (items[n].is_dir() and runs.has_model(items[n]))
    ):
        n += 1
    if n == 0 or n == len(items):
        raise ReplicateError(
            "give one or more models (run folders, bundles, model.onnx or export.pkl) and then "
            "images or folders"
        )
    return items[:n], items[n:]


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


def load_models(paths: list[Path], engine: str, device: str, threads: int = 0) -> list:
    """The models, loaded for `engine` on `device` (a bundle: one model per attribute), their column
    names made unique: the task (a bundle's attribute name), else task_<run folder>, else
    task_<run folder>_<file> (model.onnx beside model.int8.onnx). `threads`: each ONNX Runtime
    session's (0: one per core)."""
    index = int(os.environ.get("LOCAL_RANK", 0))
    if engine == "onnx":
        loaded = [
            (m, p)
            for p in paths
            for m in onnx_engine.load(p, device=device, index=index, threads=threads)
        ]
        models, paths = [m for m, _ in loaded], [p for _, p in loaded]
    else:
        import torch

        from . import fastai_engine

        bundles = [p for p in paths if p.suffix != ".pkl" and runs.is_bundle(p)]
        if bundles:
            raise ReplicateError(
                f"{bundles[0]} is a bundle: it runs on ONNX Runtime only (--engine onnx)"
            )
        dev = torch.device("cuda", index) if device == "cuda" else torch.device("cpu")
        models = [fastai_engine.load_model(_pickle_of(p), dev) for p in paths]
    tasks = [m.name for m in models]
    for detail in (
        lambda p: p.name if p.is_dir() else p.parent.name,  # the run folder
        lambda p: p.name if p.is_dir() else f"{p.parent.name}_{p.stem}",  # and the file
    ):
        names = [m.name for m in models]
        for m, task, path in zip(models, tasks, paths):
            if names.count(m.name) > 1:
                m.name = f"{task}_{detail(path)}"
    return models


def _pickle_of(model: Path) -> Path:
    """The export.pkl for the fastai engine, also when a model.onnx was named."""
    return model.parent / runs.PICKLE if model.suffix == ".onnx" else model


def tag_any(
    models: list, files: list[Path], bs: int = 64, workers: int | None = None
) -> pd.DataFrame:
    """`onnx_engine.tag_onnx` or `fastai_engine.tag`, by the kind of models; under `accelerate launch` or `torchrun`
    each process tags its share of `files` (accelerate's split_between_processes) and the main
    process returns the whole table, each file once, in order (the others return None)."""
    mine, state = files, None
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from accelerate import PartialState

        state = PartialState()
        with state.split_between_processes(files) as share:
            mine = list(share)
    if models and isinstance(models[0], onnx_engine.OnnxModel):
        shown = state is None or state.is_main_process
        table = onnx_engine.tag_onnx(models, mine, bs, workers, progress=shown)
    else:
        from . import fastai_engine

        with runtime.alone():  # each process predicts its own share: no gathering in get_preds
            table = fastai_engine.tag(models, mine, bs)
    if state is None:
        return table
    from accelerate.utils import gather_object

    rows = gather_object(table.to_dict("records"))
    if not state.is_main_process:
        return None
    order = {str(f): i for i, f in enumerate(files)}
    whole = pd.DataFrame(rows)
    return whole.iloc[whole.path.map(order).argsort()].reset_index(drop=True)


def find_images(paths: list[Path]) -> list[Path]:
    """Image files among `paths`, folders searched recursively; other files named directly are kept
    (they get an error row) so nothing the user named silently disappears."""
    found = []
    for p in paths:
        if p.is_dir():
            found += image_files(p)
        elif p.exists():
            found.append(p)
        else:
            raise ReplicateError(f"{p} does not exist")
    return list(dict.fromkeys(found))
