"""A run folder -> its plots, drawn from its files alone, so they can be redrawn at any time (after
copying exports off a GPU box, say) without retraining.

    python -m replicate.report.plots exports/rooms/resnet18-unfrozen

`render_run`: loss and accuracy per epoch (the study's figures), the confusion matrix, the top
losses, and for a two-class task its search filter's precision-recall curve (`render_filter`).
`render_interpretation`: the same for `replicate interpret`'s predictions on valid or train.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd
from PIL import Image

from ..engine import filters
from ..runs import Run


def pyplot():
    """matplotlib's pyplot, drawing to files only (no display on a GPU box over ssh). Imported on
    first use: the commands that draw nothing (audit, clean) should not pay for it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


TOP_LOSSES = 16
PR_CURVE = "pr_curve.png"


def plot_history(history: pd.DataFrame, what: str, title: str, path: Path) -> None:
    """Train vs valid `what` ('loss' or 'accuracy') per epoch, as the study's figures."""
    plt = pyplot()
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
    """Confusion matrix (actual rows, predicted columns): counts, and shares of each actual class.

    Drawn from saved predictions rather than fastai's ClassificationInterpretation, which needs
    the learner and its data loaded again.
    """
    plt = pyplot()
    counts = pd.crosstab(
        pd.Categorical(preds["actual"], classes),
        pd.Categorical(preds["predicted"], classes),
        dropna=False,
    )
    share = counts.div(counts.sum(axis=1).clip(lower=1), axis=0)
    size = 1.5 + 0.9 * len(classes)
    fig, axes = plt.subplots(1, 2, figsize=(2 * size + 1.5, size + 0.6))
    for ax, values, fmt, name in (
        (axes[0], counts.values, "{:.0f}", "counts"),
        (axes[1], share.values, "{:.0%}", "share of actual class"),
    ):
        ax.imshow(share.values, cmap="Blues", vmin=0, vmax=1)
        for i in range(len(classes)):
            for j in range(len(classes)):
                ax.text(
                    j,
                    i,
                    fmt.format(values[i, j]),
                    ha="center",
                    va="center",
                    color="white" if share.values[i, j] > 0.5 else "black",
                )
        ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
        ax.set_yticks(range(len(classes)), classes)
        ax.set(xlabel="predicted", ylabel="actual", title=name)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def most_confused(preds: pd.DataFrame) -> pd.DataFrame:
    """(actual, predicted, count) of the wrong predictions, most frequent first, like fastai's
    `most_confused` but from saved predictions."""
    wrong = preds[preds["actual"] != preds["predicted"]]
    return (
        wrong.groupby(["actual", "predicted"])
        .size()
        .rename("count")
        .reset_index()
        .sort_values("count", ascending=False, kind="stable")
        .reset_index(drop=True)
    )


def render_interpretation(
    preds: pd.DataFrame, classes: list[str], run_dir: Path, split: str, k: int
) -> list[Path]:
    """interpret_<split>_{confusion.png,most_confused.csv,top_losses.png,top_losses.csv} in the run folder."""
    out = [
        run_dir / f"interpret_{split}_{name}"
        for name in ("confusion.png", "most_confused.csv", "top_losses.png", "top_losses.csv")
    ]
    acc = (preds["actual"] == preds["predicted"]).mean()
    plot_confusion(
        preds,
        classes,
        f"{run_dir.name}, {split} split (no augmentation): accuracy {acc:.1%}",
        out[0],
    )
    most_confused(preds).to_csv(out[1], index=False)
    worst = top_losses(preds, k)
    plot_top_losses(worst, out[2])
    worst.to_csv(out[3], index=False)
    return out


def top_losses(preds: pd.DataFrame, k: int = TOP_LOSSES) -> pd.DataFrame:
    """The `k` validation images with the largest loss: path, actual, predicted, probability, loss."""
    return preds.nlargest(k, "loss")[["path", "actual", "predicted", "probability", "loss"]]


def plot_top_losses(worst: pd.DataFrame, path: Path) -> None:
    """A grid of the worst images titled actual/predicted/probability/loss, like fastai's plot_top_losses."""
    plt = pyplot()
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
        ax.set_title(
            f"{row.actual} -> {row.predicted}\np={row.probability:.2f} loss={row.loss:.2f}",
            fontsize=9,
        )
    fig.suptitle("actual -> predicted / probability / loss")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_filter(found: dict, title: str, path: Path) -> None:
    """The precision-recall curve on valid, the target precision and the chosen threshold."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    ax.plot(found["curve"]["recall"], found["curve"]["precision"], drawstyle="steps-post")
    ax.axhline(
        found["target_precision"],
        color="grey",
        linestyle=":",
        label=f"target {found['target_precision']:g}",
    )
    if found["threshold"] is not None:
        ax.plot(
            [found["recall"]],
            [found["precision"]],
            "o",
            color="C3",
            label=f"p >= {found['threshold']:.3f}: precision {found['precision']:.1%}, recall {found['recall']:.1%}",
        )
    ax.set(
        xlabel="recall",
        ylabel="precision",
        xlim=(0, 1.02),
        ylim=(0, 1.02),
        title=f"{title}\n{found['column']} on valid (average precision {found['average_precision']:.3f})",
    )
    ax.legend(loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def render_run(run_dir: Path) -> list[Path]:
    """Write a run folder's plots and top_losses.csv from its files; returns what was written."""
    run = Run(run_dir)
    history, preds = run.history(), run.valid_predictions()
    out = {
        k: run.path / f
        for k, f in [
            ("loss", "loss.png"),
            ("accuracy", "accuracy.png"),
            ("cm", "confusion_matrix.png"),
            ("tl", "top_losses.png"),
            ("tlcsv", "top_losses.csv"),
        ]
    }
    plot_history(history, "loss", f"{run.title}: loss", out["loss"])
    plot_history(history, "accuracy", f"{run.title}: accuracy", out["accuracy"])
    acc = (preds["actual"] == preds["predicted"]).mean()
    title = f"{run.title}\nvalid accuracy {acc:.1%} (best epoch)"
    plot_confusion(preds, run.classes, title, out["cm"])
    worst = top_losses(preds)
    worst.to_csv(out["tlcsv"], index=False)
    plot_top_losses(worst, out["tl"])
    if render_filter(run, preds=preds):  # a two-class task: its filter and precision-recall curve
        out.update(filter=run.path / filters.FILTER, pr=run.path / PR_CURVE)
    return list(out.values())


def render_filter(
    run: Run, positive: str | None = None, target: float | None = None, preds=None
) -> dict | None:
    """A two-class run's filter.json (filters.write, from `preds` when the caller read them) and its
    precision-recall curve, pr_curve.png; None (nothing written) for other tasks."""
    found = filters.write(run, positive, target, preds)
    if found is not None:
        plot_filter(found, run.title, run.path / PR_CURVE)
    return found


if __name__ == "__main__":
    for p in render_run(Path(sys.argv[1])):
        print(p)
