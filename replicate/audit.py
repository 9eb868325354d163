"""Audit a task's photos before trusting a number: duplicates, leaks across the split, one photo
under two labels, and photos a scraper should not have kept.

    replicate audit rooms

Every photo gets a fingerprint: the SHA-256 of its bytes (exact copies) and perceptual hashes
(imagehash's pHash, 64 bits) of three centre crops, 100%, 90% and 80% of each side. Two photos are
near-duplicates when the closest pair of their crops' hashes differs in at most `THRESHOLD` bits:
a resized, recompressed or re-saved copy differs by 0-2 bits, a copy cropped to 90% or 80%
matches a crop of the original; on the Houses photos different photos differ by 10 or more
(README, "Auditing the data", has the measurements). Near-duplicates are grouped
(connected components: a copy of a copy is in the group), and each group is flagged:

- leak: copies in train and in valid, so validation accuracy is inflated;
- conflict: the same photo under different labels, a contradiction to learn;
- duplicate: copies within one split, which overweight that photo.

Quality checks flag what a scraped set holds: too small, nearly uniform (blank), very dark or
blown out, an extreme aspect ratio, unreadable. Uniform photos are left out of the grouping:
their hashes say nothing.

Fingerprints are cached per file in TASK/_audit/fingerprints.csv, keyed on path, size and mtime,
so auditing again costs a second.
"""
from __future__ import annotations

import hashlib
import io
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import imagehash
import numpy as np
import pandas as pd
from PIL import Image, ImageOps
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from .errors import ReplicateError

THRESHOLD = 8  # bits of 64; see the module docstring and the README for how it was chosen
CROPS = (1.0, 0.9, 0.8)  # centre crops hashed per photo
# Quality limits: short side in px, grey-level standard deviation and mean (0-255), long/short side.
MIN_SIDE, MIN_STD, DARK, BRIGHT, MAX_ASPECT = 100, 6.0, 30.0, 225.0, 3.0
FINGERPRINT_COLUMNS = ["path", "size", "mtime_ns", "sha256", "phash", "width", "height", "mean", "std", "error"]
FINDING_COLUMNS = ["finding", "group", "n", "files", "splits", "labels", "identical", "distance", "detail"]


# --- fingerprints --------------------------------------------------------------------------------

def _centre(image: Image.Image, share: float) -> Image.Image:
    if share == 1.0:
        return image
    w, h = image.size
    cw, ch = max(1, round(w * share)), max(1, round(h * share))
    left, top = (w - cw) // 2, (h - ch) // 2
    return image.crop((left, top, left + cw, top + ch))


def fingerprint(source: Path | bytes) -> dict:
    """sha256, the pHashes of the centre crops (hex, space-separated), size and grey-level statistics
    of one photo (EXIF orientation applied); `error` says why a file could not be read."""
    try:
        data = source if isinstance(source, bytes) else Path(source).read_bytes()
    except OSError as e:
        return {"sha256": "", "phash": "", "width": 0, "height": 0, "mean": 0.0, "std": 0.0, "error": str(e)}
    result = {"sha256": hashlib.sha256(data).hexdigest()}
    try:
        with Image.open(io.BytesIO(data)) as im:
            gray = ImageOps.exif_transpose(im).convert("L")
    except Exception as e:  # PIL raises many types for files that are not images
        return {**result, "phash": "", "width": 0, "height": 0, "mean": 0.0, "std": 0.0,
                "error": f"{type(e).__name__}: {e}".splitlines()[0]}
    width, height = gray.size
    small = gray.copy()
    small.thumbnail((128, 128))
    pixels = np.asarray(small, dtype=np.float32)
    hashes = " ".join(str(imagehash.phash(_centre(gray, share))) for share in CROPS)
    return {**result, "phash": hashes, "width": width, "height": height, "mean": float(pixels.mean()),
            "std": float(pixels.std()), "error": ""}


def fingerprint_many(sources: list) -> list[dict]:
    """`fingerprint` of each file or bytes, in parallel processes when there are many."""
    workers = min(len(sources) // 64 + 1, os.cpu_count() or 1)
    if workers <= 1:
        return [fingerprint(s) for s in sources]
    with ProcessPoolExecutor(workers) as pool:
        return list(pool.map(fingerprint, sources, chunksize=32))


def fingerprints(files: list[Path], cache: Path | None = None, log=None) -> pd.DataFrame:
    """One row per file (FINGERPRINT_COLUMNS), in `files`' order, reusing cached rows whose path, size
    and mtime match; the rest computed in parallel processes. The cache is rewritten to hold exactly
    these files when anything changed."""
    stats = {str(f): os.stat(f) for f in files}
    cached = _read_cache(cache)
    current = {f: st for f, st in stats.items()
               if f in cached and (cached[f]["size"], cached[f]["mtime_ns"]) == (st.st_size, st.st_mtime_ns)}
    todo = [f for f in stats if f not in current]
    computed = dict(zip(todo, fingerprint_many([Path(f) for f in todo]))) if todo else {}
    rows = [cached[f] if f in current else {"path": f, "size": st.st_size, "mtime_ns": st.st_mtime_ns, **computed[f]}
            for f, st in stats.items()]
    frame = pd.DataFrame(rows, columns=FINGERPRINT_COLUMNS)
    if cache is not None and (todo or len(cached) != len(frame)):  # new files, or moved/removed ones to forget
        cache.parent.mkdir(parents=True, exist_ok=True)
        frame.to_csv(cache, index=False)
    if log:
        log(f"fingerprints: {len(files)} photos, {len(files) - len(todo)} from the cache")
    return frame


def _read_cache(cache: Path | None) -> dict[str, dict]:
    if cache is None or not cache.is_file():
        return {}
    try:
        frame = pd.read_csv(cache, dtype={"sha256": str, "phash": str, "error": str}, keep_default_na=False)
    except (OSError, ValueError, pd.errors.ParserError):
        return {}  # a damaged cache is rebuilt, not trusted
    if list(frame.columns) != FINGERPRINT_COLUMNS:
        return {}
    return {r["path"]: r for r in frame.to_dict("records")}


# --- near-duplicate groups -------------------------------------------------------------------------

def hash_matrix(phashes: list[str]) -> np.ndarray:
    """(n, crops) uint64 from the space-separated hex hashes."""
    return np.array([[int(h, 16) for h in p.split()] for p in phashes], dtype=np.uint64).reshape(len(phashes), -1)


def near_pairs(hashes: np.ndarray, threshold: int = THRESHOLD) -> pd.DataFrame:
    """Pairs (i < j) whose closest crop hashes differ in at most `threshold` bits, with that distance.

    Every pair is compared, with numpy's bit count over XORs in blocks of rows to bound memory:
    exact for any threshold, n^2 work: 0.4 s for 2,140 photos and 8 s for 10,000 on 2 cores, so
    minutes beyond 30,000, where an index (a BK-tree) would start to pay off."""
    n, k = hashes.shape
    found = []
    block = max(1, 4_000_000 // max(1, n * k * k))
    for start in range(0, n, block):
        rows = hashes[start:start + block]
        bits = np.bitwise_count(rows[:, None, :, None] ^ hashes[None, :, None, :]).min(axis=(2, 3))
        i, j = np.nonzero(bits <= threshold)
        i += start
        keep = j > i
        found.append(pd.DataFrame({"i": i[keep], "j": j[keep], "distance": bits[i[keep] - start, j[keep]]}))
    return pd.concat(found, ignore_index=True) if found else pd.DataFrame(columns=["i", "j", "distance"])


def group_ids(n: int, pairs: pd.DataFrame) -> np.ndarray:
    """A group number per item: connected components of the near-duplicate pairs (scipy's)."""
    graph = coo_matrix((np.ones(len(pairs)), (pairs.i.to_numpy(int), pairs.j.to_numpy(int))), shape=(n, n))
    return connected_components(graph, directed=False)[1]


def hashable(frame: pd.DataFrame) -> np.ndarray:
    """Rows whose perceptual hash means something: readable and not nearly uniform."""
    return ((frame.error == "") & (frame["std"] >= MIN_STD)).to_numpy()


def linked(frame: pd.DataFrame, threshold: int = THRESHOLD) -> tuple[np.ndarray, pd.DataFrame]:
    """(group id per row, -1 for rows left out; the near pairs as row numbers of `frame`)."""
    usable = np.flatnonzero(hashable(frame))
    groups = np.full(len(frame), -1)
    if len(usable) == 0:
        return groups, pd.DataFrame(columns=["i", "j", "distance"])
    pairs = near_pairs(hash_matrix(frame.phash.iloc[usable].tolist()), threshold)
    groups[usable] = group_ids(len(usable), pairs)
    pairs = pairs.assign(i=usable[pairs.i.to_numpy(int)], j=usable[pairs.j.to_numpy(int)])
    return groups, pairs


def link_owners(owners: list, photos: list, threshold: int = THRESHOLD) -> dict:
    """{owner: group}: owners (houses, listings) that share a near-duplicate photo, transitively,
    get the same group; `photos[k]` (bytes or a file) belongs to `owners[k]`."""
    frame = pd.DataFrame(fingerprint_many(photos))
    _, pairs = linked(frame, threshold)
    names = sorted(set(owners))
    index = {o: i for i, o in enumerate(names)}
    edges = pd.DataFrame({"i": [index[owners[i]] for i in pairs.i], "j": [index[owners[j]] for j in pairs.j]})
    return dict(zip(names, group_ids(len(names), edges)))


# --- a task's findings ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Audit:
    """A task's photos (fingerprints with split and label), its findings, and the time it took."""

    photos: pd.DataFrame
    findings: pd.DataFrame
    seconds: float
    threshold: int

    def counts(self) -> dict:
        """The numbers a run records in metrics.json and a report shows."""
        f = self.findings
        leaks = f[f.finding == "leak"]
        leaked_valid = sum(s.split(";").count("valid") for s in leaks.splits)
        return {"photos": len(self.photos), "threshold": self.threshold,
                "leak_groups": len(leaks), "leaked_valid_photos": int(leaked_valid),
                "conflict_groups": int((f.finding == "conflict").sum()),
                "duplicate_groups": int((f.finding == "duplicate").sum()),
                "quality_findings": int((~f.finding.isin(["leak", "conflict", "duplicate"])).sum())}


def split_and_label(path: Path, task_dir: Path) -> tuple[str, str]:
    """(split, class) of a photo at TASK/<split>/<class>/..."""
    parts = Path(path).resolve().relative_to(task_dir.resolve()).parts
    return parts[0], parts[1]


def audit_task(task_dir: Path, files: list[Path], threshold: int = THRESHOLD, log=None) -> Audit:
    """Fingerprint (cached) and check a task's photos; `files` are its train and valid images."""
    start = time.perf_counter()
    photos = fingerprints(files, cache=task_dir / "_audit" / "fingerprints.csv", log=log)
    where = [split_and_label(p, task_dir) for p in photos.path]
    photos["split"], photos["label"] = [w[0] for w in where], [w[1] for w in where]
    photos["rel"] = [Path(p).resolve().relative_to(task_dir.resolve()).as_posix() for p in photos.path]
    photos["group"], pairs = linked(photos, threshold)
    findings = pd.concat([_group_findings(photos, pairs), _quality_findings(photos)], ignore_index=True)
    return Audit(photos, findings, time.perf_counter() - start, threshold)


def _group_findings(photos: pd.DataFrame, pairs: pd.DataFrame) -> pd.DataFrame:
    rows = []
    sizes = photos[photos.group >= 0].groupby("group").size()
    distance = {}
    for p in pairs.itertuples():
        g = photos.group.iat[p.i]
        distance[g] = max(distance.get(g, 0), int(p.distance))
    for number, g in enumerate(sorted(sizes[sizes > 1].index), 1):
        members = photos[photos.group == g].sort_values(["split", "rel"], ascending=[True, True])
        base = {"group": number, "n": len(members), "files": ";".join(members.rel), "splits": ";".join(members.split),
                "labels": ";".join(members.label), "identical": members.sha256.nunique() == 1,
                "distance": distance.get(g, 0)}
        if members.split.nunique() > 1:
            rows.append({**base, "finding": "leak", "detail": "copies in train and valid: validation accuracy is inflated"})
        if members.label.nunique() > 1:
            rows.append({**base, "finding": "conflict",
                         "detail": "the same photo under " + " and ".join(sorted(set(members.label)))})
        if (members.groupby("split").size() > 1).any():
            rows.append({**base, "finding": "duplicate", "detail": "copies within one split overweight this photo"})
    return pd.DataFrame(rows, columns=FINDING_COLUMNS)


def _quality_findings(photos: pd.DataFrame) -> pd.DataFrame:
    short = photos[["width", "height"]].min(axis=1)
    aspect = photos[["width", "height"]].max(axis=1) / short.clip(lower=1)
    ok = photos.error == ""
    checks = [
        ("unreadable", ~ok, lambda r: r.error),
        ("too_small", ok & (short < MIN_SIDE), lambda r: f"{r.width}x{r.height}: short side below {MIN_SIDE} px"),
        ("uniform", ok & (photos["std"] < MIN_STD), lambda r: f"nearly uniform (grey-level std {r['std']:.1f})"),
        ("dark", ok & (photos["mean"] < DARK), lambda r: f"very dark (mean grey level {r['mean']:.0f} of 255)"),
        ("bright", ok & (photos["mean"] > BRIGHT), lambda r: f"blown out (mean grey level {r['mean']:.0f} of 255)"),
        ("aspect", ok & (aspect > MAX_ASPECT), lambda r: f"{r.width}x{r.height}: aspect ratio above {MAX_ASPECT:g}"),
    ]
    rows = []
    for name, mask, detail in checks:
        for _, r in photos[mask].iterrows():
            rows.append({"finding": name, "group": "", "n": 1, "files": r.rel, "splits": r.split, "labels": r.label,
                         "identical": "", "distance": "", "detail": detail(r)})
    return pd.DataFrame(rows, columns=FINDING_COLUMNS)


# --- what to do about them ------------------------------------------------------------------------

def group_table(result: Audit) -> pd.DataFrame:
    """One row per near-duplicate group: its findings joined (leak+conflict), files and labels; for the terminal."""
    groups = result.findings[result.findings.group != ""]
    return groups.groupby("group").agg(flags=("finding", "+".join), files=("files", "first"),
                                       labels=("labels", "first"))


def suggested_decisions(result: Audit, task_dir: Path) -> pd.DataFrame:
    """A decisions file for `replicate clean` (path,action,new_label, and why): in each group without
    a label conflict, keep one copy (a training one if the group leaks) and remove the others;
    conflicts and quality findings are left as `keep` for a person to decide."""
    rows = []
    groups = result.photos[result.photos.group >= 0]
    conflicted = {g for g, members in groups.groupby("group") if members.label.nunique() > 1}
    for g, members in groups.groupby("group"):
        if len(members) < 2:
            continue
        members = members.sort_values(["split", "rel"])  # "train" sorts before "valid": a training copy is kept
        for k, row in enumerate(members.itertuples()):
            if g in conflicted:
                action, why = "keep", "label conflict: choose the right label (relabel) or remove"
            elif k == 0:
                action, why = "keep", "the copy kept"
            else:
                action = "remove"
                why = "leak: a copy of a training photo" if row.split != members.split.iat[0] else "duplicate"
            rows.append({"path": str((task_dir / row.rel).resolve()), "action": action, "new_label": "", "reason": why})
    return pd.DataFrame(rows, columns=["path", "action", "new_label", "reason"])


def summary(result: Audit) -> str:
    """The printed summary: counts per finding."""
    c = result.counts()
    quality = result.findings[~result.findings.finding.isin(["leak", "conflict", "duplicate"])]
    kinds = ", ".join(f"{n} {k}" for k, n in quality.finding.value_counts().items()) or "none"
    return (f"{c['photos']} photos audited in {result.seconds:.1f}s; near-duplicate threshold {c['threshold']} of "
            f"64 bits\n  leak: {c['leak_groups']} groups with copies in train and valid "
            f"({c['leaked_valid_photos']} valid photos)\n  conflict: {c['conflict_groups']} photos under two labels\n"
            f"  duplicate: {c['duplicate_groups']} groups with copies within one split\n  quality: {kinds}")


def warning_line(counts: dict) -> str:
    """One line for `run`/`compare` when the split leaks or labels conflict; '' when clean."""
    problems = []
    if counts["leak_groups"]:
        problems.append(f"{counts['leak_groups']} near-duplicate group(s) span train and valid "
                        f"({counts['leaked_valid_photos']} valid photos): validation accuracy is inflated")
    if counts["conflict_groups"]:
        problems.append(f"{counts['conflict_groups']} photo(s) under two labels: a contradiction to learn")
    return f"warning: {'; '.join(problems)}; see: replicate audit TASK" if problems else ""


def check_threshold(threshold: int) -> None:
    if not 0 <= threshold <= 32:
        raise ReplicateError(f"--threshold {threshold}: give a number of differing bits from 0 to 32 (default {THRESHOLD})")
