"""Every attribute in one pass: 1, 3 and 6 attributes on one lite0 body, the body shared against the
models run one by one, in fp32 and int8, in one run.

    .venv/bin/python benchmarks/shared_body.py     # needs data/rooms (replicate data houses)

It trains six runs of tf_efficientnet_lite0 (its pip-installed ImageNet weights), frozen with the
body in eval mode (--freeze-bn, --cache-features 1), on a small copy of the Houses `rooms` task
(30 train and 10 valid photos per class; seeds 42-47: six heads on one body, as six attributes
would be), then tags the 321 `rooms` validation photos the way `replicate predict` does (decoding
on all cores, batches of 64, process start-up and model loading excluded):

- fp32: the runs named together (`predict` runs the body once: engine.onnx_models.sharing), their
  `replicate bundle` (one file, the body once), and every model run whole, one by one;
- int8: the bundle's bundle.int8.onnx (the body quantized once), and each run's model.int8.onnx
  (`replicate export --quantize int8`) one by one.

Every setting is timed REPEATS times, the settings taking turns, and the fastest kept (a shared
2-core VM varies by a fifth from one pass to the next). Each row's `max_diff` is the largest
difference of its probabilities from the same models run one by one in the same precision. Rows
go to benchmarks/results.csv (bench=shared_body).
"""

from __future__ import annotations

import datetime
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import results  # benchmarks/results.py, beside this script

from replicate.config import RunConfig
from replicate.engine import onnx_models
from replicate.tagging import bundle
from replicate.training import export, train

LITE = "tf_efficientnet_lite0"
REPEATS = 3
SETTINGS = (  # (engine, models, body shared, the row's body)
    ("onnx-fp32", "fp32", False, "one by one"),
    ("onnx-fp32", "fp32", True, "shared"),
    ("onnx-fp32", "bundle", True, "bundle"),
    ("onnx-int8", "int8", False, "one by one"),
    ("onnx-int8", "bundle-int8", True, "bundle"),
)
ROOMS = Path("data/rooms")


def small_task(out: Path, train_n: int = 30, valid_n: int = 10) -> Path:
    """A copy of data/rooms with the first `train_n` / `valid_n` photos of each class."""
    for split, n in (("train", train_n), ("valid", valid_n)):
        for folder in sorted((ROOMS / split).iterdir()):
            (out / split / folder.name).mkdir(parents=True, exist_ok=True)
            for photo in sorted(folder.glob("*.jpg"))[:n]:
                shutil.copy(photo, out / split / folder.name / photo.name)
    return out


def tag(models: list, files: list[Path], shared: bool = True) -> tuple[float, np.ndarray]:
    """(seconds, probabilities side by side) to tag `files` with `models`, the body shared (or a
    bundle's one session run) or every model run whole, one by one."""
    if not shared:
        for m in models:
            m.head = None  # no head alone: the model runs whole, as before bodies were shared
    start = time.perf_counter()
    table = onnx_models.tag_onnx(models, files, bs=64, progress=False)
    seconds = time.perf_counter() - start
    return seconds, table[[c for c in table.columns if "_p_" in c]].to_numpy()


def main() -> None:
    if not ROOMS.is_dir():
        raise SystemExit("needs data/rooms: run `replicate data houses` first")
    work = Path(tempfile.mkdtemp(prefix="shared-body-"))
    small_task(work / "data" / "rooms")
    quiet = lambda *a, **k: None  # noqa: E731
    runs = []
    for seed in range(42, 48):
        cfg = RunConfig("rooms", LITE, epochs=5, seed=seed, cache_features=1, freeze_bn=True,
                        workers=0, audit=False, data_dir=work / "data", exports_dir=work / "exports")  # fmt: skip
        runs.append(train.run(cfg, log=quiet))
        export.quantize_run(runs[-1], 64, log=quiet)  # model.int8.onnx, one by one
    bundles = {n: bundle.build(runs[:n], work / f"bundle{n}", quantize=True, calibration=64, log=quiet)
               for n in (1, 3, 6)}  # fmt: skip
    files = sorted((ROOMS / "valid").rglob("*.jpg"))
    onnx_models.tag_onnx([onnx_models.load_onnx(runs[0])], files[:64], progress=False)  # warm-up
    rows, base = [], {}

    def models(n: int, kind: str) -> list:
        if kind == "bundle":
            return onnx_models.load(bundles[n])
        if kind == "bundle-int8":
            return onnx_models.load(bundles[n] / "bundle.int8.onnx")
        file = "model.int8.onnx" if kind == "int8" else "model.onnx"
        return [onnx_models.load_onnx(d / file, name=f"a{i}") for i, d in enumerate(runs[:n])]

    timed = {}  # (n, setting) -> (fastest seconds, probabilities)
    for _ in range(REPEATS):
        for n in (1, 3, 6):
            for setting in SETTINGS:
                if n == 1 and setting[3] == "one by one" and setting[0] == "onnx-int8":
                    continue  # one int8 model: the bundle's row is the base
                seconds, probs = tag(models(n, setting[1]), files, setting[2])
                best = timed.get((n, setting), (seconds,))[0]
                timed[n, setting] = (min(seconds, best), probs)
    for n in (1, 3, 6):
        for setting in SETTINGS:
            engine, _, _, body = setting
            if n == 1 and body == "one by one":
                continue  # one model: nothing to share; the shared row is the base
            seconds, probs = timed[n, setting]
            alone = timed.get((n, (engine, engine[5:], False, "one by one")))
            base.setdefault(engine, seconds)
            rows.append({
                "bench": "shared_body", "date": datetime.datetime.now().isoformat(timespec="seconds"),
                "machine": platform.node(), "processor": platform.machine(), "arch": LITE,
                "engine": engine, "attributes": n, "body": body, "photos": len(files),
                "seconds": round(seconds, 2), "photos_per_s": round(len(files) / seconds, 1),
                "time_vs_one": round(seconds / base[engine], 2), "repeats": REPEATS,
                "max_diff": None if alone is None else float(np.abs(probs - alone[1]).max()),
            })  # fmt: skip
            print(rows[-1], flush=True)
    print(f"written: {results.append(rows)}")
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
