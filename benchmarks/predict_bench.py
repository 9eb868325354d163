"""Tagging speed: fastai predict (export.pkl) vs ONNX Runtime fp32 vs int8, against the FLOP limit.

    make bench-predict        # = python benchmarks/predict_bench.py (needs data/rooms: replicate data houses)

For each arch (resnet18 and densenet121 at 224 px by default) it builds a model for the Houses
`rooms` task from random weights (speed does not depend on the weights; no download needed),
writes its export.pkl, model.onnx and model.int8.onnx (calibrated on training photos), and tags the
same photos with each engine the way `replicate predict` does, timing the whole job (decoding
included, process start-up and model loading excluded). The limit is the model's FLOPs per photo
divided by this CPU's measured float32 matmul throughput (a 2048 x 2048 torch matmul, all threads).

--runs RUN_DIR... adds the int8 accuracy of trained run folders (`replicate run ... --quantize int8`,
or `replicate export RUN_DIR --quantize int8`) from their metrics.json: the speed-up's cost.
Rows are appended to benchmarks/results.csv and printed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import results  # benchmarks/results.py, beside this script
import torch

from replicate import photos
from replicate.config import RunConfig
from replicate.engine import fastai_models, onnx_models
from replicate.models import archs, backbones, learner
from replicate.training import dataloaders, export


def matmul_gflops(n: int = 2048, repeats: int = 10) -> float:
    """This CPU's float32 matmul throughput in GFLOP/s (all of torch's threads): the ceiling for
    convolutions, which the runtimes lower to matrix products."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * n**3 * repeats / (time.perf_counter() - start) / 1e9


def build_run(arch: str, size: int, data_dir: Path, out: Path) -> Path:
    """A run folder for `arch` from random weights: config.json, export.pkl, model.onnx, model.int8.onnx."""
    cfg = RunConfig(
        "rooms",
        arch,
        unfreeze=True,
        size=size,
        pretrained=False,
        data_dir=data_dir,
        exports_dir=out,
    )
    images = dataloaders.scan_task(cfg.task_dir)
    learn = learner.create_learner(
        dataloaders.dataloaders(images, cfg, archs.resolve(cfg).preprocess, torch.device("cpu")),
        cfg,
    )
    run_dir = cfg.run_dir
    run_dir.mkdir(parents=True)
    config = {
        **cfg.to_dict(),
        "task_dir": str(cfg.task_dir.resolve()),
        "preprocess": archs.resolve(cfg).preprocess,
    }
    (run_dir / "config.json").write_text(json.dumps(config))
    (run_dir / "metrics.json").write_text("{}")
    learn.path = run_dir
    learn.export("export.pkl")
    export.write_onnx(learn, run_dir / "model.onnx", config)
    export.quantize_run(run_dir, log=lambda *a: None)
    return run_dir


def photos_per_second(engine: str, run_dir: Path, files: list[Path], workers: int | None) -> float:
    """Photos tagged per second by `engine`, as `replicate predict` does it (after loading the model)."""
    if engine == "fastai":
        model = fastai_models.load_model(run_dir)
        start = time.perf_counter()
        fastai_models.tag([model], files)
    else:
        model = onnx_models.load_onnx(
            run_dir / ("model.onnx" if engine == "onnx-fp32" else "model.int8.onnx")
        )
        start = time.perf_counter()
        onnx_models.tag_onnx([model], files, workers=workers, progress=False)
    return len(files) / (time.perf_counter() - start)


def inference_only(run_dir: Path, name: str, batches: list) -> float:
    """Photos/s of ONNX Runtime alone on already decoded batches: the runtime's share of the job."""
    model = onnx_models.load_onnx(run_dir / name)
    model.probabilities(batches[0][:8])
    start = time.perf_counter()
    for batch in batches:
        model.probabilities(batch)
    return sum(len(b) for b in batches) / (time.perf_counter() - start)


def op_profile(run_dir: Path, name: str, batch, top: int = 6) -> str:
    """Where ONNX Runtime spends a batch, by operator type (its own profiler), e.g. 'QLinearConv 61%'."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.enable_profiling = True
    options.profile_file_prefix = str(run_dir / f"profile-{name}")
    session = ort.InferenceSession(str(run_dir / name), options, providers=["CPUExecutionProvider"])
    model = onnx_models.load_onnx(run_dir / name)
    for _ in range(2):
        session.run(None, {session.get_inputs()[0].name: model.normalise(batch)})
    events = json.loads(Path(session.end_profiling()).read_text())
    ops = pd.DataFrame(
        [
            {"op": e["args"]["op_name"], "us": e["dur"]}
            for e in events
            if e.get("cat") == "Node" and "op_name" in e.get("args", {})
        ]
    )
    share = ops.groupby("op").us.sum().sort_values(ascending=False) / ops.us.sum()
    return ", ".join(f"{op} {v:.0%}" for op, v in share.head(top).items())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", type=Path, default=Path("data"))
    parser.add_argument("--archs", default="resnet18,densenet121")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument(
        "--photos", type=int, default=320, help="photos tagged per measurement (valid split first)"
    )
    parser.add_argument(
        "--workers", type=int, default=None, help="ONNX engine decoding processes (default: cores)"
    )
    parser.add_argument(
        "--runs", type=Path, nargs="*", default=[], help="trained run folders with int8 metrics"
    )
    args = parser.parse_args()

    task = args.data_dir / "rooms"
    files = sorted((task / "valid").rglob("*.jpg")) + sorted((task / "train").rglob("*.jpg"))
    files = files[: args.photos]
    limit_gflops = matmul_gflops()
    threads = torch.get_num_threads()
    print(f"{len(files)} photos; matmul {limit_gflops:.0f} GFLOP/s on {threads} threads")
    rows = []
    common = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": platform.node(),
        "processor": platform.processor() or platform.machine(),
        "device": f"cpu ({os.cpu_count()} cores)",
        "torch": torch.__version__,
        "impl": "predict",
    }
    with tempfile.TemporaryDirectory() as tmp:
        for arch in args.archs.split(","):
            run_dir = build_run(arch, args.size, args.data_dir, Path(tmp))
            gflops = (
                backbones.describe(arch)["GFLOPs"]
                * (args.size / archs.get_arch(arch).input_size) ** 2
            )
            limit = limit_gflops / gflops
            speeds = {
                e: photos_per_second(e, run_dir, files, args.workers)
                for e in ("fastai", "onnx-fp32", "onnx-int8")
            }
            geometry = onnx_models.load_onnx(run_dir / "model.onnx").prep.geometry
            start = time.perf_counter()
            pixels = [photos.decode(f, [geometry])[0][geometry] for f in files]
            decode_rate = len(files) / (time.perf_counter() - start)  # one thread
            batches = [np.stack(pixels[i : i + 64]) for i in range(0, len(pixels), 64)]
            for engine, speed in speeds.items():
                onnx_file = {"onnx-fp32": "model.onnx", "onnx-int8": "model.int8.onnx"}.get(engine)
                extra = {}
                if onnx_file:
                    extra = {
                        "inference_only_photos_per_s": round(
                            inference_only(run_dir, onnx_file, batches), 1
                        ),
                        "ops": op_profile(run_dir, onnx_file, batches[0]),
                    }
                rows.append(
                    {
                        **common,
                        "bench": "predict",
                        "arch": arch,
                        "size": args.size,
                        "engine": engine,
                        "photos": len(files),
                        "photos_per_s": round(speed, 1),
                        "speedup_vs_fastai": round(speed / speeds["fastai"], 2),
                        "flop_limit_photos_per_s": round(limit, 1),
                        "of_limit": round(speed / limit, 2),
                        "decode_photos_per_s_1_thread": round(decode_rate, 1),
                        **extra,
                        "gflops_per_photo": round(gflops, 2),
                        "matmul_gflops": round(limit_gflops, 1),
                        "model_mb": round(
                            (
                                run_dir
                                / {
                                    "fastai": "export.pkl",
                                    "onnx-fp32": "model.onnx",
                                    "onnx-int8": "model.int8.onnx",
                                }[engine]
                            )
                            .stat()
                            .st_size
                            / 1e6,
                            1,
                        ),
                    }
                )
    for run in args.runs:
        metrics = json.loads((run / "metrics.json").read_text())
        config = json.loads((run / "config.json").read_text())
        if "int8" in metrics:
            rows.append(
                {
                    **common,
                    "bench": "int8-accuracy",
                    "arch": config["arch"],
                    "size": config["size"],
                    "engine": "onnx-int8",
                    "run": str(run),
                    "valid_acc_fp32": metrics["int8"]["fp32_valid_accuracy"],
                    "valid_acc_int8": metrics["int8"]["valid_accuracy"],
                }
            )
    table = pd.DataFrame(rows)
    shown = table.drop(
        columns=["date", "machine", "processor", "torch", "impl", "device", "ops"], errors="ignore"
    )
    print(shown.to_string(index=False))
    for row in table.dropna(subset=["ops"]).itertuples() if "ops" in table else []:
        print(f"{row.arch} {row.engine}: {row.ops}")
    print(f"appended to {results.append(table)}")


if __name__ == "__main__":
    main()
