"""What draft mode buys: photos/s decoding + validation crop, in full vs at reduced scale.

    .venv/bin/python benchmarks/decode_bench.py     # about a minute on 2 CPU cores

`photos.open_photo` decodes a JPEG at a reduced scale (libjpeg draft mode, still at least 2x the
crop) when its short side is at least 4x the model's crop: training (data.open_image), validation
and `predict` all do, so they see the same pixels. This measures the decision's benefit on one
core, per photo size and model input size: Houses originals (400 x 266) and synthetic listing-size
JPEGs (2000 x 1500, 4000 x 3000). Rows are appended to benchmarks/results.csv (bench=decode).
"""

from __future__ import annotations

import datetime
import platform
import sys
import tempfile
import time
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import results  # noqa: E402  (benchmarks/results.py, beside this script)
from conftest import HOUSES_ZIP, synthetic_photo  # noqa: E402  (the tests' photo-like images)

from replicate import photos  # noqa: E402


def rate(files: list[Path], size: int, largest: int | None, seconds: float = 3.0) -> float:
    """Photos per second through open_photo + valid_crop, repeated for about `seconds`."""
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for f in files:
            photos.valid_crop(photos.open_photo(f, largest), size, 1.0, "bilinear")
        done += len(files)
    return done / (time.perf_counter() - start)


def main() -> None:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        sets = {}
        if HOUSES_ZIP.is_file():
            with zipfile.ZipFile(HOUSES_ZIP) as zf:
                names = [n for n in zf.namelist() if n.endswith(".jpg")][:20]
                for n in names:
                    (Path(tmp) / Path(n).name).write_bytes(zf.read(n))
            sets["400x266"] = [Path(tmp) / Path(n).name for n in names]
        for w, h in ((2000, 1500), (4000, 3000)):
            sets[f"{w}x{h}"] = []
            for seed in range(4):
                path = Path(tmp) / f"{w}x{h}-{seed}.jpg"
                synthetic_photo(seed, (w, h)).save(path, quality=90)
                sets[f"{w}x{h}"].append(path)
        for name, files in sets.items():
            for size in (64, 224):
                full, draft = (
                    rate(files, size, None),
                    rate(files, size, photos.largest_crop(size, 1.0)),
                )
                rows.append(
                    {
                        "bench": "decode",
                        "impl": "replicate",
                        "photos": name,
                        "size": size,
                        "engine": "pil-draft",
                        "photos_per_s": round(draft, 1),
                        "full_decode_photos_per_s": round(full, 1),
                        "speedup_vs_full_decode": round(draft / full, 2),
                        "date": datetime.datetime.now().isoformat(timespec="seconds"),
                        "machine": platform.node(),
                        "processor": platform.processor(),
                    }
                )
                print(
                    f"{name:>9} at {size:3d} px: full {full:7.1f}/s, draft rule {draft:7.1f}/s ({draft / full:.2f}x)"
                )
    results.append(rows)


if __name__ == "__main__":
    main()
