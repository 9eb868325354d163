"""Where the work runs: the device, this process's rank among several, and worker counts.

Training, prediction and the benchmarks ask here. PyTorch and fastai are imported inside the
functions that need them: the ONNX engine imports this module and must stay free of PyTorch.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import ReplicateError

if TYPE_CHECKING:
    import torch


def cores() -> int:
    """CPU cores this process may use (its affinity mask, else the machine's count)."""
    return (
        len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    )


def workers(requested: int | None) -> int:
    """Worker processes or threads: `requested` (--workers), else one per usable core, at most 8."""
    return requested if requested is not None else min(8, cores())


def gpu_present() -> bool:
    """An NVIDIA device node: cheaper than importing PyTorch to ask."""
    return Path("/dev/nvidiactl").exists() or Path("/proc/driver/nvidia/gpus").is_dir()


def resolve_device(name: str) -> torch.device:
    """'auto' -> CUDA when present else CPU; 'cuda' without CUDA is a ReplicateError.
    Launched as one of several processes on a machine, each takes the GPU of its LOCAL_RANK."""
    import torch
    from fastai.torch_core import num_distrib

    if name not in ("auto", "cpu", "cuda"):
        raise ReplicateError(f"unknown device {name!r}: use auto, cpu or cuda")
    if name == "cuda" and not torch.cuda.is_available():
        raise ReplicateError(
            f"--device cuda, but torch {torch.__version__} sees no CUDA GPU "
            f"(check nvidia-smi and CUDA_VISIBLE_DEVICES), or use --device cpu"
        )
    if name == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    if num_distrib() > 1:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cuda", torch.cuda.current_device())


def describe_device(device: torch.device) -> str:
    import torch

    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"cpu ({torch.get_num_threads()} threads)"


# processes and is_main_process read the environment as fastai's num_distrib and rank_distrib do;
# importing those would load PyTorch into `replicate --help`, `report` and the ONNX engine.
def processes() -> int:
    """How many processes this job runs as (`accelerate launch` / `torchrun` set WORLD_SIZE)."""
    return max(1, int(os.environ.get("WORLD_SIZE", 1)))


def is_main_process() -> bool:
    """True unless this is one of the other processes of an `accelerate launch` / `torchrun` job."""
    return int(os.environ.get("RANK", 0)) == 0


@contextlib.contextmanager
def alone():
    """Let this process work on its own: fastai gathers every prediction and loss from all processes
    whenever WORLD_SIZE > 1 (in `get_preds` too), and would wait for processes doing something else.
    Used by the main process to write the results, and by every process for a cached-feature fit."""
    world = os.environ.get("WORLD_SIZE")
    os.environ["WORLD_SIZE"] = "1"
    try:
        yield
    finally:
        if world is None:
            del os.environ["WORLD_SIZE"]
        else:
            os.environ["WORLD_SIZE"] = world


def on_terminal() -> bool:
    """True when stdout is a terminal: progress bars animate only there."""
    return sys.stdout.isatty()


def progress(
    items: Iterable, total: int | None = None, what: str = "", unit: str = "items", log=print
) -> Iterator:
    """`items`, with progress shown: fastprogress's bar on a terminal; written to a file or a pipe, a
    plain line at the start, at each tenth of the work and at the end, so a log holds no carriage
    returns and no bar frames.

    Written here rather than left to fastprogress: its console bar decides whether to print with
    `getattr(stdout, 'isatty', False)` (the method, always true) and writes a carriage return when it
    is created, so its frames fill a log."""
    total = len(items) if total is None and hasattr(items, "__len__") else total
    if on_terminal():
        from fastprogress.fastprogress import progress_bar

        bar = progress_bar(items, total=total, leave=False)
        bar.comment = what
        yield from bar
        return
    yield from _plain_progress(items, total, what or "working", unit, log)


def _plain_progress(items: Iterable, total: int | None, what: str, unit: str, log) -> Iterator:
    """Each line counts the items handed out so far; the last says done as the last is handed out
    (a consumer that takes exactly `total` never asks for the end of `items`)."""
    start, done, shown = time.perf_counter(), 0, 0
    log(f"{what}: {total if total is not None else 'an unknown number of'} {unit}")
    for item in items:
        done += 1
        seconds = time.perf_counter() - start
        if total and done < total and done * 10 // total > shown:
            shown = done * 10 // total
            log(f"{what}: {done}/{total} ({done / total:.0%}), {seconds:.0f}s")
        if done == total:
            log(f"{what}: done, {done} {unit} in {seconds:.1f}s")
        yield item
    if done != total:
        log(f"{what}: done, {done} {unit} in {time.perf_counter() - start:.1f}s")


def plural(n: int, noun: str) -> str:
    """'1 photo', '2 photos': counts in what the commands say (nouns that take an s)."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"
