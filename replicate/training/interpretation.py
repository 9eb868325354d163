"""A run's mistakes: `interpret` scores a task's own photos with their labels (confusion matrices,
most-confused pairs, top losses), and `review` writes the page to mark them keep / relabel /
remove.

    replicate interpret exports/rooms/resnet18-unfrozen --split both

Scoring runs the run's export.pkl through the fastai engine (`engine.fastai_models`): a pickle, so
only run folders the user made or trusts.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pandas as pd

from .. import runs
from ..engine.fastai_models import load_model, score
from ..errors import ReplicateError
from ..report import pages, plots
from . import dataloaders


def interpret(run_dir: Path, splits: list[str], bs: int = 64) -> dict[str, pd.DataFrame]:
    """Score the task's own images with the run's export, without augmentation; {split: predictions}.

    Written to predictions_<split>.csv in the run folder. The training split matters most
    for label cleaning: a wrong label there teaches the model the mistake.
    """
    run = runs.open_run(run_dir)
    model = load_model(run.path)
    if model.warning:
        warnings.warn(model.warning, stacklevel=2)
    images = dataloaders.scan_task(run.task_dir)
    vocab = set(model.learn.dls.vocab)
    if set(images.classes) - vocab:
        raise ReplicateError(
            f"the task now has classes the model never saw: {sorted(set(images.classes) - vocab)}"
        )
    out = {}
    for split in splits:
        files = [
            f.resolve() for f in images.files if f.parent.parent.name == split
        ]  # usable from any folder
        out[split] = score(model.learn, files, bs, with_labels=True)
        out[split].to_csv(run.path / f"predictions_{split}.csv", index=False)
    return out


def interpretation(run_dir: Path, splits: list[str], k: int, log=print) -> None:
    """`replicate interpret`: score the splits, write each one's confusion matrix, most-confused
    pairs and top losses into the run folder, and say what was found."""
    run = runs.open_run(run_dir)
    for name, frame in interpret(run.path, splits).items():
        written = plots.render_interpretation(frame, run.classes, run.path, name, k)
        pairs = plots.most_confused(frame).head(10)
        acc = (frame.actual == frame.predicted).mean()
        log(
            f"\n{name}: {len(frame)} images, accuracy {acc:.1%}; most confused (actual -> predicted):"
        )
        log(pairs.to_string(index=False) if len(pairs) else "  none")
        log("written: " + ", ".join(p.name for p in written))


def review(run_dir: Path, splits: list[str], k: int, log=print) -> Path:
    """`replicate review`: review.html in the run folder, the `k` highest-loss photos per split
    (scored now unless `interpret` already wrote the splits' predictions); returns the page."""
    run = runs.open_run(run_dir)
    files = {s: run.path / f"predictions_{s}.csv" for s in splits}
    if all(f.is_file() for f in files.values()):
        preds = {s: pd.read_csv(f) for s, f in files.items()}
    else:
        preds = interpret(run.path, splits)
    worst = pd.concat([plots.top_losses(p, k).assign(split=s) for s, p in preds.items()])
    page = pages.write_review(
        worst.sort_values("loss", ascending=False), run.classes, run.path / "review.html"
    )
    log(
        f"open {page} in a browser; then: replicate clean {run.task} "
        "--decisions ~/Downloads/decisions.csv"
    )
    return page
