"""`replicate index`: models and photo folders -> a search index of every photo's tags, kept up to
date by calling it again.

    replicate index exports/tagger data/kitchen/valid --out exports/index --listing-pattern '^(\\d+)_'

`run(IndexJob)` is the command. It scans the photos (path, size, modification time) and compares
them with the index (`store`): a photo that is new or changed is tagged with every model, a photo
whose row a model with another checksum tagged (a retrained run) is tagged again by that model
only, and the rows of photos that are gone are dropped. It tags with `predict`'s engine
(`tagger.Tagger`: one decode per photo, one body pass per shared body, the search filters), in
parts of `--part-size` photos, each committed when complete, so a job killed at any point loses
only the parts in flight. Then it compacts the index and writes the per-listing table from it.

Without `--ray` it runs here, decoding in threads as `predict` does; with `--ray auto` or
`--ray ADDRESS` the tagging runs on a Ray cluster (`cluster`). Both write the same rows.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import numpy as np
import pandas as pd

from . import cluster, filters, onnx_engine, predict, runtime, store
from .errors import ReplicateError
from .tagger import CHECKSUM, Tagger


@dataclass(frozen=True)
class IndexJob:
    """One `replicate index`: the models and photos (`items`, models first) and the options."""

    items: list[Path]
    out: Path = Path("exports/index")
    listing_pattern: str | None = None  # regex whose first group is the listing id
    threshold: float = 0.5  # per listing: a class counts as shown above this probability
    ray: str | None = None  # None: this machine, in threads; "auto" or a cluster's address
    part_size: int = 1024  # photos per committed part: what a killed job may redo
    bs: int = 64
    workers: int | None = None  # threads decoding photos here; None: one per core


@dataclass
class Work:
    """Photos to tag with some of the models (`names`; None: all), in path order, and the columns
    their new rows carry over from the old ones (the other models' tags)."""

    names: list[str] | None
    photos: pd.DataFrame  # path, size, mtime_ns, then the carried columns
    carried: list[str]


def run(job: IndexJob, log=print, warn=print) -> dict:
    """Bring the index at `job.out` up to date with the job's photos and models; returns the
    summary (also written into the index's index.json)."""
    start = time.perf_counter()
    model_paths, photo_paths = predict.split_items(job.items)
    files = predict.find_images(photo_paths)
    if not files:
        raise ReplicateError("no images found in " + ", ".join(str(p) for p in photo_paths))
    if job.ray:  # before anything is written: Ray installed, the cluster there
        cluster.connect(job.ray, log)
    tagger = Tagger(model_paths)
    for warning in tagger.warnings:
        warn(f"warning: {warning}")
    with store.Index(job.out) as index:
        if index.swept:
            log(f"removed {len(index.swept)} unfinished file(s) of a job that was killed")
        summary = update(index, files, tagger, job, log)
        summary["seconds"] = round(time.perf_counter() - start, 3)
        index.write_manifest(summary)
    log(_summary_line(summary, index.path))
    return summary


def update(index: store.Index, files: list[Path], tagger: Tagger, job: IndexJob, log) -> dict:
    """Tag into the open `index` what `plan` finds, compact it and write its listing table;
    returns the job's summary."""
    columns = [*store.FACTS, *tagger.column_names()]
    scan = scan_photos(files)
    found = store.snapshot(index.path, ["size", "mtime_ns", *_checksums(tagger)])
    works, counts = plan(scan, found.latest(), tagger)
    if any(w.carried for w in works):  # a model changed: its photos keep the others' tags
        whole = store.rows(index.path).set_index("path")
        for w in works:
            w.photos = w.photos.join(whole[w.carried], on="path") if w.carried else w.photos
    index.begin()
    tag_start = time.perf_counter()
    tagged = sum(_tag(w, job, tagger, index, log) for w in works)
    tag_seconds = time.perf_counter() - tag_start
    retagged = {p for w in works for p in w.photos.path}
    compacted = store.compact(found, set(scan.path), retagged, columns)
    # the listing pattern of an earlier call unless given: its listing table stays up to date
    pattern = job.listing_pattern or index.manifest().get("listing_pattern")
    table = store.rows(index.path, None if pattern else ["error"])
    listings = None
    if pattern:
        listings = write_listings(index, table, tagger.filters, pattern, job.threshold)
    return {
        "photos": len(table),
        **counts,
        "unreadable": int((table.error != "").sum()),
        "tagged": tagged,
        "tag_seconds": round(tag_seconds, 3),
        "photos_per_second": round(tagged / tag_seconds, 2) if tagged else None,
        "engine": f"ray ({job.ray})" if job.ray else "local threads",
        "generation": index.generation,
        "parts": len(store.part_files(index.path)),
        "compacted": compacted,
        "listings": None if listings is None else len(listings),
        "listing_pattern": pattern,
        "models": tagger.describe(),
        "columns": columns,
    }


def scan_photos(files: list[Path]) -> pd.DataFrame:
    """path, size, mtime_ns of each photo, in path order: what tells a changed photo without
    reading it."""
    stats = [os.stat(f) for f in files]
    return pd.DataFrame({
        "path": [str(f) for f in files],
        "size": [s.st_size for s in stats],
        "mtime_ns": [s.st_mtime_ns for s in stats],
    }).sort_values("path", ignore_index=True)  # fmt: skip


def _checksums(tagger: Tagger) -> list[str]:
    return [f"{m.name}{CHECKSUM}" for m in tagger.models]


def plan(scan: pd.DataFrame, old: pd.DataFrame, tagger: Tagger) -> tuple[list[Work], dict]:
    """What to tag: photos new or changed (size or modification time) with every model, the other
    photos with each model whose checksum differs from the one that tagged their row; and the
    counts of new, changed, retagged (a model changed), kept and gone photos."""
    known = scan.merge(old, on="path", how="left", suffixes=("", "_old"), indicator=True)
    new = (known._merge == "left_only").to_numpy()
    moved = (known["size"] != known["size_old"]) | (known["mtime_ns"] != known["mtime_ns_old"])
    changed = ~new & moved.to_numpy()
    models = tagger.models
    stale = np.column_stack([
        known.get(f"{m.name}{CHECKSUM}", pd.Series(index=known.index, dtype=object)).to_numpy()
        != tagger.checksums[m.name]
        for m in models
    ])  # fmt: skip
    # each photo's models to run as one number: bit j for model j; -1 for all of them
    need = np.where(new | changed, -1, stale.astype(np.int64) @ (1 << np.arange(len(models))))
    columns = [*store.FACTS, *tagger.column_names()]
    works = []
    for code in np.unique(need[need != 0]):  # -1 (every model) first
        names = None if code == -1 else [m.name for j, m in enumerate(models) if code >> j & 1]
        produced = set(store.FACTS) | set(tagger.column_names(names))
        carried = [] if names is None else [c for c in columns if c not in produced]
        photos = scan.iloc[np.flatnonzero(need == code)].reset_index(drop=True)
        works.append(Work(names, photos, carried))
    counts = {
        "new": int(new.sum()),
        "changed": int(changed.sum()),
        "retagged": int((need > 0).sum()),
        "kept": int((need == 0).sum()),
        "gone": int((~old.path.isin(scan.path)).sum()),
    }
    return works, counts


def _tag(work: Work, job: IndexJob, tagger: Tagger, index: store.Index, log) -> int:
    """Tag `work` into committed parts of the index's new generation, here or on Ray (`tagger`:
    every model, loaded); returns the photos tagged."""
    what = "every model" if work.names is None else ", ".join(work.names)
    log(f"tagging {len(work.photos)} photos with {what}")
    if job.ray:
        return cluster.tag(work, job, tagger, index, log)
    columns = [*store.FACTS, *tagger.column_names()]
    if work.names is not None:
        tagger = Tagger(tagger.paths, names=work.names)
    done = 0
    for rows in tag_parts(tagger, work, job.part_size, job.bs, job.workers):
        index.commit(rows.reindex(columns=columns))
        done += len(rows)
    return done


def tag_parts(tagger: Tagger, work: Work, part_size: int, bs: int, workers: int | None):
    """The rows of `work`'s photos, `part_size` at a time: decoded and hashed by threads in one
    stream across the parts (so a part's end does not stall the decoding), inferred in batches of
    `bs` (`onnx_engine.tagged`, as `predict` runs them)."""
    paths = [Path(p) for p in work.photos.path]
    stream = onnx_engine.decoded(
        paths, tagger.geometries, runtime.workers(workers), ahead=2 * bs, hashed=True
    )
    stream = runtime.progress(stream, len(paths), "indexing", unit="photos")
    results = onnx_engine.tagged(tagger.groups, stream, bs)
    for start in range(0, len(paths), part_size):
        chunk = work.photos.iloc[start : start + part_size]
        probs, photos = zip(*islice(results, len(chunk)))
        facts = chunk[["path", "size", "mtime_ns"]].assign(sha256=[p[2] for p in photos])
        rows = tagger.index_rows(facts, list(probs), [p[1] for p in photos])
        yield pd.concat([rows, chunk[work.carried].reset_index(drop=True)], axis=1)


def write_listings(
    index: store.Index, table: pd.DataFrame, found: dict, pattern: str, threshold: float = 0.5
) -> pd.DataFrame:
    """The per-listing table of the index's rows, as `predict` makes it (`filters.listings`, with
    the search filters `found` and their listing rules), written into the index; returns it."""
    listings = filters.listings(table, pattern, threshold, found)
    index.write_listings(listings, {n: filters.listing_rule(f, pattern) for n, f in found.items()})
    return listings


def _summary_line(s: dict, where: Path) -> str:
    rate = f" ({s['photos_per_second']:.1f} photos/s)" if s["photos_per_second"] else ""
    listings = f"; {s['listings']} listings" if s["listings"] is not None else ""
    return (
        f"{s['photos']} photos in the index: {s['tagged']} tagged{rate} ({s['new']} new, "
        f"{s['changed']} changed, {s['retagged']} for a changed model), {s['kept']} kept, "
        f"{s['gone']} gone and dropped, {s['unreadable']} unreadable{listings}; "
        f"{s['parts']} parts, {s['seconds']:.1f}s on {s['engine']}; index: {where}"
    )
