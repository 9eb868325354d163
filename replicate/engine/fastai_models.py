"""The fastai engine: a run's export.pkl -> predictions through fastai's own `test_dl` pipeline
(`replicate predict --engine fastai`, and what a run scores its valid photos with).

    replicate predict exports/rooms/resnet18-unfrozen photos/ --engine fastai

export.pkl is a pickle: loading it runs code, so only files the user trusts. The file is checked
against the SHA-256 its run folder recorded when it was written.
"""

from __future__ import annotations

import pickle
import types
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from PIL import Image

from .. import runs, runtime
from ..errors import ReplicateError

# Where each training module whose objects an export.pkl may name by path (label functions,
# transforms, callbacks, backbones) lived before the stages moved into sub-packages: run folders
# trained before that still load (`replicate export`, `interpret`, `review`, `predict --engine
# fastai`).
MOVED = {
    "replicate.archs": "replicate.models.archs",
    "replicate.data": "replicate.training.dataloaders",
    "replicate.downloads": "replicate.models.downloads",
    "replicate.features": "replicate.training.features",
    "replicate.models": "replicate.models.learner",
    "replicate.train": "replicate.training.train",
    "replicate.weights": "replicate.models.weights",
}


class _Unpickler(pickle.Unpickler):
    """pickle's Unpickler, reading a class or function at its old path (MOVED) from its new one."""

    def find_class(self, module: str, name: str):
        return super().find_class(MOVED.get(module, module), name)


# What torch.load takes as `pickle_module`: pickle itself, but for its Unpickler.
MOVED_PICKLE = types.SimpleNamespace(**vars(pickle) | {"Unpickler": _Unpickler})

if TYPE_CHECKING:  # fastai and torch load on first use (seconds), not with this module
    import torch
    from fastai.learner import Learner


@dataclass
class Model:
    """A loaded export.pkl (the fastai engine) and where it came from."""

    name: str  # column prefix, e.g. "rooms"
    learn: Learner
    path: Path  # the export.pkl
    warning: str = ""  # checksum problems, said to the user

    @property
    def classes(self) -> list[str]:
        return list(self.learn.dls.vocab)


def export_path(model: Path) -> Path:
    """The export.pkl of a run folder, or the file itself."""
    path = model / runs.PICKLE if model.is_dir() else model
    if not path.is_file():
        raise ReplicateError(f"{model} is neither a run folder with export.pkl nor an export file")
    return path


def load_model(model: Path, device: torch.device | None = None) -> Model:
    """Load an export (trusted code: it is unpickled) and check its recorded SHA-256."""
    from fastai.learner import load_learner

    path = export_path(Path(model))
    warning = runs.checksum_warning(path)
    with warnings.catch_warnings():
        # fastai's pickle warning: the CLI says it in --help instead
        warnings.simplefilter("ignore")
        try:
            cpu = device is None or device.type == "cpu"
            learn = load_learner(path, cpu=cpu, pickle_module=MOVED_PICKLE)
        except Exception as e:  # a truncated file, another fastai's pickle, a missing class...
            raise ReplicateError(
                f"cannot load {path}: {type(e).__name__}: {e}".splitlines()[0]
            ) from None
    if device is not None:
        learn.dls.to(device)
        learn.model.to(device)
    run = runs.run_of(path)
    return Model(run.task if runs.is_run(run.path) else path.parent.name, learn, path, warning)


def readable(files: list[Path]) -> tuple[list[Path], dict[Path, str]]:
    """(files that decode, {file: error} for those that don't), checked before batching so one
    bad file cannot stop a batch."""
    good, bad = [], {}
    for f in runtime.progress(files, what="checking photos", unit="photos"):
        try:
            with Image.open(f) as im:
                im.draft(im.mode, (64, 64))  # JPEG: decode at reduced scale, still reads every byte
                im.load()
            good.append(f)
        except Exception as e:  # PIL raises many types for files that are not images
            bad[f] = f"{type(e).__name__}: {e}"
    return good, bad


def score(
    learn: Learner, files: list[Path], bs: int = 64, with_labels: bool = False
) -> pd.DataFrame:
    """Probabilities for `files` (validation transforms, batches of `bs`): path, predicted,
    probability, p_<class>...; with labels (taken from the folders, as in training): actual, loss."""
    dl = learn.dls.test_dl(files, with_labels=with_labels, bs=bs)
    return predictions(learn, dl, files, with_labels)


def predictions(learn: Learner, dl, files: list, with_labels: bool) -> pd.DataFrame:
    """One row per photo of `dl` (whose items are `files`): path, [actual], predicted, probability,
    [loss], p_<class>...: what a run's valid_predictions.csv and `interpret` hold."""
    vocab = list(learn.dls.vocab)
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
    """The fastai engine: one row per file: path, error, and per model <name>_predicted, <name>_p_<class>."""
    good, bad = readable(files)
    table = pd.DataFrame(
        {"path": [str(f) for f in files], "error": [bad.get(f, "") for f in files]}
    )
    for model in models:
        if not good:
            for col in [f"{model.name}_predicted"] + [
                f"{model.name}_p_{c}" for c in model.learn.dls.vocab
            ]:
                table[col] = np.nan
            continue
        scored = score(model.learn, good, bs).drop(columns="probability")
        scored.columns = ["path"] + [f"{model.name}_{c}" for c in scored.columns[1:]]
        table = table.merge(scored, on="path", how="left")
    return table
