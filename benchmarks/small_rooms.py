"""A downsized copy of the Houses `rooms` task that fits in a device call's 64 MiB working tree.

    python benchmarks/small_rooms.py                    # -> .gpu/data/rooms (about 20 MB)
    python benchmarks/small_rooms.py --houses 20        # a tiny copy for the CPU dry run

The 61 MB zip in ../shared does not travel to the GPU machine. This imports the zip the way
`replicate data houses` does (the same house split, linked listings kept together) into a
temporary folder, then re-encodes every photo with its long side at `--side` px (JPEG quality
90) into `--out`, which .gitignore keeps out of git and `benchmarks/gpu.sh`'s call carries.
"""

from __future__ import annotations

import argparse
import io
import shutil
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from replicate import folders
from replicate.data import sources

HOUSES_ZIP = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "houses-dataset-400.zip"


def shrink(src: Path, dst: Path, side: int) -> None:
    with Image.open(src) as im:
        im = im.convert("RGB")
        im.thumbnail((side, side), Image.Resampling.LANCZOS)
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=90)
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_bytes(buf.getvalue())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", type=Path, default=HOUSES_ZIP, help="the Houses zip")
    parser.add_argument(
        "--out", type=Path, default=Path(".gpu/data"), help="data folder to write rooms/ into"
    )
    parser.add_argument(
        "--side", type=int, default=256, help="long side of the re-encoded photos, px"
    )
    parser.add_argument(
        "--houses", type=int, default=0, help="keep only this many houses per split share (0: all)"
    )
    args = parser.parse_args()
    start = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        rooms = sources.import_houses(str(args.source), Path(tmp))["rooms"]
        photos = sorted(rooms.rglob("*.jpg"))
        if args.houses:
            houses = sorted({int(p.name.split("_")[0]) for p in photos})
            valid = {int(p.name.split("_")[0]) for p in photos if p.parts[-3] == "valid"}
            n_valid = max(1, round(args.houses * len(valid) / len(houses)))
            keep = set(sorted(valid)[:n_valid]) | set(
                sorted(set(houses) - valid)[: args.houses - n_valid]
            )
            photos = [p for p in photos if int(p.name.split("_")[0]) in keep]
        target = args.out / "rooms"
        if target.exists():
            shutil.rmtree(target)
        for p in photos:
            shrink(p, target / p.relative_to(rooms), args.side)
    size = sum(p.stat().st_size for p in target.rglob("*.jpg"))
    print(
        f"{target}: {len(photos)} photos, {size / 1e6:.1f} MB, long side {args.side} px, {time.time() - start:.0f}s"
    )
    print(folders.image_counts(target).to_string())


if __name__ == "__main__":
    main()
