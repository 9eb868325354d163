"""Audit a task's photos before trusting a number: duplicates, leaks across the split, one photo
under two labels, and photos a scraper should not have kept.

    replicate audit rooms

Every photo gets a fingerprint: the SHA-256 of its bytes (exact copies) and perceptual hashes
(imagehash's pHash, 64 bits) of three centre crops, 100%, 90% and 80% of each side, of its
content: uniform borders (letterbox or pillarbox padding, white, black or any flat colour, and
flat frames) are trimmed first, so a padded copy hashes like its original and two padded photos
are not compared by their padding. Finding near-duplicates takes three steps:

1. search: pairs where the whole content of one photo is within `THRESHOLD` bits of the whole or
   of a crop of the other (a resized, recompressed or re-saved copy differs by 0-2 bits, a copy
   cropped to 90% or 80% matches a crop of the original). The search is an exact multi-index
   search (`hamming`), not a comparison of every pair: a million photos take 37-43 s on 2 cores.
2. confirm: a second, independent signal, the correlation of the two photos' matched crops
   aligned at 16 x 16 px in colour, must be at least `SIMILAR` (on the Houses rooms photos copies
   measure 0.9988 or more, and 1,646 pairs of different photos within 16 bits 0.85 or less;
   README, "Auditing the data"). Byte-identical photos need no confirmation.
3. group: every member of a group is a confirmed near-duplicate of every other member; A~B and
   B~C with A far from C make no group of three.

Each group is flagged:

- leak: copies in train and in valid, so validation accuracy is inflated;
- conflict: the same photo under different labels, a contradiction to learn;
- duplicate: copies within one split, which overweight that photo.

Quality checks flag what a scraped set holds: too small, nearly uniform (blank), very dark or
blown out (levels of the content inside any border), an extreme aspect ratio, unreadable. Uniform
photos and those whose content is under 32 px are left out of the grouping: their hashes say
nothing.

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
from PIL import ExifTags, Image
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from . import hamming, photos, runtime
from .errors import ReplicateError

THRESHOLD = 8  # bits of 64; see the module docstring and the README for how it was chosen
CROPS = (
    1.0,
    0.9,
    0.8,
)  # centre crops of the content hashed per photo; pairs compare the first with each
# Quality limits: short side in px, grey-level standard deviation and mean (0-255), long/short side.
MIN_SIDE, MIN_STD, DARK, BRIGHT, MAX_ASPECT = 100, 6.0, 30.0, 225.0, 3.0
# A border line (row or column) of padding: grey-level std at most FLAT_STD, its mean within FLAT_STEP
# of the outermost line's. Padding stays exactly flat through JPEG (a block of one colour keeps only
# its DC term) up to a few px from the content; a camera's grain, even on a white wall, is above
# 0.5, and at 1.0 or more a recompressed copy's smoothed edges were trimmed where the original's were not.
FLAT_STD, FLAT_STEP = 0.5, 2.0
EXTREME = 5  # grey levels from black or white: the usual padding
RINGING = 8  # px beside a border that JPEG's ringing may have left uneven (one 8 x 8 block)
MIN_CONTENT = 32  # px: content shorter than this is not hashed (pHash reduces to 32 x 32)
PADDED = 0.02  # share of the image in trimmed borders from which a photo counts as padded
ALIGNED_SIDE, SIMILAR = (
    16,
    0.9,
)  # the confirmation: crops compared at 16 x 16, correlation at least 0.9
DECODE_CROP = (
    256  # large JPEGs are decoded at a reduced scale, still 512 px or more (photos.open_photo)
)
# Cached fingerprints of another version are computed again: 2 hashes the content inside borders.
FINGERPRINT_VERSION = 2
FINGERPRINT_COLUMNS = [
    "version",
    "path",
    "size",
    "mtime_ns",
    "sha256",
    "phash",
    "width",
    "height",
    "box",
    "mean",
    "std",
    "error",
]
FINDING_COLUMNS = [
    "finding",
    "group",
    "n",
    "files",
    "splits",
    "labels",
    "identical",
    "distance",
    "detail",
]
PAIR_COLUMNS = ["i", "j", "distance", "crop_i", "crop_j"]


# --- fingerprints --------------------------------------------------------------------------------


def _open(data: bytes, mode: str) -> tuple[Image.Image, tuple[int, int]]:
    """The photo upright in `mode`, decoded as training and serving decode it (`photos.open_photo`,
    as for a model whose crop is DECODE_CROP), and its full upright (width, height)."""
    with Image.open(io.BytesIO(data)) as im:  # the header only: the size before a reduced decode
        turned = im.getexif().get(ExifTags.Base.Orientation, 1) in (5, 6, 7, 8)
        full = im.size[::-1] if turned else im.size
    return photos.open_photo(io.BytesIO(data), DECODE_CROP).convert(mode), full


def _flat_lines(means: np.ndarray, stds: np.ndarray) -> int:
    """How many lines from the start are a border: flat and at the level of the first, then up to
    RINGING more lines that JPEG's ringing beside the photo left nearly so. White and black lines
    may ring a little from the start: a border narrower than RINGING is all ringing."""
    extreme = (means >= 255 - EXTREME) | (means <= EXTREME)
    flat = ((stds <= FLAT_STD) | (extreme & (stds <= 2 * FLAT_STD))) & (
        np.abs(means - means[0]) <= FLAT_STEP
    )
    run = len(flat) if flat.all() else int(np.argmin(flat))
    if run == 0 or run == len(flat):
        return run
    near = (stds[run : run + RINGING] <= 4 * FLAT_STEP) & (
        np.abs(means[run : run + RINGING] - means[0]) <= 4 * FLAT_STEP
    )
    return run + (len(near) if near.all() else int(np.argmin(near)))


def content_box(gray: np.ndarray) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) inside uniform borders: letterbox or pillarbox padding of any flat
    colour, or a flat frame; each side trimmed on its own, again until nothing changes (a photo
    with its own white bands, pillarboxed in black, has two borders). A photo flat throughout keeps
    its whole box (it is then `uniform`, and not hashed).

    Hand-written because PIL's `getbbox` after a difference with the corner colour needs one
    colour for all sides and trims nothing when JPEG noise touches the padding."""
    left, top, right, bottom = 0, 0, gray.shape[1], gray.shape[0]
    while True:
        inner = gray[top:bottom, left:right]
        # A line's ends are left out of its statistics: the ringing where an outer border met this
        # one would make a band inside a pillarbox look uneven.
        ends = RINGING // 2 if min(inner.shape) > 4 * RINGING else 0
        rows = inner[:, ends : inner.shape[1] - ends]
        rows_mean, rows_std = rows.mean(axis=1), rows.std(axis=1)
        cut_top = _flat_lines(rows_mean, rows_std)
        if cut_top == len(rows_mean):  # flat throughout: nothing inside to keep apart from a border
            return left, top, right, bottom
        cut_bottom = _flat_lines(rows_mean[::-1], rows_std[::-1])
        inner = inner[cut_top : len(rows_mean) - cut_bottom]
        cols = inner[ends : inner.shape[0] - ends]
        cols_mean, cols_std = cols.mean(axis=0), cols.std(axis=0)
        cut_left = _flat_lines(cols_mean, cols_std)
        cut_right = _flat_lines(cols_mean[::-1], cols_std[::-1])
        if (
            cut_left + cut_right >= len(cols_mean)
            or cut_top == cut_bottom == cut_left == cut_right == 0
        ):
            return left, top, right, bottom
        left, top, right, bottom = (
            left + cut_left,
            top + cut_top,
            right - cut_right,
            bottom - cut_bottom,
        )


def _crop(image: Image.Image, box: tuple[int, int, int, int], share: float) -> Image.Image:
    """The centre `share` of each side of `box` (in `image`'s pixels)."""
    left, top, right, bottom = box
    w, h = right - left, bottom - top
    cw, ch = max(1, round(w * share)), max(1, round(h * share))
    x, y = left + (w - cw) // 2, top + (h - ch) // 2
    return image.crop((x, y, x + cw, y + ch))


def _scaled(box: tuple[int, ...], scale: tuple[float, float]) -> tuple[int, int, int, int]:
    sx, sy = scale
    return round(box[0] * sx), round(box[1] * sy), round(box[2] * sx), round(box[3] * sy)


def fingerprint(source: Path | bytes) -> dict:
    """sha256; the pHashes of the centre crops of the content inside any uniform border (hex,
    space-separated); the upright size; `box`, the content's "left top right bottom" in that size;
    grey-level mean and std of the content. `error` says why a file could not be read."""
    empty = {"phash": "", "width": 0, "height": 0, "box": "", "mean": 0.0, "std": 0.0}
    try:
        data = source if isinstance(source, bytes) else Path(source).read_bytes()
    except OSError as e:
        return {"sha256": "", **empty, "error": str(e)}
    result = {"sha256": hashlib.sha256(data).hexdigest()}
    try:
        gray, (width, height) = _open(data, "L")
    except Exception as e:  # PIL raises many types for files that are not images
        return {**result, **empty, "error": f"{type(e).__name__}: {e}".splitlines()[0]}
    box = content_box(np.asarray(gray, dtype=np.float32))
    full_box = _scaled(box, (width / gray.width, height / gray.height))
    content = gray.crop(box)
    hashes = ""
    if min(full_box[2] - full_box[0], full_box[3] - full_box[1]) >= MIN_CONTENT:
        hashes = " ".join(str(imagehash.phash(_crop(gray, box, share))) for share in CROPS)
    content.thumbnail((128, 128))
    pixels = np.asarray(content, dtype=np.float32)
    return {
        **result,
        "phash": hashes,
        "width": width,
        "height": height,
        "box": " ".join(map(str, full_box)),
        "mean": float(pixels.mean()),
        "std": float(pixels.std()),
        "error": "",
    }


def _pool_map(function, items: list, chunksize: int = 32) -> list:
    """`function` over `items`, in one process per core when there are many (PIL's decode holds the GIL)."""
    workers = min(len(items) // 64 + 1, runtime.cores())
    if workers <= 1:
        return [function(item) for item in items]
    with ProcessPoolExecutor(workers) as pool:
        return list(pool.map(function, items, chunksize=chunksize))


def fingerprint_many(sources: list) -> list[dict]:
    """`fingerprint` of each file or bytes, on all cores when there are many."""
    return _pool_map(fingerprint, sources)


def fingerprints(files: list[Path], cache: Path | None = None, log=None) -> pd.DataFrame:
    """One row per file (FINGERPRINT_COLUMNS), in `files`' order, reusing cached rows whose path, size
    and mtime match; the rest computed in parallel processes. The cache is rewritten to hold exactly
    these files when anything changed."""
    stats = {str(f): os.stat(f) for f in files}
    cached = _read_cache(cache)
    current = {
        f: st
        for f, st in stats.items()
        if f in cached
        and (cached[f]["size"], cached[f]["mtime_ns"]) == (st.st_size, st.st_mtime_ns)
    }
    todo = [f for f in stats if f not in current]
    computed = dict(zip(todo, fingerprint_many([Path(f) for f in todo]))) if todo else {}
    rows = [
        cached[f]
        if f in current
        else {
            "version": FINGERPRINT_VERSION,
            "path": f,
            "size": st.st_size,
            "mtime_ns": st.st_mtime_ns,
            **computed[f],
        }
        for f, st in stats.items()
    ]
    frame = pd.DataFrame(rows, columns=FINGERPRINT_COLUMNS)
    if cache is not None and (
        todo or len(cached) != len(frame)
    ):  # new files, or moved/removed ones to forget
        cache.parent.mkdir(parents=True, exist_ok=True)
        frame.to_csv(cache, index=False)
    if log:
        log(f"fingerprints: {len(files)} photos, {len(files) - len(todo)} from the cache")
    return frame


def _read_cache(cache: Path | None) -> dict[str, dict]:
    if cache is None or not cache.is_file():
        return {}
    try:
        frame = pd.read_csv(
            cache, dtype={"sha256": str, "phash": str, "error": str}, keep_default_na=False
        )
    except (OSError, ValueError, pd.errors.ParserError):
        return {}  # a damaged cache is rebuilt, not trusted
    if list(frame.columns) != FINGERPRINT_COLUMNS or (frame.version != FINGERPRINT_VERSION).any():
        return {}
    return {r["path"]: r for r in frame.to_dict("records")}


# --- near-duplicate pairs and groups -------------------------------------------------------------


def hash_matrix(phashes: list[str]) -> np.ndarray:
    """(n, crops) uint64 from the space-separated hex hashes."""
    values = [[int(h, 16) for h in p.split()] for p in phashes]
    return np.array(values, dtype=np.uint64).reshape(len(phashes), len(CROPS))


def near_pairs(hashes: np.ndarray, threshold: int = THRESHOLD) -> pd.DataFrame:
    """Pairs (i < j) where the whole content of one is within `threshold` bits of a crop of the
    other (whole with whole included), with the least distance and the crops it was found at
    (PAIR_COLUMNS). An exact multi-index search (`hamming.within`): 1,000,000 photos in 37-43 s
    on 2 cores (benchmarks/audit_bench.py); it used to compare every pair of crops.

    Only pairs that include a whole content are compared: a copy cropped to 90% matches the
    original's 90% crop with its whole, and the pairs of two crops would only give two different
    photos more chances to fall under the threshold."""
    n, k = hashes.shape
    if n < 2:
        return pd.DataFrame({c: np.empty(0, int) for c in PAIR_COLUMNS})
    q, flat, distance = hamming.within(
        hashes[:, 0], hashes.ravel(), threshold, threads=runtime.cores()
    )
    other, crop = flat // k, flat % k
    pairs = pd.DataFrame({"q": q, "other": other, "distance": distance.astype(int), "crop": crop})
    pairs = pairs[pairs.q != pairs.other]
    swap = pairs.q > pairs.other  # the whole of the larger index against a crop of the smaller one
    pairs = pd.DataFrame(
        {
            "i": np.where(swap, pairs.other, pairs.q),
            "j": np.where(swap, pairs.q, pairs.other),
            "distance": pairs.distance,
            "crop_i": np.where(swap, pairs.crop, 0),
            "crop_j": np.where(swap, 0, pairs.crop),
        }
    )
    pairs = pairs.sort_values(["i", "j", "distance", "crop_i", "crop_j"]).drop_duplicates(
        ["i", "j"]
    )
    return pairs.reset_index(drop=True)[PAIR_COLUMNS]


def aligned(job: tuple) -> list[np.ndarray]:
    """For (photo: file or bytes, box: "left top right bottom", shares): each centre crop of the
    content, ALIGNED_SIDE px square in RGB, as floats of mean 0 and std 1 (a brightness or contrast change does
    not move it)."""
    source, box, shares = job
    data = source if isinstance(source, bytes) else Path(source).read_bytes()
    image, (width, height) = _open(data, "RGB")
    box = _scaled(tuple(int(v) for v in box.split()), (image.width / width, image.height / height))
    out = []
    for share in shares:
        pixels = np.asarray(
            _crop(image, box, share).resize((ALIGNED_SIDE, ALIGNED_SIDE), Image.Resampling.BOX),
            dtype=np.float32,
        )
        out.append((pixels - pixels.mean()) / max(float(pixels.std()), 1.0))
    return out


def confirm(frame: pd.DataFrame, sources: list, pairs: pd.DataFrame) -> pd.DataFrame:
    """`pairs` with `similarity` and `confirmed` (similarity >= SIMILAR): the correlation of the two
    photos' matched crops, aligned and reduced to ALIGNED_SIDE px in colour (the pHash keeps only
    the signs of a grey image's low frequencies). Only the photos in `pairs` are read again."""
    needed: dict[int, set] = {}
    for row, crop in [*zip(pairs.i, pairs.crop_i), *zip(pairs.j, pairs.crop_j)]:
        needed.setdefault(int(row), set()).add(int(crop))
    rows = sorted(needed)
    jobs = [(sources[r], frame.box.iat[r], [CROPS[c] for c in sorted(needed[r])]) for r in rows]
    thumbs = {
        (r, c): t
        for r, ts in zip(rows, _pool_map(aligned, jobs, chunksize=4))
        for c, t in zip(sorted(needed[r]), ts)
    }
    similarity = np.array(
        [
            float((thumbs[int(p.i), int(p.crop_i)] * thumbs[int(p.j), int(p.crop_j)]).mean())
            for p in pairs.itertuples()
        ],
        dtype=float,
    )
    return pairs.assign(similarity=similarity, confirmed=similarity >= SIMILAR)


def hashable(frame: pd.DataFrame) -> np.ndarray:
    """Rows whose perceptual hash means something: readable, content large enough, not nearly uniform."""
    return ((frame.error == "") & (frame.phash != "") & (frame["std"] >= MIN_STD)).to_numpy()


def cliques(n: int, pairs: pd.DataFrame) -> np.ndarray:
    """A group number per item such that every two members of a group are a pair: near-duplicates
    of each other, not links of a chain (A~B and B~C with A far from C do not make one group).

    Greedy, per connected component (scipy's): the member with most pairs starts a group, its
    partners join closest first while they pair with every member so far; repeat with the rest.
    Hand-written because neither scipy nor networkx partitions a graph into cliques (networkx
    lists maximal cliques, which overlap), and components are small."""
    groups = np.arange(n)
    if len(pairs) == 0:
        return groups
    i, j = pairs.i.to_numpy(int), pairs.j.to_numpy(int)
    graph = coo_matrix((np.ones(len(pairs)), (i, j)), shape=(n, n))
    _, component = connected_components(graph, directed=False)
    distance = {}
    for a, b, d in zip(i, j, pairs.distance.to_numpy(int)):
        distance[a, b] = distance[b, a] = d
    partners: dict[int, list[int]] = {}
    for a, b in zip(i, j):
        partners.setdefault(a, []).append(b)
        partners.setdefault(b, []).append(a)
    for members in pd.Series(np.arange(n)).groupby(component).groups.values():
        if len(members) < 2:
            continue
        left = set(members)
        while left:
            seed = max(sorted(left), key=lambda a: sum(b in left for b in partners.get(a, [])))
            group = [seed]
            for b in sorted(
                (b for b in partners.get(seed, []) if b in left),
                key=lambda b: (distance[seed, b], b),
            ):
                if all((b, g) in distance for g in group):
                    group.append(b)
            groups[group] = seed
            left -= set(group)
    return groups


def linked(
    frame: pd.DataFrame, sources: list | None = None, threshold: int = THRESHOLD
) -> tuple[np.ndarray, pd.DataFrame]:
    """(group id per row, -1 for rows left out; the candidate pairs as row numbers of `frame`, with
    `similarity` and `confirmed`). Groups are cliques of confirmed pairs. `sources`: the photos
    (files or bytes) for the confirmation; `frame.path` by default.

    Byte-identical photos are one photo to the search and need no confirmation: each copy joins
    its first copy's group, paired with it alone (a site's thousand copies of a placeholder would
    otherwise be half a million pairs)."""
    usable = np.flatnonzero(hashable(frame))
    groups = np.full(len(frame), -1)
    first = (
        pd.Series(usable).groupby(frame.sha256.to_numpy()[usable]).transform("first").to_numpy(int)
    )
    unique = np.unique(first)
    pairs = near_pairs(hash_matrix(frame.phash.iloc[unique].tolist()), threshold)
    pairs = pairs.assign(i=unique[pairs.i.to_numpy(int)], j=unique[pairs.j.to_numpy(int)])
    pairs = confirm(frame, list(frame.path) if sources is None else sources, pairs)
    held = pairs[pairs.confirmed.to_numpy(bool)]
    groups[unique] = unique[
        cliques(
            len(unique),
            held.assign(i=np.searchsorted(unique, held.i), j=np.searchsorted(unique, held.j)),
        )
    ]
    groups[usable] = groups[first]
    copy = usable != first
    identical = pd.DataFrame(
        {
            "i": first[copy],
            "j": usable[copy],
            "distance": 0,
            "crop_i": 0,
            "crop_j": 0,
            "similarity": 1.0,
            "confirmed": True,
        }
    )
    pairs = pd.concat([identical, pairs], ignore_index=True) if len(identical) else pairs
    return groups, pairs.sort_values(["i", "j"]).reset_index(drop=True)


def link_owners(
    owners: list, photos: list, threshold: int = THRESHOLD, frame: pd.DataFrame | None = None
) -> dict:
    """{owner: group}: owners (houses, listings) that share a near-duplicate photo, transitively,
    get the same group; `photos[k]` (bytes or a file) belongs to `owners[k]`. Transitive on
    purpose: a split that keeps a chain's owners together cannot leak any pair of it. `frame`: the
    photos' fingerprints when they are known already (`fingerprints`' cached rows)."""
    frame = (
        pd.DataFrame(fingerprint_many(photos)) if frame is None else frame.reset_index(drop=True)
    )
    _, pairs = linked(frame, photos, threshold)
    pairs = pairs[pairs.confirmed.to_numpy(bool)]
    names = sorted(set(owners))
    index = {o: i for i, o in enumerate(names)}
    ends = ([index[owners[i]] for i in pairs.i], [index[owners[j]] for j in pairs.j])
    edges = coo_matrix((np.ones(len(pairs)), ends), shape=(len(names), len(names)))
    return dict(zip(names, connected_components(edges, directed=False)[1]))


# --- a task's findings ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Audit:
    """A task's photos (fingerprints with split and label), its findings, and the time it took."""

    photos: pd.DataFrame
    findings: pd.DataFrame
    pairs: (
        pd.DataFrame
    )  # every candidate pair the search found, with its similarity and whether it held
    seconds: float
    threshold: int

    def counts(self) -> dict:
        """The numbers a run records in metrics.json and a report shows."""
        f = self.findings
        leaks = f[f.finding == "leak"]
        leaked_valid = sum(s.split(";").count("valid") for s in leaks.splits)
        return {
            "photos": len(self.photos),
            "threshold": self.threshold,
            "leak_groups": len(leaks),
            "leaked_valid_photos": int(leaked_valid),
            "conflict_groups": int((f.finding == "conflict").sum()),
            "duplicate_groups": int((f.finding == "duplicate").sum()),
            "quality_findings": int((~f.finding.isin(["leak", "conflict", "duplicate"])).sum()),
            "candidate_pairs": len(self.pairs),
            "confirmed_pairs": int(self.pairs.confirmed.sum()),
            "padded_photos": int(padded(self.photos).sum()),
        }

    def pair_table(self) -> pd.DataFrame:
        """Every candidate pair as files: distance in bits, crops, similarity, confirmed (pairs.csv)."""
        rel, p = self.photos.rel.to_numpy(), self.pairs
        return pd.DataFrame(
            {
                "file_a": rel[p.i.to_numpy(int)],
                "file_b": rel[p.j.to_numpy(int)],
                "distance": p.distance,
                "crop_a": [CROPS[c] for c in p.crop_i],
                "crop_b": [CROPS[c] for c in p.crop_j],
                "similarity": p.similarity.round(4),
                "confirmed": p.confirmed,
            }
        )


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
    photos["rel"] = [
        Path(p).resolve().relative_to(task_dir.resolve()).as_posix() for p in photos.path
    ]
    photos["group"], pairs = linked(photos, threshold=threshold)
    findings = pd.concat(
        [_group_findings(photos, pairs[pairs.confirmed.to_numpy(bool)]), _quality_findings(photos)],
        ignore_index=True,
    )
    return Audit(photos, findings, pairs, time.perf_counter() - start, threshold)


def padded(photos: pd.DataFrame) -> pd.Series:
    """Photos with at least PADDED of their area in trimmed uniform borders."""
    sizes = content_sizes(photos)
    area = (photos.width * photos.height).clip(lower=1)
    return (photos.error == "") & (sizes.content_width * sizes.content_height < (1 - PADDED) * area)


def _group_findings(photos: pd.DataFrame, pairs: pd.DataFrame) -> pd.DataFrame:
    rows = []
    sizes = photos[photos.group >= 0].groupby("group").size()
    distance = {}
    for p in pairs.itertuples():
        g = photos.group.iat[p.i]
        if g == photos.group.iat[p.j]:  # pairs that would have chained two groups are not theirs
            distance[g] = max(distance.get(g, 0), int(p.distance))
    for number, g in enumerate(sorted(sizes[sizes > 1].index), 1):
        members = photos[photos.group == g].sort_values(["split", "rel"], ascending=[True, True])
        base = {
            "group": number,
            "n": len(members),
            "files": ";".join(members.rel),
            "splits": ";".join(members.split),
            "labels": ";".join(members.label),
            "identical": members.sha256.nunique() == 1,
            "distance": distance.get(g, 0),
        }
        if members.split.nunique() > 1:
            rows.append(
                {
                    **base,
                    "finding": "leak",
                    "detail": "copies in train and valid: validation accuracy is inflated",
                }
            )
        if members.label.nunique() > 1:
            rows.append(
                {
                    **base,
                    "finding": "conflict",
                    "detail": "the same photo under " + " and ".join(sorted(set(members.label))),
                }
            )
        if (members.groupby("split").size() > 1).any():
            rows.append(
                {
                    **base,
                    "finding": "duplicate",
                    "detail": "copies within one split overweight this photo",
                }
            )
    return pd.DataFrame(rows, columns=FINDING_COLUMNS)


def content_sizes(photos: pd.DataFrame) -> pd.DataFrame:
    """(content_width, content_height) per photo: its size inside any uniform border; 0 when unreadable."""
    box = photos.box.str.split(expand=True).reindex(columns=range(4)).fillna(0).astype(int)
    return pd.DataFrame(
        {"content_width": box[2] - box[0], "content_height": box[3] - box[1]}, index=photos.index
    )


def _quality_findings(photos: pd.DataFrame) -> pd.DataFrame:
    """Size and aspect of the whole file (a trimmed border may be a flat sky); levels of the content
    (white padding does not make a dark photo look bright)."""
    short = photos[["width", "height"]].min(axis=1)
    aspect = photos[["width", "height"]].max(axis=1) / short.clip(lower=1)
    ok = photos.error == ""
    checks = [
        ("unreadable", ~ok, lambda r: r.error),
        (
            "too_small",
            ok & (short < MIN_SIDE),
            lambda r: f"{r.width}x{r.height}: short side below {MIN_SIDE} px",
        ),
        (
            "uniform",
            ok & (photos["std"] < MIN_STD),
            lambda r: f"nearly uniform (grey-level std {r['std']:.1f})",
        ),
        (
            "dark",
            ok & (photos["mean"] < DARK),
            lambda r: f"very dark (mean grey level {r['mean']:.0f} of 255)",
        ),
        (
            "bright",
            ok & (photos["mean"] > BRIGHT),
            lambda r: f"blown out (mean grey level {r['mean']:.0f} of 255)",
        ),
        (
            "aspect",
            ok & (aspect > MAX_ASPECT),
            lambda r: f"{r.width}x{r.height}: aspect ratio above {MAX_ASPECT:g}",
        ),
    ]
    rows = []
    for name, mask, detail in checks:
        for _, r in photos[mask].iterrows():
            rows.append(
                {
                    "finding": name,
                    "group": "",
                    "n": 1,
                    "files": r.rel,
                    "splits": r.split,
                    "labels": r.label,
                    "identical": "",
                    "distance": "",
                    "detail": detail(r),
                }
            )
    return pd.DataFrame(rows, columns=FINDING_COLUMNS)


# --- what to do about them ------------------------------------------------------------------------

FLAG_ORDER = {"leak": 0, "conflict": 1, "duplicate": 2}


def top_groups(result: Audit, width: int, limit: int = 10) -> list[str]:
    """One line per near-duplicate group, at most `width` characters, leaks first, then conflicts:
    its flags, size and files; the first `limit`, then how many more there are."""
    groups = result.findings[result.findings.group != ""]
    if groups.empty:
        return []
    table = groups.groupby("group").agg(
        findings=("finding", "+".join), n=("n", "first"), files=("files", "first")
    )
    table["rank"] = [min(FLAG_ORDER[f] for f in found.split("+")) for found in table.findings]
    table = table.sort_values(["rank", "group"])
    lines = []
    for number, row in table.head(limit).iterrows():
        line = f"  #{number} {row.findings}: {row.n} photos: {row.files.replace(';', ', ')}"
        lines.append(line if len(line) <= width else line[: max(width - 3, 20)] + "...")
    if len(table) > limit:
        lines.append(
            f"  ... and {len(table) - limit} more groups (all in audit.html and audit.csv)"
        )
    return lines


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
        members = members.sort_values(
            ["split", "rel"]
        )  # "train" sorts before "valid": a training copy is kept
        for k, row in enumerate(members.itertuples()):
            if g in conflicted:
                action, why = "keep", "label conflict: choose the right label (relabel) or remove"
            elif k == 0:
                action, why = "keep", "the copy kept"
            else:
                action = "remove"
                why = (
                    "leak: a copy of a training photo"
                    if row.split != members.split.iat[0]
                    else "duplicate"
                )
            rows.append(
                {
                    "path": str((task_dir / row.rel).resolve()),
                    "action": action,
                    "new_label": "",
                    "reason": why,
                }
            )
    return pd.DataFrame(rows, columns=["path", "action", "new_label", "reason"])


def summary(result: Audit) -> str:
    """The printed summary: counts per finding."""
    c = result.counts()
    quality = result.findings[~result.findings.finding.isin(["leak", "conflict", "duplicate"])]
    kinds = ", ".join(f"{n} {k}" for k, n in quality.finding.value_counts().items()) or "none"
    padding = f"; uniform borders trimmed from {c['padded_photos']}" if c["padded_photos"] else ""
    return (
        f"{c['photos']} photos audited in {result.seconds:.1f}s{padding}; near-duplicate threshold "
        f"{c['threshold']} of 64 bits: {c['candidate_pairs']} pairs within it, {c['confirmed_pairs']} confirmed "
        f"(byte-identical, or by their pixels)\n  leak: {c['leak_groups']} groups with copies in train and valid "
        f"({c['leaked_valid_photos']} valid photos)\n  conflict: {c['conflict_groups']} photos under two labels\n"
        f"  duplicate: {c['duplicate_groups']} groups with copies within one split\n  quality: {kinds}"
    )


def warning_line(counts: dict) -> str:
    """One line for `run`/`compare` when the split leaks or labels conflict; '' when clean."""
    problems = []
    if counts["leak_groups"]:
        problems.append(
            f"{counts['leak_groups']} near-duplicate group(s) span train and valid "
            f"({counts['leaked_valid_photos']} valid photos): validation accuracy is inflated"
        )
    if counts["conflict_groups"]:
        problems.append(
            f"{counts['conflict_groups']} photo(s) under two labels: a contradiction to learn"
        )
    return f"warning: {'; '.join(problems)}; see: replicate audit TASK" if problems else ""


def check_threshold(threshold: int) -> None:
    if not 0 <= threshold <= 32:
        raise ReplicateError(
            f"--threshold {threshold}: give a number of differing bits from 0 to 32 (default {THRESHOLD})"
        )
