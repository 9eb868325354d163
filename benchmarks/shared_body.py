"""Every attribute in one pass: 1, 3 and 6 attributes on one lite0 body, the body shared against the
models run one by one, in one run.

    .venv/bin/python benchmarks/shared_body.py     # needs data/rooms (replicate data houses)

It trains six runs of tf_efficientnet_lite0 (its pip-installed ImageNet weights), frozen with the
body in eval mode (--freeze-bn, --cache-features 1), on a small copy of the Houses `rooms` task
(30 train and 10 valid photos per class; seeds 42-47: six heads on one body, as six attributes
would be), then tags the 321 `rooms` validation photos the way `replicate predict` does (decoding
on all cores, batches of 64, process start-up and model loading excluded): with the body shared
(onnx_engine.sharing) and with every model run whole. Rows go to benchmarks/results.csv
(bench=shared_body).
"""

from __future__ import annotations

import datetime
import platform
import shutil
import tempfile
import time
from pathlib import Path

import results  # benchmarks/results.py, beside this script

from replicate import onnx_engine, train
from replicate.config import RunConfig

LITE = "tf_efficientnet_lite0"
ROOMS = Path("data/rooms")


def small_task(out: Path, train_n: int = 30, valid_n: int = 10) -> Path:
    """A copy of data/rooms with the first `train_n` / `valid_n` photos of each class."""
    for split, n in (("train", train_n), ("valid", valid_n)):
        for folder in sorted((ROOMS / split).iterdir()):
            (out / split / folder.name).mkdir(parents=True, exist_ok=True)
            for photo in sorted(folder.glob("*.jpg"))[:n]:
                shutil.copy(photo, out / split / folder.name / photo.name)
    return out


def tag_seconds(models: list, files: list[Path], shared: bool) -> float:
    """Seconds to tag `files` with `models`, the body shared or every model run whole."""
    if not shared:
        for m in models:
            m.head = None  # no head alone: the model runs whole, as before bodies were shared
    start = time.perf_counter()
    onnx_engine.tag_onnx(models, files, bs=64, progress=False)
    return time.perf_counter() - start


def main() -> None:
    if not ROOMS.is_dir():
        raise SystemExit("needs data/rooms: run `replicate data houses` first")
    work = Path(tempfile.mkdtemp(prefix="shared-body-"))
    small_task(work / "data" / "rooms")
    runs = []
    for seed in range(42, 48):
        cfg = RunConfig("rooms", LITE, epochs=5, seed=seed, cache_features=1, freeze_bn=True,
                        workers=0, audit=False, data_dir=work / "data", exports_dir=work / "exports")  # fmt: skip
        runs.append(train.run(cfg, log=lambda *a, **k: None))
    files = sorted((ROOMS / "valid").rglob("*.jpg"))
    onnx_engine.tag_onnx([onnx_engine.load_onnx(runs[0])], files[:64], progress=False)  # warm-up
    rows, base = [], None
    for n in (1, 3, 6):
        for shared in (True, False):
            if n == 1 and not shared:
                continue  # one model: nothing to share
            models = [onnx_engine.load_onnx(d, name=f"a{i}") for i, d in enumerate(runs[:n])]
            seconds = tag_seconds(models, files, shared)
            base = base or seconds
            rows.append({
                "bench": "shared_body", "date": datetime.datetime.now().isoformat(timespec="seconds"),
                "machine": platform.node(), "processor": platform.machine(), "arch": LITE,
                "engine": "onnx-fp32", "attributes": n, "body": "shared" if shared else "one by one",
                "photos": len(files), "seconds": round(seconds, 2),
                "photos_per_s": round(len(files) / seconds, 1), "time_vs_one": round(seconds / base, 2),
            })  # fmt: skip
            print(rows[-1])
    print(f"written: {results.append(rows)}")
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
