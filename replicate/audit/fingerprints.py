"""Each photo's fingerprint for the audit: what the near-duplicate search and the quality checks read.

    replicate audit rooms    # fingerprints cached in data/rooms/_audit/fingerprints.csv

Every photo gets a fingerprint: the SHA-256 of its bytes (exact copies) and perceptual hashes
(imagehash's pHash, 64 bits) of three centre crops, 100%, 90% and 80% of each side, of its
content: uniform borders (letterbox or pillarbox padding, white, black or any flat colour, and
flat frames) are trimmed first, so a padded copy hashes like its original and two padded photos
are not compared by their padding. Photos are decoded as training and serving decode them
(`photos.open_photo`). Uniform photos and those whose content is under 32 px are not `hashable`:
their hashes say nothing.

Fingerprints are cached per file (TASK/_audit/fingerprints.csv for the audit, the label session's
folder for a pool), keyed on path, size and mtime, so auditing again costs a second.
"""

from __future__ import annotations

import hashlib
import io
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import imagehash
import numpy as np
import pandas as pd
from PIL import ExifTags, Image

from .. import photos, runtime

# Centre crops of the content hashed per photo; pairs compare the first with each.
CROPS = (1.0, 0.9, 0.8)
# grey-level std (0-255) below which a photo is nearly uniform: its hash means nothing
MIN_STD = 6.0
# A border line (row or column) of padding: grey-level std at most FLAT_STD, its mean within FLAT_STEP
# of the outermost line's. Padding stays exactly flat through JPEG (a block of one colour keeps only
# its DC term) up to a few px from the content; a camera's grain, even on a white wall, is above
# 0.5, and at 1.0 or more a recompressed copy's smoothed edges were trimmed where the original's were not.
FLAT_STD, FLAT_STEP = 0.5, 2.0
EXTREME = 5  # grey levels from black or white: the usual padding
RINGING = 8  # px beside a border that JPEG's ringing may have left uneven (one 8 x 8 block)
MIN_CONTENT = 32  # px: content shorter than this is not hashed (pHash reduces to 32 x 32)
# Large JPEGs are decoded at a reduced scale, still 512 px or more (photos.open_photo).
DECODE_CROP = 256
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


def open_upright(data: bytes, mode: str) -> tuple[Image.Image, tuple[int, int]]:
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


def centre_crop(image: Image.Image, box: tuple[int, int, int, int], share: float) -> Image.Image:
    """The centre `share` of each side of `box` (in `image`'s pixels)."""
    left, top, right, bottom = box
    w, h = right - left, bottom - top
    cw, ch = max(1, round(w * share)), max(1, round(h * share))
    x, y = left + (w - cw) // 2, top + (h - ch) // 2
    return image.crop((x, y, x + cw, y + ch))


def scaled_box(box: tuple[int, ...], scale: tuple[float, float]) -> tuple[int, int, int, int]:
    """`box` (left, top, right, bottom) in an image `scale` = (x, y) times the size of its own."""
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
        gray, (width, height) = open_upright(data, "L")
    except Exception as e:  # PIL raises many types for files that are not images
        return {**result, **empty, "error": f"{type(e).__name__}: {e}".splitlines()[0]}
    box = content_box(np.asarray(gray, dtype=np.float32))
    full_box = scaled_box(box, (width / gray.width, height / gray.height))
    content = gray.crop(box)
    hashes = ""
    if min(full_box[2] - full_box[0], full_box[3] - full_box[1]) >= MIN_CONTENT:
        hashes = " ".join(str(imagehash.phash(centre_crop(gray, box, share))) for share in CROPS)
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


def pool_map(function, items: list, chunksize: int = 32) -> list:
    """`function` over `items`, in one process per core when there are many (PIL's decode holds the GIL)."""
    workers = min(len(items) // 64 + 1, runtime.cores())
    if workers <= 1:
        return [function(item) for item in items]
    with ProcessPoolExecutor(workers) as pool:
        return list(pool.map(function, items, chunksize=chunksize))


def fingerprint_many(sources: list) -> list[dict]:
    """`fingerprint` of each file or bytes, on all cores when there are many."""
    return pool_map(fingerprint, sources)


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
    # new files, or moved/removed ones to forget
    if cache is not None and (todo or len(cached) != len(frame)):
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


def hashable(frame: pd.DataFrame) -> np.ndarray:
    """Rows whose perceptual hash means something: readable, content large enough, not nearly uniform."""
    return ((frame.error == "") & (frame.phash != "") & (frame["std"] >= MIN_STD)).to_numpy()
