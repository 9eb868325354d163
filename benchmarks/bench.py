"""Benchmark `replicate run` against the plain PyTorch baseline on the same data and settings.

    make bench                          # resnet18, 128 px: 2 epochs each way, then 30 frozen epochs cached/uncached
    python benchmarks/bench.py --arch densenet121 --size 224 --epochs 30 --cache-epochs 0   # the study's setting

Each run is a child process (same arch, size, epochs, batch size, threads and DataLoader workers),
so peak memory is measured per run. Two parts:
1. baseline vs replicate, frozen and unfrozen, `--epochs` each: train images/s and accuracy;
2. replicate frozen for `--cache-epochs` epochs, uncached and with `--cache-features K`: the whole
   training time (caching included) and accuracy.
Prints one table and the ratios, and appends the table to benchmarks/results.csv with the
machine, device and library versions.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

HERE = Path(__file__).resolve().parent
REPLICATE_CHILD = """
import json, resource, sys, torch
from pathlib import Path
from replicate.config import RunConfig
from replicate.train import run
args = json.loads(sys.argv[1])
torch.set_num_threads(args.pop("threads"))
run_dir = run(RunConfig(**{**args, "data_dir": Path(args["data_dir"]), "exports_dir": Path(args["exports_dir"])}),
              log=lambda *a: None)
m = json.loads((run_dir / "metrics.json").read_text())
import pandas as pd
h = pd.read_csv(run_dir / "history.csv")
print(json.dumps({"train_images_per_s": m["train_images_per_second"],
                  "seconds_per_epoch": float(h.train_seconds.mean()), "fit_seconds": m["train_seconds"],
                  "final_acc": m["last_valid_accuracy"], "best_acc": m["best_valid_accuracy"],
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None}))
"""


def child(cmd: list[str]) -> dict:
    """Run one benchmark process; its last stdout line is a JSON result. Adds its wall time."""
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"benchmark run failed: {' '.join(cmd[:4])}...\n{done.stderr[-3000:]}")
    return {
        **json.loads(done.stdout.strip().splitlines()[-1]),
        "wall_seconds": time.perf_counter() - start,
    }


def baseline_cmd(args, task_dir: Path, epochs: int, unfreeze: bool) -> list[str]:
    return [
        sys.executable,
        str(HERE / "baseline.py"),
        str(task_dir),
        "--arch",
        args.arch,
        "--size",
        str(args.size),
        "--epochs",
        str(epochs),
        "--bs",
        str(args.bs),
        "--workers",
        str(args.workers),
        "--threads",
        str(args.threads),
        "--seed",
        str(args.seed),
    ] + (["--unfreeze"] if unfreeze else [])


def replicate_cmd(
    args, task_dir: Path, exports: str, epochs: int, unfreeze: bool, cache: int = 0
) -> list[str]:
    config = dict(
        task=task_dir.name,
        arch=args.arch,
        unfreeze=unfreeze,
        epochs=epochs,
        bs=args.bs,
        size=args.size,
        pretrained=False,
        workers=args.workers,
        threads=args.threads,
        cache_features=cache,
        seed=args.seed,
        data_dir=str(task_dir.parent),
        exports_dir=exports,
    )
    return [sys.executable, "-c", REPLICATE_CHILD, json.dumps(config)]


def measure(args, task_dir: Path) -> pd.DataFrame:
    """One row per run: impl, mode, epochs and the child's figures."""
    rows = []
    with tempfile.TemporaryDirectory() as exports:
        for mode in filter(None, args.modes.split(",")):
            unfreeze = mode == "unfrozen"
            for impl, cmd in (
                ("baseline", baseline_cmd(args, task_dir, args.epochs, unfreeze)),
                ("replicate", replicate_cmd(args, task_dir, exports, args.epochs, unfreeze)),
            ):
                print(f"{impl} {mode}, {args.epochs} epochs ...", flush=True)
                rows.append({"impl": impl, "mode": mode, "epochs": args.epochs, **child(cmd)})
        if args.cache_epochs:
            for cache in (0, args.cache_views):
                mode = f"frozen-cached{cache}" if cache else "frozen"
                print(f"replicate {mode}, {args.cache_epochs} epochs ...", flush=True)
                cmd = replicate_cmd(args, task_dir, exports, args.cache_epochs, False, cache)
                rows.append(
                    {"impl": "replicate", "mode": mode, "epochs": args.cache_epochs, **child(cmd)}
                )
    return pd.DataFrame(rows)


def summarize(table: pd.DataFrame, args) -> str:
    """The ratios the goals are stated in."""
    lines, same = [], table[table.epochs == args.epochs]
    for mode in ("frozen", "unfrozen"):
        g = same[same["mode"] == mode].drop_duplicates("impl").set_index("impl")
        if {"baseline", "replicate"} <= set(g.index):
            b, r = g.loc["baseline"], g.loc["replicate"]
            lines.append(
                f"{mode}: replicate/baseline train images/s {r.train_images_per_s / b.train_images_per_s:.2f}x"
                f", best accuracy {100 * (r.best_acc - b.best_acc):+.1f} points, "
                f"final {100 * (r.final_acc - b.final_acc):+.1f}"
            )
    r = same[same.impl == "replicate"].drop_duplicates("mode").set_index("mode")
    if {"frozen", "unfrozen"} <= set(r.index):
        lines.append(
            f"replicate frozen vs unfrozen, seconds per epoch: "
            f"{r.loc['unfrozen', 'seconds_per_epoch'] / r.loc['frozen', 'seconds_per_epoch']:.2f}x faster"
        )
    c = table[(table.impl == "replicate") & (table.epochs == args.cache_epochs)].drop_duplicates(
        "mode"
    )
    c, cached = c.set_index("mode"), f"frozen-cached{args.cache_views}"
    if args.cache_epochs and {"frozen", cached} <= set(c.index):
        u, k = c.loc["frozen"], c.loc[cached]
        lines.append(
            f"--cache-features {args.cache_views} vs uncached, frozen, {args.cache_epochs} epochs: "
            f"{u.fit_seconds / k.fit_seconds:.1f}x faster training ({u.fit_seconds:.0f}s -> "
            f"{k.fit_seconds:.0f}s, caching included; {u.wall_seconds / k.wall_seconds:.1f}x in wall time "
            f"with start-up), best accuracy {100 * (k.best_acc - u.best_acc):+.1f} points, "
            f"final {100 * (k.final_acc - u.final_acc):+.1f}"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description="replicate vs a plain PyTorch baseline")
    ap.add_argument(
        "--data", default="data/rooms", help="task folder (replicate data houses makes data/rooms)"
    )
    ap.add_argument("--arch", default="resnet18")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--bs", type=int, default=32)
    ap.add_argument("--modes", default="frozen,unfrozen", help='of part 1 ("": skip it)')
    ap.add_argument(
        "--cache-epochs",
        type=int,
        default=30,
        help="epochs of the cached/uncached frozen pair (0: skip)",
    )
    ap.add_argument(
        "--cache-views", type=int, default=3, help="--cache-features K of the cached run"
    )
    ap.add_argument("--seed", type=int, default=42, help="of every run, baseline and replicate")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    ap.add_argument("--results", default=str(HERE / "results.csv"))
    args = ap.parse_args()
    task_dir = Path(args.data)
    if not (task_dir / "train").is_dir():
        sys.exit(f"{task_dir} is not a task folder: run `replicate data houses` first")
    import fastai
    import torch

    device = (
        torch.cuda.get_device_name()
        if torch.cuda.is_available()
        else f"cpu ({args.threads} threads)"
    )
    table = measure(args, task_dir)
    print("\n" + table.round(3).to_string(index=False))
    print("\n" + summarize(table, args))
    table = table.assign(
        date=datetime.datetime.now().isoformat(timespec="seconds"),
        machine=platform.node(),
        processor=platform.processor() or platform.machine(),
        device=device,
        arch=args.arch,
        size=args.size,
        bs=args.bs,
        seed=args.seed,
        torch=torch.__version__,
        fastai=fastai.__version__,
    )
    results = Path(args.results)
    if (
        results.exists()
    ):  # older rows lack newer columns: align them by name rather than append blindly
        table = pd.concat([pd.read_csv(results), table], ignore_index=True)
    table.to_csv(results, index=False)
    print(f"appended to {results}")


if __name__ == "__main__":
    main()
