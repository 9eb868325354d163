"""`replicate index` here and on Ray (one node) beside `predict`, an incremental call with 1% new
photos, and the listing table from 1,000,000 rows; in one run.

    .venv/bin/python benchmarks/index_bench.py    # after `make demo` and the README's bundle runs

The photos: the 2,140 Houses photos (data/kitchen/{train,valid}) linked 3 times into one folder
under different names: 6,420 photos. The
models: the demo's three lite0 runs (rooms, exterior, kitchen) that share one body, so each photo
is one body pass. Each job runs as a user runs it, a fresh `replicate` process, twice in turns
(predict, index here, index on Ray, again), and the faster of the two counts. Ray: a local
cluster of this machine's CPUs started by this script, joined with --ray ADDRESS; its fixed
start-up (joining, starting the actor) is measured on 32 photos and stated.

Incremental: the full call here, a call with nothing new (the fixed start-up: the process, the
models, the scan, reading and compacting the index), then a call with 1% new photos.

The listing table: an index of 1,000,000 synthetic rows (200,000 listings of 5 photos, three
models, a search filter) in parts of 10,000, read and grouped as `replicate index` does it.

Rows go to benchmarks/results.csv (bench=index).
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import results  # benchmarks/results.py, beside this script

from replicate.index import build, store

RUNS = [Path(f"exports/{t}/tf_efficientnet_lite0-frozen-cached3-freezebn") for t in ("rooms", "exterior", "kitchen")]  # fmt: skip
HOUSES = [Path("data/kitchen/train"), Path("data/kitchen/valid")]
PATTERN = r"^(\d+)_"
COPIES = 3


def replicate(*args: str) -> tuple[float, str]:
    """(wall seconds, output) of a fresh `replicate` process."""
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "replicate", *args], capture_output=True, text=True
    )
    if done.returncode:
        sys.exit(f"replicate {' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return time.perf_counter() - start, done.stdout + done.stderr


def link_photos(folder: Path, copies: int = COPIES, extra: int = 0) -> int:
    """The Houses photos linked into `folder` `copies` times under different names (a job long
    enough that Ray's start-up is a small part of it), and `extra` more links under new names:
    new photos to the index; returns how many."""
    folder.mkdir(parents=True, exist_ok=True)
    files = sorted(f for d in HOUSES for f in d.rglob("*.jpg"))
    for k in range(copies):
        for f in files:
            link = folder / (f.name if k == 0 else f"copy{k}-{f.name}")
            if not link.exists():
                link.symlink_to(f.resolve())
    for i, f in enumerate(files[:extra]):
        (folder / f"new{i:04d}-{f.name}").symlink_to(f.resolve())
    return len(files) * copies + extra


def predict_rate(folder: Path, out: Path) -> dict:
    wall, text = replicate("predict", *map(str, RUNS), str(folder), "--out", str(out / "tags.csv"))
    n, rate = re.search(r"(\d+) images, .*\(([\d.]+) images/s\)", text).groups()
    return {
        "engine": "predict",
        "photos": int(n),
        "photos_per_s": float(rate),
        "wall_seconds": wall,
    }


def index_rate(folder: Path, out: Path, *more: str) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    wall, _ = replicate("index", *map(str, RUNS), str(folder), "--out", str(out), *more)
    s = store.read_manifest(out)
    return {
        "engine": "index --ray" if more else "index",
        "photos": s["tagged"],
        "photos_per_s": s["photos_per_second"],
        "tag_seconds": s["tag_seconds"],
        "wall_seconds": wall,
    }


def synthetic_index(folder: Path, rows: int = 1_000_000, per_part: int = 10_000) -> dict:
    """An index of `rows` made-up rows with three models' columns and one search filter; returns
    the filter, as `filters.of_models` gives it."""
    rng = np.random.default_rng(0)
    classes = {"rooms": ["bathroom", "bedroom", "kitchen"], "exterior": ["frontal", "indoor"], "kitchen": ["no", "yes"]}  # fmt: skip
    with store.IndexFolder(folder) as idx:
        idx.begin()
        for start in range(0, rows, per_part):
            n = min(per_part, rows - start)
            ids = np.arange(start, start + n)
            part = {"path": [f"/photos/{i // 5}_{i % 5}.jpg" for i in ids], "size": 100_000,
                    "mtime_ns": 0, "sha256": "0" * 64, "error": ""}  # fmt: skip
            for name, cs in classes.items():
                p = rng.dirichlet(np.ones(len(cs)), n).astype(np.float32)
                part[f"{name}_predicted"] = np.array(cs, dtype=object)[p.argmax(1)]
                part.update({f"{name}_p_{c}": p[:, k] for k, c in enumerate(cs)})
            part["kitchen_has_kitchen"] = part["kitchen_p_yes"] >= 0.24
            idx.commit(pd.DataFrame(part))
    found = {"column": "has_kitchen", "positive": "yes", "threshold": 0.24, "target_precision": 0.95,
             "precision": 0.955, "recall": 0.991, "run_dir": None, "recorded": None}  # fmt: skip
    return {"kitchen": found}


def listing_table(folder: Path, found: dict) -> dict:
    start = time.perf_counter()
    table = store.rows(folder)
    read = time.perf_counter() - start
    with store.IndexFolder(folder) as idx:
        listings, _ = build.write_listings(idx, table, found, PATTERN)
    total = time.perf_counter() - start
    return {"engine": "listings", "photos": len(table), "listings": len(listings),
            "read_seconds": read, "seconds": total}  # fmt: skip


def main() -> None:
    import ray

    missing = [str(r) for r in RUNS if not (r / "model.onnx").is_file()]
    if missing:
        sys.exit(f"no model in {', '.join(missing)}: run the README's bundle demo first")
    work = Path(tempfile.mkdtemp(prefix="index-bench-"))
    photos = work / "photos"
    n = link_photos(photos)
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    address = ray.get_runtime_context().gcs_address
    rows, stamp = [], datetime.datetime.now().isoformat(timespec="seconds")
    try:
        small = work / "small"
        small.mkdir()
        for f in sorted(photos.iterdir())[:32]:
            (small / f.name).symlink_to(f.resolve())
        startup = index_rate(small, work / "ray-small", "--ray", address)
        turns = []
        for _ in range(2):
            turns += [predict_rate(photos, work), index_rate(photos, work / "here"),
                      index_rate(photos, work / "ray", "--ray", address)]  # fmt: skip
        best = pd.DataFrame(turns).sort_values("photos_per_s").groupby("engine").last()
        base = best.loc["predict", "photos_per_s"]
        ray_fixed = startup["tag_seconds"]
        for engine, row in best.iterrows():
            extra = {}
            if engine == "index --ray":  # the rate after the fixed start-up, measured on 32 photos
                extra = {"ray_startup_s": ray_fixed,
                         "after_startup_photos_per_s": (row.photos - 32) / (row.tag_seconds - ray_fixed)}  # fmt: skip
            rows.append({"engine": engine, **row.to_dict(), "of_predict": row.photos_per_s / base, **extra})  # fmt: skip
        # incremental: the full call here, nothing new, then 1% new photos
        here = work / "incremental"
        full = index_rate(photos, here)
        unchanged_wall, _ = replicate("index", *map(str, RUNS), str(photos), "--out", str(here))
        new = round(n * 0.01)
        link_photos(photos, extra=new)
        inc_wall, _ = replicate("index", *map(str, RUNS), str(photos), "--out", str(here))
        assert store.read_manifest(here)["tagged"] == new
        rows.append({"engine": "index incremental", "photos": new, "wall_seconds": inc_wall,
                     "full_wall_seconds": full["wall_seconds"], "fixed_startup_s": unchanged_wall,
                     "of_full": inc_wall / full["wall_seconds"],
                     "over_startup_of_full": (inc_wall - unchanged_wall) / full["wall_seconds"]})  # fmt: skip
        synthetic = work / "million"
        found = synthetic_index(synthetic)
        rows.append(listing_table(synthetic, found))
    finally:
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)
    for r in rows:
        r.update(bench="index", date=stamp, machine="vm", processor=platform.machine(),
                 run=",".join(str(p) for p in RUNS), engine=r["engine"])  # fmt: skip
    print(json.dumps(rows, indent=1, default=float))
    print(f"rows appended to {results.append(rows)}")


if __name__ == "__main__":
    main()
