"""How `replicate audit` holds up: exact search at a listing site's scale, speed on real photos,
and precision and recall on the Houses photos as they come and letterboxed.

    .venv/bin/python benchmarks/audit_bench.py                 # about 5 minutes on 2 CPU cores
    .venv/bin/python benchmarks/audit_bench.py --search-only   # the index alone, up to 1,000,000
    .venv/bin/python benchmarks/audit_bench.py --faiss         # also faiss's IndexBinaryMultiHash

1. search: `duplicates.near_pairs` over n synthetic fingerprints (3 crop hashes each, uniform random
   bits) with 1,000 planted near-duplicates: a photo whose whole hash is another's whole or crop
   hash with 0-8 bits flipped. Every planted pair must be found.
2. real: the whole audit (fingerprints on all cores, search, confirmation, groups) of the Houses
   rooms photos, cold and with the fingerprint cache.
3. houses: the Houses rooms split by a plain shuffle of houses (no linking, as the study did) and
   the same task letterboxed in white to 416 x 416; every flagged pair of the letterboxed task is
   checked against the unpadded one. Recall: copies of 300 photos (JPEG quality 50, halved,
   central 90%, PNG, letterboxed white, pillarboxed black) found with their originals.

Rows are appended to benchmarks/results.csv (bench=audit_search, audit_real, audit_houses); the
flagged pairs are written to benchmarks/audit_pairs.csv.
"""

from __future__ import annotations

import argparse
import datetime
import io
import platform
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import results  # noqa: E402  (benchmarks/results.py, beside this script)
from conftest import HOUSES_ZIP  # noqa: E402

from replicate import runtime  # noqa: E402
from replicate.audit import checks, duplicates, fingerprints
from replicate.training import dataloaders

PAIRS = Path(__file__).with_name("audit_pairs.csv")


def stamp(row: dict) -> dict:
    return {
        **row,
        "impl": "replicate",
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": platform.node(),
        "processor": platform.processor(),
        "device": f"cpu ({runtime.cores()} cores)",
    }


# --- 1. the index at scale ------------------------------------------------------------------------


def synthetic(n: int, planted: int, seed: int = 0) -> tuple[np.ndarray, set]:
    """(n, 3) random fingerprints whose last `planted` rows are near-duplicates of earlier rows."""
    rng = np.random.default_rng(seed)
    hashes = rng.integers(0, 2**64 - 1, size=(n, 3), dtype=np.uint64, endpoint=True)
    pairs = set()
    sources = rng.choice(n - planted, planted, replace=False)
    for k, a in enumerate(sources):
        b = n - planted + k
        bits = rng.choice(64, int(rng.integers(0, checks.THRESHOLD + 1)), replace=False)
        flip = np.uint64(sum(1 << int(x) for x in bits))
        if (
            rng.random() < 0.5
        ):  # b is a copy of a, maybe cropped: b's whole matches one of a's crops
            hashes[b, 0] = hashes[a, int(rng.integers(0, 3))] ^ flip
        else:  # a is the cropped copy: a's whole matches one of b's crops
            hashes[a, 0] = hashes[b, int(rng.integers(0, 3))] ^ flip
        pairs.add((int(min(a, b)), int(max(a, b))))
    return hashes, pairs


def search(sizes: list[int], with_faiss: bool) -> list[dict]:
    rows = []
    for n in sizes:
        hashes, planted = synthetic(n, 1000)
        start = time.perf_counter()
        pairs = duplicates.near_pairs(hashes, checks.THRESHOLD)
        seconds = time.perf_counter() - start
        found = set(zip(pairs.i.tolist(), pairs.j.tolist()))
        print(
            f"search {n:>9,} photos: {seconds:6.1f} s, {len(pairs)} pairs, planted found "
            f"{len(planted & found)}/{len(planted)}"
        )
        rows.append(
            stamp(
                {
                    "bench": "audit_search",
                    "photos": n,
                    "engine": "hamming-mih",
                    "seconds": round(seconds, 2),
                    "pairs": len(pairs),
                    "planted": len(planted),
                    "planted_found": len(planted & found),
                }
            )
        )
        if with_faiss and n <= 300_000:
            rows.append(faiss_search(hashes, planted))
    return rows


def faiss_search(hashes: np.ndarray, planted: set) -> dict:
    """The same search with faiss's IndexBinaryMultiHash (3 chunks of 21 bits, 2 flips: exact for 8 bits)."""
    import faiss

    n = len(hashes)
    codes = np.zeros(
        (hashes.size, 16), np.uint8
    )  # 128-bit codes: faiss reads 8 bytes past each chunk
    codes[:, :8] = hashes.reshape(-1).view(np.uint8).reshape(-1, 8)
    start = time.perf_counter()
    index = faiss.IndexBinaryMultiHash(128, 3, 21)
    index.nflip = 2
    index.add(codes)
    lims, _, found_ids = index.range_search(codes[::3], checks.THRESHOLD + 1)  # radius is exclusive
    seconds = time.perf_counter() - start
    q = np.repeat(np.arange(n), np.diff(lims).astype(np.int64))
    other = found_ids // 3
    found = {(int(min(a, b)), int(max(a, b))) for a, b in zip(q, other) if a != b}
    print(
        f"faiss  {n:>9,} photos: {seconds:6.1f} s, planted found {len(planted & found)}/{len(planted)}"
    )
    return stamp(
        {
            "bench": "audit_search",
            "photos": n,
            "engine": "faiss-multihash",
            "seconds": round(seconds, 2),
            "planted": len(planted),
            "planted_found": len(planted & found),
        }
    )


# --- 2. real photos -----------------------------------------------------------------------------


def plain_split(root: Path, seed: int = 42) -> Path:
    """data/rooms from the Houses zip, houses shuffled into an 80/20 split without linking the
    listings that share photos (what a plain split does; `replicate data houses` links them)."""
    photos = dataloaders._houses_photos(HOUSES_ZIP)
    houses = sorted({h for h, _ in photos})
    valid = dataloaders.split_houses(houses, 0.2, seed)
    task = root / "rooms"
    for (house, room), blob in photos.items():
        if room in dataloaders.ROOMS:
            path = task / ("valid" if house in valid else "train") / room / f"{house}_{room}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(blob)
    return task


def boxed(blob: bytes, canvas: tuple[int, int], colour: str) -> bytes:
    image = Image.open(io.BytesIO(blob)).convert("RGB")
    image.thumbnail(canvas)
    out = Image.new("RGB", canvas, colour)
    out.paste(image, ((canvas[0] - image.width) // 2, (canvas[1] - image.height) // 2))
    return encoded(out, "JPEG", quality=90)


def encoded(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def letterboxed(task: Path, out: Path) -> Path:
    for f in sorted(task.rglob("*.jpg")):
        target = out / f.relative_to(task)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(boxed(f.read_bytes(), (416, 416), "white"))
    return out


def audited(task: Path) -> tuple[checks.Audit, float]:
    files = dataloaders.scan_task(task).files
    start = time.perf_counter()
    return checks.audit_task(task, files), time.perf_counter() - start


def real(root: Path) -> list[dict]:
    task = plain_split(root / "real")
    shutil.rmtree(task / "_audit", ignore_errors=True)
    cold, cold_s = audited(task)
    _, warm_s = audited(task)
    n = len(cold.photos)
    print(
        f"audit {n} Houses photos: {cold_s:.1f} s cold ({n / cold_s:.0f} photos/s), {warm_s:.1f} s cached"
    )
    return [
        stamp(
            {
                "bench": "audit_real",
                "photos": n,
                "engine": "cold",
                "seconds": round(cold_s, 2),
                "photos_per_s": round(n / cold_s, 1),
            }
        ),
        stamp(
            {
                "bench": "audit_real",
                "photos": n,
                "engine": "cached",
                "seconds": round(warm_s, 2),
                "photos_per_s": round(n / warm_s, 1),
            }
        ),
    ]


def flagged(result: checks.Audit) -> pd.DataFrame:
    table = result.pair_table()
    return table.assign(
        a=[Path(f).name for f in table.file_a], b=[Path(f).name for f in table.file_b]
    )


def houses(root: Path) -> list[dict]:
    task = plain_split(root / "plain")
    plain, _ = audited(task)
    boxed_result, _ = audited(letterboxed(task, root / "boxed" / "rooms"))
    rows = []
    truth = flagged(plain)
    truth_held = {frozenset(p) for p in zip(truth.a[truth.confirmed], truth.b[truth.confirmed])}
    pairs = []
    for name, result in (("houses", plain), ("houses letterboxed", boxed_result)):
        table = flagged(result)
        held = table[table.confirmed]
        wrong = [p for p in zip(held.a, held.b) if frozenset(p) not in truth_held]
        c = result.counts()
        print(
            f"{name}: {c['candidate_pairs']} candidate pairs, {c['confirmed_pairs']} confirmed "
            f"({len(wrong)} not pairs of the unpadded photos); {c['leak_groups']} leaks, "
            f"{c['conflict_groups']} conflicts, {c['duplicate_groups']} duplicate groups"
        )
        pairs.append(table.assign(task=name))
        rows.append(
            stamp(
                {
                    "bench": "audit_houses",
                    "photos": c["photos"],
                    "engine": name,
                    "pairs": c["confirmed_pairs"],
                    "candidates": c["candidate_pairs"],
                    "not_real": len(wrong),
                    "leaks": c["leak_groups"],
                    "conflicts": c["conflict_groups"],
                }
            )
        )
    pd.concat(pairs).drop(columns=["a", "b"]).to_csv(PAIRS, index=False)
    rows.append(copies_found(task))
    return rows


def copies_found(task: Path, n: int = 300) -> dict:
    """Recall: made-up copies of `n` photos, each audited beside the photos: found with its original?"""
    files = sorted(task.rglob("*.jpg"))
    random.Random(0).shuffle(files)
    originals = [f.read_bytes() for f in files[:n]]
    kinds = {
        "q50": lambda im: encoded(im, "JPEG", quality=50),
        "half": lambda im: encoded(im.resize((im.width // 2, im.height // 2)), "JPEG", quality=90),
        "crop90": lambda im: encoded(
            im.crop(
                (
                    im.width // 20,
                    im.height // 20,
                    im.width - im.width // 20,
                    im.height - im.height // 20,
                )
            ),
            "JPEG",
            quality=90,
        ),
        "png": lambda im: encoded(im, "PNG"),
        "letterbox": lambda im: boxed(encoded(im, "PNG"), (416, 416), "white"),
        "pillarbox": lambda im: boxed(encoded(im, "PNG"), (640, im.height), "black"),
    }
    photos, origin, kind = list(originals), list(range(n)), ["original"] * n
    for name, make in kinds.items():
        for k, blob in enumerate(originals):
            photos.append(make(Image.open(io.BytesIO(blob)).convert("RGB")))
            origin.append(k)
            kind.append(name)
    frame = pd.DataFrame(fingerprints.fingerprint_many(photos))
    _, pairs = duplicates.linked(frame, checks.THRESHOLD, photos)
    held = pairs[pairs.confirmed]
    found = {(int(a), int(b)) for a, b in zip(held.i, held.j)}
    per_kind = {}
    for name in kinds:
        members = [m for m in range(len(photos)) if kind[m] == name]
        per_kind[name] = sum((origin[m], m) in found for m in members) / len(members)
    wrong = sum(origin[a] != origin[b] for a, b in found)
    print(
        "copies found with their original: "
        + ", ".join(f"{k} {v:.1%}" for k, v in per_kind.items())
        + f"; {wrong} pairs between different originals (the Houses' own duplicates)"
    )
    return stamp(
        {
            "bench": "audit_houses",
            "photos": len(photos),
            "engine": "made-up copies",
            **{f"recall_{k}": round(v, 4) for k, v in per_kind.items()},
        }
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--search-only", action="store_true")
    parser.add_argument(
        "--faiss",
        action="store_true",
        help="also time faiss's IndexBinaryMultiHash (pip install faiss-cpu)",
    )
    parser.add_argument("--sizes", default="10000,100000,300000,1000000")
    args = parser.parse_args()
    rows = search([int(s) for s in args.sizes.split(",")], args.faiss)
    if not args.search_only and HOUSES_ZIP.is_file():
        with tempfile.TemporaryDirectory() as tmp:
            rows += real(Path(tmp)) + houses(Path(tmp))
    results.append(rows)


if __name__ == "__main__":
    main()
