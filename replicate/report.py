"""Run folder -> plots and tables, without retraining.

    python -m replicate.report exports/rooms/resnet18-unfrozen

Everything here reads only what a run folder holds (history.csv, valid_predictions.csv,
metrics.json), so plots can be rebuilt at any time, e.g. after copying exports off a GPU box.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on a GPU box over ssh
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
from PIL import Image  # noqa: E402

TOP_LOSSES = 16


def plot_history(history: pd.DataFrame, what: str, title: str, path: Path) -> None:
    """Train vs valid `what` ('loss' or 'accuracy') per epoch, as the study's figures."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for split in ("train", "valid"):
        ax.plot(history["epoch"], history[f"{split}_{what}"], marker="o", label=split)
    ax.set(xlabel="epoch", ylabel=what, title=title)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_confusion(preds: pd.DataFrame, classes: list[str], title: str, path: Path) -> None:
    """Confusion matrix of counts (actual rows, predicted columns), shaded by row share.

    Drawn from the saved predictions rather than fastai's ClassificationInterpretation,
    which needs the learner and its data loaded again.
    """
    counts = pd.crosstab(pd.Categorical(preds["actual"], classes), pd.Categorical(preds["predicted"], classes),
                         dropna=False)
    share = counts.div(counts.sum(axis=1).clip(lower=1), axis=0)
    size = 1.2 + 0.9 * len(classes)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    im = ax.imshow(share.values, cmap="Blues", vmin=0, vmax=1)
    for i in range(len(classes)):
        for j in range(len(classes)):
            ax.text(j, i, int(counts.values[i, j]), ha="center", va="center",
                    color="white" if share.values[i, j] > 0.5 else "black")
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set(xlabel="predicted", ylabel="actual", title=title)
    fig.colorbar(im, ax=ax, fraction=0.046, label="share of actual class")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def top_losses(preds: pd.DataFrame, k: int = TOP_LOSSES) -> pd.DataFrame:
    """The `k` validation images with the largest loss: path, actual, predicted, probability, loss."""
    return preds.nlargest(k, "loss")[["path", "actual", "predicted", "probability", "loss"]]


def plot_top_losses(worst: pd.DataFrame, path: Path) -> None:
    """A grid of the worst images titled actual/predicted/probability/loss, like fastai's plot_top_losses."""
    cols = 4
    rows = max(1, -(-len(worst) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 3.2 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, row in zip(axes.flat, worst.itertuples()):
        try:
            with Image.open(row.path) as im:
                im.thumbnail((256, 256))
                ax.imshow(im.convert("RGB"))
        except OSError:  # moved or deleted since training: still show the numbers
            ax.text(0.5, 0.5, "image missing", ha="center", transform=ax.transAxes)
        ax.set_title(f"{row.actual} -> {row.predicted}\np={row.probability:.2f} loss={row.loss:.2f}", fontsize=9)
    fig.suptitle("actual -> predicted / probability / loss")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def render_run(run_dir: Path) -> list[Path]:
    """Write a run folder's plots and top_losses.csv from its files; returns what was written."""
    run_dir = Path(run_dir)
    config = json.loads((run_dir / "config.json").read_text())
    metrics = json.loads((run_dir / "metrics.json").read_text())
    history = pd.read_csv(run_dir / "history.csv")
    preds = pd.read_csv(run_dir / "valid_predictions.csv")
    name = f"{config['task']}: {config['arch']} {'unfrozen' if config['unfreeze'] else 'frozen'}"
    out = {k: run_dir / f for k, f in [("loss", "loss.png"), ("accuracy", "accuracy.png"),
                                       ("cm", "confusion_matrix.png"), ("tl", "top_losses.png"),
                                       ("tlcsv", "top_losses.csv")]}
    plot_history(history, "loss", f"{name}: loss", out["loss"])
    plot_history(history, "accuracy", f"{name}: accuracy", out["accuracy"])
    acc = (preds["actual"] == preds["predicted"]).mean()
    plot_confusion(preds, metrics["classes"], f"{name}\nvalid accuracy {acc:.1%} (best epoch)", out["cm"])
    worst = top_losses(preds)
    worst.to_csv(out["tlcsv"], index=False)
    plot_top_losses(worst, out["tl"])
    return list(out.values())


if __name__ == "__main__":
    for p in render_run(Path(sys.argv[1])):
        print(p)
