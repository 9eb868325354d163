"""Benchmark `replicate run` against the plain PyTorch baseline on the same data and settings.

    make bench                                      # resnet18, 128 px, 2 epochs, frozen and unfrozen
    python benchmarks/bench.py --arch densenet121 --size 224 --epochs 30    # the study's setting

Each run is a child process (same arch, size, epochs, batch size, threads and DataLoader workers),
so peak memory is measured per run. Prints one table and appends it to benchmarks/results.csv
with the machine, device and library versions.
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
                  "seconds_per_epoch": float(h.train_seconds.mean()), "final_acc": m["last_valid_accuracy"],
                  "best_acc": m["best_valid_accuracy"],
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None}))
"""


def child(cmd: list[str]) -> dict:
    """Run one benchmark process; its last stdout line is a JSON result."""
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"benchmark run failed: {' '.join(cmd[:4])}...\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description="replicate vs a plain PyTorch baseline")
    ap.add_argument("--data", default="data/rooms", help="task folder (replicate data houses makes data/rooms)")
    ap.add_argument("--arch", default="resnet18")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--bs", type=int, default=32)
    ap.add_argument("--modes", default="frozen,unfrozen")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    ap.add_argument("--results", default=str(HERE / "results.csv"))
    args = ap.parse_args()
    task_dir = Path(args.data)
    if not (task_dir / "train").is_dir():
        sys.exit(f"{task_dir} is not a task folder: run `replicate data houses` first")
    import torch
    import fastai
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({args.threads} threads)"
    rows = []
    with tempfile.TemporaryDirectory() as exports:
        for mode in args.modes.split(","):
            unfreeze = mode == "unfrozen"
            base = [sys.executable, str(HERE / "baseline.py"), str(task_dir), "--arch", args.arch, "--size",
                    str(args.size), "--epochs", str(args.epochs), "--bs", str(args.bs), "--workers",
                    str(args.workers), "--threads", str(args.threads)] + (["--unfreeze"] if unfreeze else [])
            config = dict(task=task_dir.name, arch=args.arch, unfreeze=unfreeze, epochs=args.epochs, bs=args.bs,
                          size=args.size, pretrained=False, workers=args.workers, threads=args.threads,
                          data_dir=str(task_dir.parent), exports_dir=exports)
            for impl, cmd in (("baseline", base), ("replicate", [sys.executable, "-c", REPLICATE_CHILD,
                                                                 json.dumps(config)])):
                print(f"{impl} {mode} ...", flush=True)
                rows.append({"impl": impl, "mode": mode, **child(cmd)})
    table = pd.DataFrame(rows)
    ratios = []
    for mode, g in table.groupby("mode", sort=False):
        b, r = g.set_index("impl").loc["baseline"], g.set_index("impl").loc["replicate"]
        ratios.append({"mode": mode, "images_per_s_ratio": r.train_images_per_s / b.train_images_per_s,
                       "acc_diff_points": 100 * (r.best_acc - b.best_acc)})
    print("\n" + table.round(3).to_string(index=False))
    print("\nreplicate / baseline:\n" + pd.DataFrame(ratios).round(2).to_string(index=False))
    frozen = table[(table.impl == "replicate")].set_index("mode")
    if {"frozen", "unfrozen"} <= set(frozen.index):
        print(f"replicate frozen vs unfrozen seconds per epoch: "
              f"{frozen.loc['unfrozen', 'seconds_per_epoch'] / frozen.loc['frozen', 'seconds_per_epoch']:.2f}x faster")
    table = table.assign(date=datetime.datetime.now().isoformat(timespec="seconds"), machine=platform.node(),
                         processor=platform.processor() or platform.machine(), device=device, arch=args.arch,
                         size=args.size, epochs=args.epochs, bs=args.bs, torch=torch.__version__,
                         fastai=fastai.__version__)
    results = Path(args.results)
    table.to_csv(results, mode="a", header=not results.exists(), index=False)
    print(f"appended to {results}")


if __name__ == "__main__":
    main()
