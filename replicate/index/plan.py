"""What an index job tags, and the rows it writes: the job's options, the photos scanned against the
index (`plan`), and a model set's rows (`rows`, `columns`), the same here and on Ray.

    python -c "from replicate.index.plan import scan_photos; print(scan_photos([]))"
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ..engine import onnx_models
from ..engine.model_set import ModelSet
from . import store


@dataclass(frozen=True, kw_only=True)
class IndexJob:
    """One `replicate index`: the models and photos (`items`, models first) and the options;
    built by keyword. Its defaults are the CLI's."""

    items: list[Path]
    out: Path = Path("exports/index")
    listing_pattern: str | None = None  # regex whose first group is the listing id
    ray: str | None = None  # None: this machine, in threads; "auto" or a cluster's address
    part_size: int = 1024  # photos per committed part: what a killed job may redo
    bs: int = 64
    workers: int | None = None  # threads decoding photos here; None: one per core
    features: bool = True  # keep each shared body's features per photo (encode_features)


@dataclass
class Work:
    """Photos to tag with some of the models (`names`; None: all), in path order, and the columns
    their new rows carry over from the old ones (the other models' tags)."""

    names: list[str] | None
    photos: pd.DataFrame  # path, size, mtime_ns, then the carried columns
    carried: list[str]
    # tagged from the rows' stored features (the heads alone, no photo read): `photos` then also
    # holds sha256 and the features columns
    from_features: bool = False


# A body's features as a row stores them: 2 bytes a value, as float16, but scaled to the photo's
# own range: its minimum and step (two float32s), then a uint16 code per value (lite0: 8 + 1280 x 2
# = 2,568 bytes a photo). Measured on 120 Houses photos with the tour's lite0 kitchen and exterior
# heads, the largest difference in a probability against float32 features: float16 3.99e-5, int16
# scaled to the largest value 1.26e-5, this 5.6e-6 (features after ReLU and pooling: 0 to 4.5,
# median 0.017).
def encode_features(values: np.ndarray) -> bytes:
    """One photo's features -> its stored bytes (the photo's minimum and step, the uint16 codes)."""
    values = np.asarray(values, np.float32)
    low, high = float(values.min()), float(values.max())
    step = (high - low) / 65535 or 1.0
    codes = np.round((values - low) / step).astype(np.uint16)
    return np.array([low, step], np.float32).tobytes() + codes.tobytes()


def features_columns(models: ModelSet) -> list[str]:
    """The features columns of `models`: one per body that heads share (run folders trained frozen
    with --freeze-bn); a bundle's and other models' bodies are not kept."""
    return sorted({onnx_models.features_name(m.body) for m in models.models if m.body})


def columns(models: ModelSet, features: bool = True) -> list[str]:
    """An index row's columns for `models`: the photo's facts, `predict`'s columns, each model's
    checksum, then (`features`) each shared body's features."""
    kept = features_columns(models) if features else []
    checksums = [store.checksum_column(m.name) for m in models.models]
    return [*store.FACTS, *models.columns, *checksums, *kept]


def rows(
    models: ModelSet,
    facts: pd.DataFrame,
    probs: list[dict | None],
    errors: list[str],
    features: bool = True,
) -> pd.DataFrame:
    """Index rows for photos: `facts` (path, size, mtime_ns, sha256), `predict`'s columns from
    their probabilities (None where `errors` says why there are none), each model's checksum and
    (`features`) each shared body's features (`encode_features`)."""
    table = models.table(probs, list(facts.path), errors)
    checksums = {store.checksum_column(n): sha for n, sha in models.checksums.items()}
    facts = facts.reset_index(drop=True)[["path", "size", "mtime_ns", "sha256"]]
    kept = {
        name: [None if p is None else encode_features(p[name]) for p in probs]
        for name in (features_columns(models) if features else [])
    }
    return pd.concat([facts, table.drop(columns="path")], axis=1).assign(**checksums, **kept)


def decode_features(column: pd.Series) -> np.ndarray:
    """A features column's bytes (`encode_features`) -> float32 N x D, what the heads take."""
    raw = np.stack([np.frombuffer(b, np.uint8) for b in column])
    low_step = raw[:, :8].copy().view(np.float32)
    return raw[:, 8:].copy().view(np.uint16).astype(np.float32) * low_step[:, 1:] + low_step[:, :1]


def from_features(work: Work, whole: pd.DataFrame, models: ModelSet) -> list[Work]:
    """`work` split in two where it can be: the photos whose rows (`whole`, by path) hold the
    features of every body the work's models stand on, tagged by their heads alone (no photo
    read), and the rest, from the photos. Work for every model (new or changed photos) and models
    without a shared body stay as they are."""
    if work.names is None:
        return [work]
    subset = models.subset(work.names)
    needed = features_columns(subset)
    if not needed or any(m.body is None for m in subset.models):
        return [work]
    if not set(needed) <= set(whole.columns):
        return [work]
    old = whole.reindex(work.photos.path)
    stored = (old.error.fillna("x") == "").to_numpy() & old[needed].notna().all(axis=1).to_numpy()
    if not stored.any():
        return [work]
    kept = work.photos[stored].reset_index(drop=True)
    kept = kept.assign(sha256=old.sha256.to_numpy()[stored], **{
        c: old[c].to_numpy()[stored] for c in needed if c not in kept.columns
    })  # fmt: skip
    rest = Work(work.names, work.photos[~stored].reset_index(drop=True), work.carried)
    return [
        Work(work.names, kept, work.carried, from_features=True),
        *([rest] if len(rest.photos) else []),
    ]


def scan_photos(files: list[Path]) -> pd.DataFrame:
    """path, size, mtime_ns of each photo, in path order: what tells a changed photo without
    reading it."""
    stats = [os.stat(f) for f in files]
    return pd.DataFrame({
        "path": [str(f) for f in files],
        "size": [s.st_size for s in stats],
        "mtime_ns": [s.st_mtime_ns for s in stats],
    }).sort_values("path", ignore_index=True)  # fmt: skip


def in_scope(paths: pd.Series, named: list[Path]) -> np.ndarray:
    """Which of the index's `paths` the call's photos and folders (`named`, as given) cover: a
    named file itself, or anything under a named folder (rows keep paths as they were given, so
    a folder's rows start with it). Vectorised: an index holds millions of rows."""
    covered = np.zeros(len(paths), dtype=bool)
    paths = paths.astype(str)  # a new index's empty column has no type
    for p in named:
        if p.is_dir():
            prefix = "" if str(p) == "." else str(p).rstrip("/") + "/"
            covered |= paths.str.startswith(prefix).to_numpy()
        else:
            covered |= (paths == str(p)).to_numpy()
    return covered


def plan(
    scan: pd.DataFrame,
    old: pd.DataFrame,
    models: ModelSet,
    covered: np.ndarray,
    features: bool = True,
) -> tuple[list[Work], dict]:
    """What to tag: photos new or changed (size or modification time) with every model, the other
    photos with each model whose checksum differs from the one that tagged their row; and the
    counts of new, changed, retagged (a model changed), kept and gone photos (rows the call
    covers, `covered` = `in_scope` of `old`, whose photo is no longer there), and of the rows
    elsewhere (under folders the call did not name: kept as they are)."""
    known = scan.merge(old, on="path", how="left", suffixes=("", "_old"), indicator=True)
    new = (known._merge == "left_only").to_numpy()
    moved = (known["size"] != known["size_old"]) | (known["mtime_ns"] != known["mtime_ns_old"])
    changed = ~new & moved.to_numpy()
    missing = pd.Series(index=known.index, dtype=object)
    stale = np.column_stack([
        known.get(store.checksum_column(m.name), missing).to_numpy() != models.checksums[m.name]
        for m in models.models
    ])  # fmt: skip
    # each photo's models to run as one number: bit j for model j; -1 for all of them
    need = np.where(new | changed, -1, stale.astype(np.int64) @ (1 << np.arange(len(stale.T))))
    everything = columns(models, features)
    works = []
    for code in np.unique(need[need != 0]):  # -1 (every model) first
        names = (
            None if code == -1 else [m.name for j, m in enumerate(models.models) if code >> j & 1]
        )
        produced = set(columns(models.subset(names), features))
        carried = [] if names is None else [c for c in everything if c not in produced]
        photos = scan.iloc[np.flatnonzero(need == code)].reset_index(drop=True)
        works.append(Work(names, photos, carried))
    counts = {
        "new": int(new.sum()),
        "changed": int(changed.sum()),
        "retagged": int((need > 0).sum()),
        "kept": int((need == 0).sum()),
        "gone": int((~old.path.isin(scan.path).to_numpy() & covered).sum()),
        "elsewhere": int((~covered).sum()),
    }
    return works, counts
