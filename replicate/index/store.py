"""The photo index on disk: a Parquet dataset written in parts, each committed atomically.

    python -m replicate.index.store exports/index     # its parts, rows and generations

An index folder (`replicate index ... --out INDEX_DIR`) holds:

- `photos/part-G<generation>-<id>.parquet`: the photo rows, one file per part. A part is written
  under a hidden name (`.tmp-*`) and renamed into place when complete (rename is atomic on a
  POSIX file system), so a part is either wholly there or not at all, whatever kills the job.
- `listings.parquet` and `listings_filters.json`: the per-listing table and the listing rules,
  written from the parts at the end of a job (also renamed into place).
- `index.json`: what the last complete job was (its models, columns, counts), written last.

Each job writes its parts under a new generation number. A photo's row is the one of the highest
generation (a job that retags a photo writes a newer row; until the job ends, the older stays in
its part), so a job killed mid-way leaves an index whose every row is a complete, committed row,
and the next job reads it the same way. At its end a job compacts: a part with rows that are
superseded or whose photos are gone is written again without them, so a finished index holds each
photo once and plain `pandas.read_parquet(INDEX_DIR / "photos")` reads it.

A job holds an exclusive lock on `INDEX_DIR/.lock` (flock: the kernel drops it when the process
ends, SIGKILL included), so two jobs never write one index, and the next job removes the hidden
files of one that was killed.

Why our own commit protocol and not Ray Data's or pyarrow's `write_dataset`: both write a
dataset's files in place under names of their choosing, so a killed job leaves half-written files
that look like parts; the index needs "a part is there only when complete" to resume.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import ReplicateError

PHOTOS, LISTINGS, LISTING_RULES, UNLISTED, MANIFEST = (
    "photos",
    "listings.parquet",
    "listings_filters.json",
    "listings_unmatched.txt",  # the photos the listing pattern does not match, one a line
    "index.json",
)
LOCK, TMP = ".lock", ".tmp-"
PART = re.compile(r"^part-G(\d{6})-([0-9a-f]{8})\.parquet$")
FACTS = ["path", "size", "mtime_ns", "sha256", "error"]  # each row's first columns
CHECKSUM = "_model_sha256"  # a row's column of the SHA-256 of the model that tagged it


def checksum_column(model: str) -> str:
    """The column of a row holding the SHA-256 of the model file `model`'s columns came from."""
    return f"{model}{CHECKSUM}"


def is_index(folder: Path) -> bool:
    return (Path(folder) / MANIFEST).is_file() or (Path(folder) / PHOTOS).is_dir()


class IndexFolder:
    """An index folder opened for writing: locked while open (`with IndexFolder(path) as folder:`), its
    dead job's hidden files removed."""

    def __init__(self, path: Path):
        self.path = Path(path)
        if self.path.exists() and not self.path.is_dir():
            raise ReplicateError(f"--out {self.path} is a file: give a folder for the index")
        if self.path.is_dir() and any(self.path.iterdir()) and not is_index(self.path):
            raise ReplicateError(
                f"--out {self.path} is a folder of other things, not an index: give a new or "
                "empty folder, or an index this command wrote"
            )
        self.parts_dir = self.path / PHOTOS
        self.parts_dir.mkdir(parents=True, exist_ok=True)
        self._lock = open(self.path / LOCK, "w")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.close()
            raise ReplicateError(
                f"another `replicate index` is writing {self.path}: wait for it to end"
            ) from None
        self.swept = sweep(self.path)
        self.columns: list[str] | None = None  # the job's (`begin`)

    def __enter__(self) -> IndexFolder:
        return self

    def __exit__(self, *exc) -> None:
        self._lock.close()

    def manifest(self) -> dict:
        return read_manifest(self.path)

    def begin(self, columns: list[str] | None = None) -> int:
        """Start a job's generation: one above every generation on disk and recorded (a killed
        job's parts included); returns it. `columns`: the job's row columns, in order, which
        every part it commits has (None: the rows' own)."""
        seen = [g for g, _ in part_files(self.path)]
        self.generation = max([*seen, self.manifest().get("generation", 0)]) + 1
        self.columns = columns
        return self.generation

    def commit(self, rows: pd.DataFrame) -> Path:
        """`rows` as a new part of the job's generation, written under a hidden name, flushed to
        disk and renamed into place: the part is there whole or not at all."""
        if self.columns is not None:
            rows = rows.reindex(columns=self.columns)
        return write_part(self.parts_dir, rows, self.generation)

    def write_listings(self, listings: pd.DataFrame, rules: dict | None, unlisted: list[str]):
        """The listing table, the listing rules and the photos in no listing (`unlisted`)."""
        table = arrow_table(listings)
        _replace(self.path / LISTINGS, lambda tmp: pq.write_table(table, tmp))
        names = "".join(f"{p}\n" for p in unlisted)
        _replace(self.path / UNLISTED, lambda tmp: tmp.write_text(names))
        if rules is not None:
            _replace(
                self.path / LISTING_RULES, lambda tmp: tmp.write_text(json.dumps(rules, indent=2))
            )

    def write_manifest(self, manifest: dict) -> None:
        _replace(self.path / MANIFEST, lambda tmp: tmp.write_text(json.dumps(manifest, indent=2)))


def write_part(parts_dir: Path, rows: pd.DataFrame, generation: int) -> Path:
    """`IndexFolder.commit` for a writer that holds no IndexFolder: a Ray task writing to the shared folder."""
    name = f"part-G{generation:06d}-{uuid.uuid4().hex[:8]}.parquet"
    final = Path(parts_dir) / name
    table = arrow_table(rows)
    _replace(final, lambda tmp: pq.write_table(table, tmp))
    return final


def arrow_table(rows: pd.DataFrame):
    """`rows` as Arrow with one schema whoever made them: strings as `string` (pandas' own str and
    an all-missing column, say the classes of a part whose photos all failed, alike), no pandas
    metadata (a Ray batch's would make readers restore pyarrow-backed dtypes)."""
    table = pa.Table.from_pandas(rows, preserve_index=False)
    same = [
        pa.field(
            f.name,
            pa.string() if pa.types.is_large_string(f.type) or pa.types.is_null(f.type) else f.type,
        )
        for f in table.schema
    ]
    return table.cast(pa.schema(same)).replace_schema_metadata(None)


def _replace(final: Path, write) -> None:
    """`write(tmp)` to a hidden file beside `final`, fsync it, rename it onto `final`, fsync the
    folder: after a crash `final` is the old file or the new one, never a part of one."""
    tmp = final.with_name(f"{TMP}{uuid.uuid4().hex}-{final.name}")
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
    folder = os.open(final.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def sweep(index_dir: Path) -> list[Path]:
    """Remove the hidden files a killed job left (a part or table it had not renamed into place);
    call only under the index's lock. Returns them."""
    found = [*Path(index_dir).glob(f"{TMP}*"), *(Path(index_dir) / PHOTOS).glob(f"{TMP}*")]
    for f in found:
        f.unlink(missing_ok=True)
    return found


def read_manifest(index_dir: Path) -> dict:
    try:
        return json.loads((Path(index_dir) / MANIFEST).read_text())
    except (OSError, ValueError):
        return {}


def part_files(index_dir: Path) -> list[tuple[int, Path]]:
    """(generation, file) of every committed part, oldest generation first."""
    found = []
    for f in (Path(index_dir) / PHOTOS).glob("part-G*.parquet"):
        m = PART.match(f.name)
        if m:
            found.append((int(m[1]), f))
    return sorted(found, key=lambda gf: (gf[0], gf[1].name))


def _read_part(path: Path, columns: list[str] | None) -> tuple[pd.DataFrame, list[str]]:
    """(the part's `columns` that it has, all if None; the part's own columns)."""
    names = pq.read_schema(path).names
    present = None if columns is None else [c for c in columns if c in names]
    return pq.read_table(path, columns=present).to_pandas(), names


@dataclass
class Snapshot:
    """The committed parts as a job found them: every row (superseded ones too) with `path`, the
    columns read, its part (`_part`, an index into `parts`) and position there (`_row`); and each
    part's generation, file and columns, oldest generation first."""

    rows: pd.DataFrame
    parts: list[tuple[int, Path, list[str]]]

    def latest(self) -> pd.DataFrame:
        """Every photo's current row (the highest generation's), sorted by path."""
        table = self.rows.drop_duplicates("path", keep="last")  # parts are read oldest first
        table = table.sort_values("path", kind="stable").drop(columns=["_part", "_row"])
        return table.reset_index(drop=True)


def snapshot(index_dir: Path, columns: list[str] | None = None) -> Snapshot:
    """The index's committed parts, `path` and `columns` (those a part has; None: all) read."""
    frames, parts = [], []
    for i, (generation, f) in enumerate(part_files(index_dir)):
        frame, names = _read_part(f, None if columns is None else ["path", *columns])
        frames.append(frame.assign(_part=i, _row=np.arange(len(frame))))
        parts.append((generation, f, names))
    if not frames:
        empty = pd.DataFrame({c: [] for c in ["path", *(columns or []), "_part", "_row"]})
        return Snapshot(empty, [])
    return Snapshot(pd.concat(frames, ignore_index=True), parts)


def rows(index_dir: Path, columns: list[str] | None = None) -> pd.DataFrame:
    """Every photo's current row (`columns`: those that exist, `path` always; None: all), sorted
    by path; an empty frame for an index with no parts yet."""
    return snapshot(index_dir, columns).latest()


def compact(found: Snapshot, live: set[str], retagged: set[str], columns: list[str]) -> dict:
    """Write again, without their dead rows, the parts of `found` (the snapshot a job took before
    it wrote) holding a row superseded by a newer generation's or by this job's (`retagged`), a
    photo not in `live`, or columns other than `columns` (a model no longer indexed); a part with
    no live row is removed. The job's own parts are complete and current, so they are not read
    again. A part rewritten keeps its generation, and its new file is in place before the old one
    goes, so a crash in between leaves a duplicate row that reading ignores and the next job
    removes. Returns {"rewritten": n, "removed": n}."""
    every = found.rows
    winner = (
        ~every.duplicated("path", keep="last") & every.path.isin(live) & ~every.path.isin(retagged)
    )
    done = {"rewritten": 0, "removed": 0}
    for i, (generation, f, names) in enumerate(found.parts):
        mine = every._part == i
        keep = every._row[mine & winner].to_numpy()
        if len(keep) == mine.sum() and names == columns:
            continue
        if len(keep):
            table, _ = _read_part(f, None)
            write_part(f.parent, table.iloc[keep].reindex(columns=columns), generation)
            done["rewritten"] += 1
        else:
            done["removed"] += 1
        f.unlink()
    return done


def merge_small(index_dir: Path, part_size: int) -> int:
    """Merge the parts of fewer than `part_size` rows (each incremental call commits one) into
    parts of up to `part_size`, so a growing index does not become thousands of small files.
    Called after `compact`: every part then holds current rows in the same columns. A merged
    part takes the highest generation of those it merges, and is in place before they go (a crash
    in between leaves duplicates of equal rows, which reading and the next job resolve). Returns
    how many parts were merged."""
    small = [(g, f) for g, f in part_files(index_dir) if pq.read_metadata(f).num_rows < part_size]
    if len(small) < 2:
        return 0
    rows = pd.concat([_read_part(f, None)[0] for _, f in small], ignore_index=True)
    rows = rows.drop_duplicates("path", keep="last")  # parts are listed oldest generation first
    generation = max(g for g, _ in small)
    for start in range(0, len(rows), part_size):
        write_part(Path(index_dir) / PHOTOS, rows.iloc[start : start + part_size], generation)
    for _, f in small:
        f.unlink()
    return len(small)


if __name__ == "__main__":
    index = Path(sys.argv[1])
    for generation, f in part_files(index):
        print(f.name, generation, len(_read_part(f, ["path"])[0]))
    print(f"{len(rows(index, []))} photos")
