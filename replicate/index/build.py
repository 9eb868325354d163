"""`replicate index`: models and photo folders -> a search index of every photo's tags, kept up to
date by calling it again.

    replicate index exports/tagger data/kitchen/valid --out exports/index --listing-pattern '^(\\d+)_'

`run(IndexJob)` is the command. It scans the photos (path, size, modification time) and compares
them with the index (`store`): a photo that is new or changed is tagged with every model, a photo
whose row a model with another checksum tagged (a retrained run) is tagged again by that model
only, and the rows of photos that are gone from the folders named are dropped; rows under folders
this call did not name stay as they are. It tags with `predict`'s engine
(`engine.model_set`: one decode per photo, one body pass per shared body, the search filters), in
parts of `--part-size` photos, each committed when complete, so a job killed at any point loses
only the parts in flight. Then it compacts the index and writes the per-listing table from it.

Without `--ray` it runs here, decoding in threads as `predict` does; with `--ray auto` or
`--ray ADDRESS` the tagging runs on a Ray cluster (`cluster`). Both write the same rows.
"""

from __future__ import annotations

import time
from itertools import islice
from pathlib import Path

import pandas as pd

from .. import runtime
from ..engine import filters, onnx_models
from ..engine.model_set import ModelSet, split_items
from ..errors import ReplicateError
from ..folders import find_images
from . import cluster, store
from .plan import (
    IndexJob,
    Work,
    columns,
    decode_features,
    features_columns,
    from_features,
    in_scope,
    plan,
    rows,
    scan_photos,
)


def run(job: IndexJob, log=print, warn=print) -> dict:
    """Bring the index at `job.out` up to date with the job's photos and models; returns the
    summary (also written into the index's index.json)."""
    start = time.perf_counter()
    model_paths, photo_paths = split_items(job.items)
    files = find_images(photo_paths)
    if not files:
        raise ReplicateError("no images found in " + ", ".join(str(p) for p in photo_paths))
    if job.listing_pattern:  # before any photo is tagged (a remembered one: its misses listed)
        filters.check_names(files, job.listing_pattern)
    if job.ray:  # before anything is written: Ray installed, the cluster there
        cluster.connect(job.ray, log)
    models = ModelSet(model_paths)  # once for the job: every work below takes a subset of it
    for warning in models.warnings:
        warn(f"warning: {warning}")
    with store.IndexFolder(job.out) as folder:
        if folder.swept:
            log(f"removed {len(folder.swept)} unfinished file(s) of a job that was killed")
        summary = update(folder, (files, photo_paths), models, job, log)
        summary["seconds"] = round(time.perf_counter() - start, 3)
        folder.write_manifest(summary)
    log(_summary_line(summary, folder.path))
    return summary


def update(
    folder: store.IndexFolder,
    photos: tuple[list[Path], list[Path]],
    models: ModelSet,
    job: IndexJob,
    log,
) -> dict:
    """Tag into the open index `folder` what `plan` finds for `photos` (the files found, and the
    photos and folders named), compact it and write its listing table; returns the job's
    summary. Rows outside the folders named are kept as they are."""
    files, named = photos
    everything = columns(models, job.features)
    scan = scan_photos(files)
    checksums = [store.checksum_column(m.name) for m in models.models]
    found = store.snapshot(folder.path, ["size", "mtime_ns", *checksums])
    old = found.latest()
    covered = in_scope(old.path, named)
    works, counts = plan(scan, old, models, covered, job.features)
    if any(w.carried for w in works):  # a model changed: its photos keep the others' tags
        whole = store.rows(folder.path).set_index("path")
        for w in works:
            w.photos = w.photos.join(whole[w.carried], on="path") if w.carried else w.photos
        # a model on a body whose features the rows hold: its head alone, no photo read
        works = [part for w in works for part in from_features(w, whole, models)]
    folder.begin(everything)
    tag_start = time.perf_counter()
    tagged = sum(_tag(w, job, models, folder, log) for w in works)
    tag_seconds = time.perf_counter() - tag_start
    counts["from_features"] = sum(len(w.photos) for w in works if w.from_features)
    retagged = {p for w in works for p in w.photos.path}
    live = set(scan.path) | set(old.path[~covered])
    compacted = store.compact(found, live, retagged, everything)
    compacted["merged"] = store.merge_small(folder.path, job.part_size)
    # the listing pattern of an earlier call unless given: its listing table stays up to date
    pattern = job.listing_pattern or folder.manifest().get("listing_pattern")
    kept = {"path", *features_columns(models)}  # path comes anyway; the features are not needed
    table = store.rows(
        folder.path, [c for c in everything if c not in kept] if pattern else ["error"]
    )
    listings, unlisted = None, []
    if pattern:
        listings, unlisted = write_listings(folder, table, models, pattern)
    return {
        "photos": len(table),
        **counts,
        "unreadable": int((table.error != "").sum()),
        "tagged": tagged,
        "tag_seconds": round(tag_seconds, 3),
        "photos_per_second": round(tagged / tag_seconds, 2) if tagged else None,
        "engine": f"ray ({job.ray})" if job.ray else "local threads",
        "generation": folder.generation,
        "parts": len(store.part_files(folder.path)),
        "compacted": compacted,
        "listings": None if listings is None else len(listings),
        "unlisted": len(unlisted),
        "listing_pattern": pattern,
        "models": models.describe(),
        "columns": everything,
    }


def _tag(work: Work, job: IndexJob, models: ModelSet, folder: store.IndexFolder, log) -> int:
    """Tag `work` into committed parts of the index's new generation, here or on Ray (`models`:
    every model of the job, loaded); returns the photos tagged."""
    what = "every model" if work.names is None else ", ".join(work.names)
    if work.from_features:  # here, on any engine: the heads alone, milliseconds a part
        log(
            f"tagging {runtime.plural(len(work.photos), 'photo')} with {what}, from stored features"
        )
        return _tag_from_features(work, job, models.subset(work.names), folder)
    log(f"tagging {runtime.plural(len(work.photos), 'photo')} with {what}")
    if job.ray:
        return cluster.tag(work, job, models, folder, log)
    done = 0
    subset = models.subset(work.names)
    for part in tag_parts(subset, work, job.part_size, job.bs, job.workers, job.features):
        folder.commit(part)  # in the job's columns (`begin`)
        done += len(part)
    return done


def _tag_from_features(work: Work, job: IndexJob, models: ModelSet, folder) -> int:
    """`work`'s rows from their stored features (`from_features`), committed in parts: each
    model's head on its body's features, the features kept as they were."""
    names = features_columns(models)
    for start in range(0, len(work.photos), job.part_size):
        chunk = work.photos.iloc[start : start + job.part_size].reset_index(drop=True)
        stored = {name: decode_features(chunk[name]) for name in names}
        probs = [dict() for _ in range(len(chunk))]
        for m in models.models:
            for row, p in zip(
                probs, m.head_probabilities(stored[onnx_models.features_name(m.body)])
            ):
                row[m.name] = p
        for name, x in stored.items():
            for row, f in zip(probs, x):
                row[name] = f
        facts = chunk[["path", "size", "mtime_ns", "sha256"]]
        tagged = rows(models, facts, probs, [""] * len(chunk), job.features)
        folder.commit(pd.concat([tagged, chunk[work.carried]], axis=1))
    return len(work.photos)


def tag_parts(
    models: ModelSet,
    work: Work,
    part_size: int,
    bs: int,
    workers: int | None,
    features: bool = True,
):
    """The rows of `work`'s photos, `part_size` at a time: decoded and hashed by threads in one
    stream across the parts (so a part's end does not stall the decoding), inferred in batches of
    `bs` (`ModelSet.tagged`, as `predict` runs them)."""
    paths = [Path(p) for p in work.photos.path]
    stream = onnx_models.decoded(
        paths, models.geometries, runtime.workers(workers), ahead=2 * bs, hashed=True
    )
    # counted as tagged, not as decoded: decoding runs ahead of the models
    results = runtime.progress(models.tagged(stream, bs), len(paths), "indexing", unit="photos")
    for start in range(0, len(paths), part_size):
        chunk = work.photos.iloc[start : start + part_size]
        probs, photos = zip(*islice(results, len(chunk)))
        facts = chunk[["path", "size", "mtime_ns"]].assign(sha256=[p[2] for p in photos])
        tagged = rows(models, facts, list(probs), [p[1] for p in photos], features)
        yield pd.concat([tagged, chunk[work.carried].reset_index(drop=True)], axis=1)


def write_listings(
    folder: store.IndexFolder, table: pd.DataFrame, models: ModelSet, pattern: str
) -> tuple[pd.DataFrame, list[str]]:
    """The per-listing table of the index's rows, as `predict` makes it (`filters.listings` with
    `models`' classes and search filters, and the filters' listing rules), written into the index
    with the photos in no listing; returns both."""
    listings, unlisted = filters.listings(table, pattern, models.classes, models.filters)
    rules = {n: filters.listing_rule(f, pattern) for n, f in models.filters.items()}
    folder.write_listings(listings, rules, unlisted)
    return listings, unlisted


def _summary_line(s: dict, where: Path) -> str:
    rate = f" ({s['photos_per_second']:.1f} photos/s)" if s["photos_per_second"] else ""
    stored = f", {s['from_features']} of them from stored features" if s["from_features"] else ""
    listings = f"; {runtime.plural(s['listings'], 'listing')}" if s["listings"] is not None else ""
    if s["listings"] is not None and s["unlisted"]:
        listings += f" ({runtime.plural(s['unlisted'], 'photo')} in none: {where / store.UNLISTED})"
    return (
        f"{s['photos']} photos in the index: {s['tagged']} tagged{rate} ({s['new']} new, "
        f"{s['changed']} changed, {s['retagged']} for a changed model{stored}), {s['kept']} kept, "
        f"{s['gone']} gone and dropped, {s['elsewhere']} untouched in folders not named, "
        f"{s['unreadable']} unreadable{listings}; "
        f"{runtime.plural(s['parts'], 'part')}, {s['seconds']:.1f}s on {s['engine']}; index: {where}"
    )
