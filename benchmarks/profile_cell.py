"""Where one training cell's time goes: data loading, compute, validation, per-epoch overhead.

    python benchmarks/profile_cell.py --data-dir .gpu/data --arch resnet18 --unfreeze --device cuda --precision bf16

Runs `replicate run` (the same code path) with a timing callback added to its learner, then, with
`--torch-profile`, PyTorch's profiler over a few training steps for the top operators. Per
epoch it splits the wall time into:
- start-up: from the start of the training pass to the first batch (DataLoader workers start
  and decode their first batches; fastai starts its workers anew every epoch);
- data wait: time the training loop waits for the next batch after finishing one;
- compute: forward, loss, backward and optimiser step (synchronised on CUDA, so GPU time counts);
- validation: the whole validation pass;
- overhead: the rest of the epoch (recorder, history, keeping the best weights).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

import pandas as pd
import torch
from fastai.callback.core import Callback

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from replicate import runtime
from replicate.config import RunConfig  # noqa: E402
from replicate.models import learner
from replicate.training import train  # noqa: E402


class PhaseTimer(Callback):
    """Wall time of each phase of each epoch (see the module docstring)."""

    order = 100  # last: after_epoch sees every other callback's work done

    def __init__(self):
        self.rows = []

    def _now(self) -> float:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter()

    def before_epoch(self):
        self.t_epoch = self._now()
        self.row = {
            "epoch": len(self.rows) + 1,
            "startup": 0.0,
            "data_wait": 0.0,
            "compute": 0.0,
            "batches": 0,
        }

    def before_train(self):
        self.t_mark, self.first = self._now(), True

    def before_batch(self):
        if not self.training:
            return
        now = self._now()
        self.row["startup" if self.first else "data_wait"] += now - self.t_mark
        self.first, self.t_batch = False, now

    def after_batch(self):
        if not self.training:
            return
        self.t_mark = self._now()
        self.row["compute"] += self.t_mark - self.t_batch
        self.row["batches"] += 1

    def before_validate(self):
        self.t_valid = self._now()

    def after_validate(self):
        self.row["validation"] = self._now() - self.t_valid

    def after_epoch(self):
        self.row["epoch_s"] = self._now() - self.t_epoch
        accounted = sum(self.row[k] for k in ("startup", "data_wait", "compute", "validation"))
        self.row["overhead"] = self.row["epoch_s"] - accounted
        self.rows.append(self.row)


class TorchProfile(Callback):
    """PyTorch's profiler over training steps `skip`..`skip + steps` of the first epoch."""

    def __init__(self, skip: int = 5, steps: int = 10):
        self.skip, self.steps, self.seen, self.prof, self.done = skip, steps, 0, None, False

    def before_batch(self):
        if self.training and self.seen == self.skip and self.prof is None:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self.prof = torch.profiler.profile(activities=activities)
            self.prof.__enter__()

    def after_batch(self):
        if not self.training:
            return
        self.seen += 1
        if self.seen == self.skip + self.steps:
            self._stop()

    def after_fit(self):
        self._stop()  # fewer steps than asked for: profile what there was

    def _stop(self):
        if self.prof is not None and not self.done:
            self.prof.__exit__(None, None, None)
            self.done = True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, default=Path("data"))
    parser.add_argument("--task", default="rooms")
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--unfreeze", action="store_true")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--size", type=int, default=None)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument(
        "--torch-profile", action="store_true", help="also PyTorch's profiler over 10 steps"
    )
    parser.add_argument("--exports-dir", type=Path, default=Path("/tmp/replicate-profile"))
    args = parser.parse_args()
    cfg = RunConfig(
        args.task,
        args.arch,
        unfreeze=args.unfreeze,
        epochs=args.epochs,
        size=args.size,
        pretrained=False,
        device=args.device,
        precision=args.precision,
        workers=args.workers,
        audit=False,
        data_dir=args.data_dir,
        exports_dir=args.exports_dir,
    )
    timer, profile = PhaseTimer(), TorchProfile() if args.torch_profile else None
    fit = learner.fit

    def fit_with_timers(
        learn, cfg, lr
    ):  # train.run has no hook for extra callbacks; a benchmark adds them here
        extra = [timer] + ([profile] if profile else [])
        with learn.added_cbs(extra):  # removed before the export pickles the learner
            fit(learn, cfg, lr)

    learner.fit = fit_with_timers
    start = time.perf_counter()
    with contextlib.redirect_stdout(
        sys.stderr
    ):  # fastai's progress bars: stdout holds only the summary
        train.run(cfg, log=print)
    wall = time.perf_counter() - start
    table = pd.DataFrame([r for r in timer.rows if r["batches"]]).round(3)  # not get_preds' passes
    print(
        f"{args.arch} {'unfrozen' if args.unfreeze else 'frozen'} {args.precision} on {runtime.describe_device(runtime.resolve_device(args.device))}, "
        f"{args.epochs} epochs, run wall {wall:.1f}s (with start-up, data check and plots)"
    )
    print(table.to_string(index=False))
    later = table.iloc[1:] if len(table) > 1 else table  # the first epoch also warms up kernels
    shares = (
        later[["startup", "data_wait", "compute", "validation", "overhead"]].sum()
        / later.epoch_s.sum()
    )
    print(
        "share of epoch time (epochs after the first): "
        + ", ".join(f"{k} {v:.0%}" for k, v in shares.items())
    )
    if torch.cuda.is_available():
        print(f"peak GPU memory {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB")
    if profile and profile.prof is not None:
        sort = "cuda_time_total" if torch.cuda.is_available() else "cpu_time_total"
        print(profile.prof.key_averages().table(sort_by=sort, row_limit=15))


if __name__ == "__main__":
    main()
