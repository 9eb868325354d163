"""Exported learner -> predictions: tag new photos in bulk, and score a task's own images.

    replicate predict exports/rooms/resnet18-unfrozen photos/ --out tags.csv

`load_model` opens an `export.pkl` (a pickle: it runs code, so only files the user points at),
checking it against the SHA-256 recorded when it was written. `score` predicts a list of files
in batches with the learner's validation transforms (no augmentation), turning files that do
not decode into rows with an error instead of stopping.
"""
from __future__ import annotations

import json
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from fastai.learner import Learner, load_learner
from fastprogress.fastprogress import progress_bar
from PIL import Image

from .folders import image_files, sha256_file
from .errors import ReplicateError


@dataclass
class Model:
    """A loaded export and where it came from."""

    name: str  # column prefix, e.g. "rooms"
    learn: Learner
    path: Path  # the export.pkl
    warning: str = ""  # checksum problems, said to the user


def export_path(model: Path) -> Path:
    """The export.pkl of a run folder, or the file itself."""
    path = model / "export.pkl" if model.is_dir() else model
    if not path.is_file():
        raise ReplicateError(f"{model} is neither a run folder with export.pkl nor an export file")
    return path


def load_model(model: Path, device: torch.device | None = None, name: str | None = None) -> Model:
    """Load an export (trusted code: it is unpickled) and check its recorded SHA-256."""
    path = export_path(Path(model))
    warning = ""
    metrics = path.parent / "metrics.json"
    if metrics.is_file():
        recorded = json.loads(metrics.read_text()).get("export_sha256")
        if recorded and recorded != sha256_file(path):
            warning = f"{path} does not match the SHA-256 recorded in {metrics} when it was written: it was changed"
    else:
        warning = f"{path} has no metrics.json beside it: no checksum to verify it against"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fastai's pickle warning: the CLI says it in --help instead
        try:
            learn = load_learner(path, cpu=device is None or device.type == "cpu")
        except Exception as e:  # a truncated file, another fastai's pickle, a missing class...
            raise ReplicateError(f"cannot load {path}: {type(e).__name__}: {e}".splitlines()[0]) from None
    if device is not None:
        learn.dls.to(device)
        learn.model.to(device)
    config = path.parent / "config.json"
    default = json.loads(config.read_text())["task"] if config.is_file() else path.parent.name
    return Model(name or default, learn, path, warning)


def find_images(paths: list[Path]) -> list[Path]:
    """Image files among `paths`, folders searched recursively; other files named directly are kept
    (they get an error row) so nothing the user named silently disappears."""
    found = []
    for p in paths:
        if p.is_dir():
            found += image_files(p)
        elif p.exists():
            found.append(p)
        else:
            raise ReplicateError(f"{p} does not exist")
    return list(dict.fromkeys(found))


def readable(files: list[Path]) -> tuple[list[Path], dict[Path, str]]:
    """(files that decode, {file: error} for those that don't), checked before batching so one
    bad file cannot stop a batch."""
    good, bad = [], {}
    for f in progress_bar(files, leave=False):
        try:
            with Image.open(f) as im:
                im.draft(im.mode, (64, 64))  # JPEG: decode at reduced scale, still reads every byte
                im.load()
            good.append(f)
        except Exception as e:  # PIL raises many types for files that are not images
            bad[f] = f"{type(e).__name__}: {e}"
    return good, bad


def score(learn: Learner, files: list[Path], bs: int = 64, with_labels: bool = False) -> pd.DataFrame:
    """Probabilities for `files` (validation transforms, batches of `bs`): path, predicted,
    probability, p_<class>...; with labels (taken from the folders, as in training): actual, loss."""
    vocab = list(learn.dls.vocab)
    dl = learn.dls.test_dl(files, with_labels=with_labels, bs=bs)
    if with_labels:
        probs, targs, losses = learn.get_preds(dl=dl, with_loss=True)
    else:
        probs, _ = learn.get_preds(dl=dl)
    pred = probs.argmax(dim=1)
    frame = pd.DataFrame({"path": [str(f) for f in files]})
    if with_labels:
        frame["actual"] = [vocab[i] for i in targs.tolist()]
    frame["predicted"] = [vocab[i] for i in pred.tolist()]
    frame["probability"] = probs.max(dim=1).values.numpy()
    if with_labels:
        frame["loss"] = losses.numpy()
    for i, c in enumerate(vocab):
        frame[f"p_{c}"] = probs[:, i].numpy()
    return frame


def tag(models: list[Model], files: list[Path], bs: int = 64) -> pd.DataFrame:
    """One row per file: path, error, and per model <name>_predicted, <name>_probability, <name>_p_<class>."""
    good, bad = readable(files)
    table = pd.DataFrame({"path": [str(f) for f in files], "error": [bad.get(f, "") for f in files]})
    for model in models:
        if not good:
            break
        scored = score(model.learn, good, bs).drop(columns="probability")
        scored.columns = ["path"] + [f"{model.name}_{c}" for c in scored.columns[1:]]
        table = table.merge(scored, on="path", how="left")
    return table


def listings(table: pd.DataFrame, models: list[Model], pattern: str, threshold: float = 0.5) -> pd.DataFrame:
    """Per listing: for each model and class, the highest probability over the listing's photos,
    and whether any photo shows it above `threshold` ("has a balcony" is a property of the listing)."""
    regex = re.compile(pattern)
    if regex.groups < 1:
        raise ReplicateError(f"--listing-pattern {pattern!r} needs a group that captures the listing id, e.g. '^(\\d+)_'")

    def listing_id(path: str) -> str | None:
        p = Path(path)
        m = regex.search(p.as_posix() if "/" in pattern else p.name)
        return m[1] if m else None

    ids = table.path.map(listing_id)
    if ids.isna().all():
        raise ReplicateError(f"--listing-pattern {pattern!r} matched none of the file names")
    probs = table.filter(regex=r"_p_").assign(listing=ids).dropna(subset=["listing"])
    best = probs.groupby("listing").max()
    out = pd.concat([probs.groupby("listing").size().rename("photos"), best.add_prefix("max_")], axis=1)
    for col in best.columns:
        out[f"has_{col.replace('_p_', '_')}"] = best[col] >= threshold
    return out.reset_index()


def task_dir_of(run_dir: Path) -> Path:
    """The task folder a run trained on, from its config.json."""
    config = json.loads((Path(run_dir) / "config.json").read_text())
    return Path(config.get("task_dir") or Path(config["data_dir"]) / config["task"])


def interpret(run_dir: Path, splits: list[str], bs: int = 64) -> dict[str, pd.DataFrame]:
    """Score the task's own images with the run's export, without augmentation; {split: predictions}.

    Written to predictions_<split>.csv in the run folder. The training split matters most
    for label cleaning: a wrong label there teaches the model the mistake.
    """
    from . import data
    run_dir = Path(run_dir)
    if not (run_dir / "config.json").is_file():
        raise ReplicateError(f"{run_dir} is not a run folder (no config.json): e.g. exports/rooms/resnet18-frozen")
    model = load_model(run_dir)
    if model.warning:
        warnings.warn(model.warning)
    images = data.scan_task(task_dir_of(run_dir))
    vocab = set(model.learn.dls.vocab)
    if set(images.classes) - vocab:
        raise ReplicateError(f"the task now has classes the model never saw: {sorted(set(images.classes) - vocab)}")
    out = {}
    for split in splits:
        files = [f.resolve() for f in images.files if f.parent.parent.name == split]  # usable from any folder
        out[split] = score(model.learn, files, bs, with_labels=True)
        out[split].to_csv(run_dir / f"predictions_{split}.csv", index=False)
    return out
