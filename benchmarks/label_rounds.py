"""`replicate label` end to end, as a user runs it, with the photos' true labels as the labeller:
the rare-attribute case of benchmarks/label_sim.py through the real command, its page's batch and
`--apply`, in separate processes, timed per round.

    .venv/bin/python benchmarks/label_rounds.py          # needs data/rooms (replicate data houses)

The pool: the Houses rooms photos (train and valid, hard links in a temporary folder) with
kitchens thinned to 5% (a seeded draw); the task "is it a kitchen?" (yes/no, batches of 20).
Each round's `round-N.csv` is answered from the file names and applied, until 30 kitchens are
labelled. The features are computed once and carried to the next seed's pool (same paths).
A row is appended to benchmarks/results.csv (bench=label_rounds: rare_labels_median and _max,
`seconds` the median round with --apply, `wall_seconds` the first round, features included).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import results  # benchmarks/results.py, beside this script

from replicate import runtime
from replicate.folders import image_files

ROOT = Path(__file__).resolve().parents[1]
REPLICATE = str(Path(sys.executable).with_name("replicate"))


def label(work: Path, *args: str) -> float:
    """Seconds one `replicate label kitchen ...` took (it must succeed)."""
    start = time.perf_counter()
    subprocess.run(
        [
            REPLICATE,
            "label",
            "kitchen",
            *args,
            "--data-dir",
            str(work / "data"),
            "--exports-dir",
            str(work / "exports"),
        ],
        check=True,
        capture_output=True,
        cwd=work,
    )
    return time.perf_counter() - start


def one_seed(rooms: Path, work: Path, seed: int, want: int, features: Path | None) -> dict:
    photos = image_files(rooms)
    kitchens = [p for p in photos if p.parent.name == "kitchen"]
    others = [p for p in photos if p.parent.name != "kitchen"]
    rng = np.random.default_rng(seed)
    keep = rng.choice(len(kitchens), size=round(len(others) * 5 / 95), replace=False)
    pool = work / "pool"
    shutil.rmtree(work, ignore_errors=True)
    pool.mkdir(parents=True)
    for p in others + [kitchens[k] for k in keep]:
        os.link(p, pool / p.name)
    out = work / "exports" / "kitchen" / "label"
    if features is not None and features.is_file():  # the pool's paths repeat across seeds
        out.mkdir(parents=True)
        shutil.copy2(features, out / "features.npz")
    seconds = [label(work, "--pool", str(pool))]
    spent = found = 0
    while found < want:
        number = len(seconds)
        batch = pd.read_csv(out / f"round-{number}.csv", keep_default_na=False)
        truth = np.where(batch.path.str.contains("_kitchen"), "yes", "no")
        guessed = int((batch.guess == truth).sum())
        decisions = work / f"decisions-{number}.csv"
        pd.DataFrame({"path": batch.path, "action": "label", "new_label": truth}).to_csv(
            decisions, index=False
        )
        seconds.append(label(work, "--apply", str(decisions)))
        spent, found = spent + len(batch), found + int((truth == "yes").sum())
        print(
            f"seed {seed} round {number}: {(truth == 'yes').sum()} kitchens of {len(batch)}, "
            f"guesses right {guessed}, {seconds[-1]:.1f} s",
            flush=True,
        )
    if features is not None:
        shutil.copy2(out / "features.npz", features)
    return {
        "pool": len(others) + len(keep),
        "labels": spent,
        "rounds": len(seconds) - 1,
        "first_round_s": round(seconds[0], 1),
        "round_s": round(float(np.median(seconds[1:])), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rooms", type=Path, default=ROOT / "data" / "rooms")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--want", type=int, default=30)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        features = Path(tmp) / "features.npz"
        rows = [
            {"seed": s, **one_seed(args.rooms, Path(tmp) / "work", s, args.want, features)}
            for s in range(args.seeds)
        ]
    table = pd.DataFrame(rows)
    print(table.to_string(index=False))
    results.append(
        [
            {
                "bench": "label_rounds",
                "engine": "replicate label",
                "photos": int(table["pool"].iloc[0]),
                "seeds": args.seeds,
                "rare_labels_median": float(table.labels.median()),
                "rare_labels_max": int(table.labels.max()),
                "seconds": float(table.round_s.median()),
                "wall_seconds": float(table.first_round_s.median()),
                "date": datetime.datetime.now().isoformat(timespec="seconds"),
                "machine": platform.node(),
                "device": f"cpu ({runtime.cores()} cores)",
            }
        ]
    )


if __name__ == "__main__":
    main()
