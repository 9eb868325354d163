"""Run folder -> plots and tables, without retraining.

    python -m replicate.report exports/rooms/resnet18-unfrozen

Everything here reads only what a run folder holds (history.csv, valid_predictions.csv,
metrics.json), so plots can be rebuilt at any time, e.g. after copying exports off a GPU box.
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
import sys
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from .config import RunConfig
from .errors import ReplicateError


def _pyplot():
    """matplotlib's pyplot, drawing to files only (no display on a GPU box over ssh). Imported on
    first use: the commands that draw nothing (audit, clean) should not pay for it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


TOP_LOSSES = 16


def plot_history(history: pd.DataFrame, what: str, title: str, path: Path) -> None:
    """Train vs valid `what` ('loss' or 'accuracy') per epoch, as the study's figures."""
    plt = _pyplot()
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
    plt = _pyplot()
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
    plt = _pyplot()
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


# --- a yes/no task as a search filter ----------------------------------------------------------

TARGET_PRECISION = RunConfig.target_precision  # for run folders from before --target-precision


def positive_class(classes: list[str], preds: pd.DataFrame, positive: str | None = None) -> str:
    """The class a two-class task's filter looks for: `positive` if named, else `yes`, else the
    rarer class on valid (an attribute is usually the rare side), the first by name on a tie."""
    if positive:
        if positive not in classes:
            raise ReplicateError(
                f"--positive {positive}: the task's classes are {', '.join(classes)}"
            )
        return positive
    if "yes" in classes:
        return "yes"
    counts = preds.actual.value_counts().reindex(classes, fill_value=0)
    return min(sorted(classes), key=lambda c: counts[c])


def search_filter(
    preds: pd.DataFrame,
    classes: list[str],
    task: str,
    positive: str | None = None,
    target: float = TARGET_PRECISION,
) -> dict | None:
    """For a two-class task (None otherwise): the threshold on p_<positive> that keeps the most
    recall while precision on valid stays at least `target`, with that precision and recall, the
    average precision and the whole curve (scikit-learn's precision_recall_curve). The column it
    makes is has_<task> for yes/no classes, else has_<positive>. `threshold` is None when no
    threshold reaches `target` on valid."""
    if len(classes) != 2:
        return None
    from sklearn.metrics import (  # only for two-class runs
        average_precision_score,
        precision_recall_curve,
    )

    positive = positive_class(classes, preds, positive)
    truth, score = (preds.actual == positive).to_numpy(), preds[f"p_{positive}"].to_numpy()
    precision, recall, thresholds = precision_recall_curve(truth, score)
    reach = np.flatnonzero(precision[:-1] >= target)  # the last point (recall 0) has no threshold
    best = reach[np.lexsort((-thresholds[reach], recall[reach]))[-1]] if len(reach) else None
    return {
        "positive": positive,
        "column": f"has_{task if set(classes) == {'yes', 'no'} else positive}",
        "target_precision": target,
        "threshold": None if best is None else float(thresholds[best]),
        "precision": None if best is None else float(precision[best]),
        "recall": None if best is None else float(recall[best]),
        "average_precision": float(average_precision_score(truth, score)),
        "valid_photos": int(len(truth)),
        "valid_positives": int(truth.sum()),
        "curve": {"precision": precision.round(4).tolist(), "recall": recall.round(4).tolist()},
    }


def write_filter(
    run_dir: Path, positive: str | None = None, target: float | None = None
) -> dict | None:
    """filter.json and pr_curve.png of a two-class run folder, from its valid_predictions.csv;
    `positive` and `target` default to the run's config.json (--positive, --target-precision)."""
    config = json.loads((run_dir / "config.json").read_text())
    classes = json.loads((run_dir / "metrics.json").read_text())["classes"]
    preds = pd.read_csv(run_dir / "valid_predictions.csv")
    positive = positive or config.get("positive")
    target = target or config.get("target_precision") or TARGET_PRECISION
    found = search_filter(preds, classes, config["task"], positive, target)
    if found is None:
        return None
    (run_dir / "filter.json").write_text(json.dumps(found, indent=2))
    plot_filter(
        found,
        f"{config['task']}: {config['arch']} {'unfrozen' if config['unfreeze'] else 'frozen'}",
        run_dir / "pr_curve.png",
    )
    return found


def plot_filter(found: dict, title: str, path: Path) -> None:
    """The precision-recall curve on valid, the target precision and the chosen threshold."""
    plt = _pyplot()
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
    run_dir = Path(run_dir)
    config = json.loads((run_dir / "config.json").read_text())
    metrics = json.loads((run_dir / "metrics.json").read_text())
    history = pd.read_csv(run_dir / "history.csv")
    preds = pd.read_csv(run_dir / "valid_predictions.csv")
    name = f"{config['task']}: {config['arch']} {'unfrozen' if config['unfreeze'] else 'frozen'}"
    out = {
        k: run_dir / f
        for k, f in [
            ("loss", "loss.png"),
            ("accuracy", "accuracy.png"),
            ("cm", "confusion_matrix.png"),
            ("tl", "top_losses.png"),
            ("tlcsv", "top_losses.csv"),
        ]
    }
    plot_history(history, "loss", f"{name}: loss", out["loss"])
    plot_history(history, "accuracy", f"{name}: accuracy", out["accuracy"])
    acc = (preds["actual"] == preds["predicted"]).mean()
    plot_confusion(
        preds, metrics["classes"], f"{name}\nvalid accuracy {acc:.1%} (best epoch)", out["cm"]
    )
    worst = top_losses(preds)
    worst.to_csv(out["tlcsv"], index=False)
    plot_top_losses(worst, out["tl"])
    if write_filter(run_dir):  # a two-class task: its search filter and precision-recall curve
        out.update(filter=run_dir / "filter.json", pr=run_dir / "pr_curve.png")
    return list(out.values())


if __name__ == "__main__":
    for p in render_run(Path(sys.argv[1])):
        print(p)


# --- comparing runs: the study's tables and figures ----------------------------------------------


def _arch_order(arch: str) -> int:
    """The study's table order for its five (the order of paper_results.csv, which is also the
    registry's: read here without importing PyTorch); any other arch after them."""
    study = _study_archs()
    return study.index(arch) if arch in study else len(study)


@lru_cache(maxsize=1)
def _study_archs() -> list[str]:
    return list(dict.fromkeys(paper_results().arch))


def paper_results() -> pd.DataFrame:
    """The study's 30 results (tables 4.1-4.6), shipped with the package as data."""
    return pd.read_csv(Path(__file__).with_name("paper_results.csv"))


def wilson_interval(correct: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of an accuracy (a few lines; no statistics package is a dependency)."""
    if n == 0:
        return float("nan"), float("nan")
    p = correct / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * ((p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5) / denom
    return centre - half, centre + half


def load_runs(task_exports: Path) -> pd.DataFrame:
    """One row per finished run folder under exports/TASK (config.json + metrics.json)."""
    rows = []
    for run_dir in sorted(Path(task_exports).iterdir()) if Path(task_exports).is_dir() else []:
        try:
            config = json.loads((run_dir / "config.json").read_text())
            metrics = json.loads((run_dir / "metrics.json").read_text())
        except (OSError, ValueError):
            continue  # not a run folder (compare/, a failed or unfinished run)
        rows.append(
            {
                "arch": config["arch"],
                "mode": "unfrozen" if config["unfreeze"] else "frozen",
                "recipe": config.get("recipe", "paper"),
                "cache_features": config.get("cache_features", 0),
                "freeze_bn": config.get("freeze_bn", False),
                "precision": config.get("precision", "fp32"),
                "seed": config["seed"],
                "epochs": config["epochs"],
                "size": config["size"],
                "pretrained": config["pretrained"],
                "device": config.get("device_used", ""),
                "train_seconds": metrics["train_seconds"],
                "best_acc": metrics["best_valid_accuracy"],
                "best_epoch": metrics["best_epoch"],
                "last_acc": metrics["last_valid_accuracy"],
                "images_per_s": metrics["train_images_per_second"],
                "n_valid": metrics["n_valid"],
                "audit": metrics.get("audit"),
                "int8": metrics.get("int8"),
                "run_dir": run_dir,
                "filter": read_filter(run_dir),
            }
        )
    return pd.DataFrame(rows)


def summary_table(runs: pd.DataFrame, task: str) -> pd.DataFrame:
    """One row per (recipe, arch, mode, cached features, BatchNorm mode, precision): means over seeds,
    spread, 95% CI, and the study's numbers. `cache_features` K > 0: the frozen body's outputs were
    computed once for K views; `freeze_bn`: the frozen body ran in eval mode; `precision` bf16/fp16:
    mixed precision."""
    rows = []
    keys = ["recipe", "arch", "mode", "cache_features", "freeze_bn", "precision"]
    for (recipe, arch, mode, cached, freeze_bn, precision), g in runs.groupby(keys, sort=False):
        n = int(g.n_valid.iloc[0])
        low, high = wilson_interval(g.best_acc.mean() * n, n)
        rows.append(
            {
                "arch": arch,
                "mode": mode,
                "recipe": recipe,
                "cache_features": cached,
                "freeze_bn": freeze_bn,
                "precision": precision,
                "seeds": len(g),
                # A task folder can hold runs made with other settings (a `run` after the compare):
                # show them, so mismatched cells are visible.
                "epochs": "/".join(str(v) for v in sorted(set(g.epochs))),
                "size": "/".join(str(v) for v in sorted(set(g["size"]))),
                "train_s": round(g.train_seconds.mean(), 1),
                "max_valid_acc": round(100 * g.best_acc.mean(), 2),
                "acc_std": round(100 * g.best_acc.std(), 2) if len(g) > 1 else float("nan"),
                "ci95_low": round(100 * low, 2),
                "ci95_high": round(100 * high, 2),
                "best_epoch": int(g.best_epoch.iloc[0])
                if len(g) == 1
                else round(g.best_epoch.mean(), 1),
                "last_acc": round(100 * g.last_acc.mean(), 2),
                "images_per_s": round(g.images_per_s.mean(), 1),
                **_audit_columns(g.audit.iloc[-1]),
                **_int8_columns(g.int8.tolist()),
                **_filter_columns(g["filter"].tolist()),
            }
        )
    table = pd.DataFrame(rows)
    if table.empty:
        return table
    paper = (
        paper_results()
        .query("task == @task")
        .rename(columns={"train_seconds": "paper_s", "max_valid_accuracy": "paper_acc"})
    )
    table = table.merge(
        paper[["mode", "arch", "paper_s", "paper_acc"]], on=["mode", "arch"], how="left"
    )
    table["diff_acc"] = (table.max_valid_acc - table.paper_acc).round(2)
    table["_fastai"], table["_order"] = table.recipe != "paper", table.arch.map(_arch_order)
    table = table.sort_values(
        ["_fastai", "recipe", "mode", "_order", "arch", "cache_features", "freeze_bn"]
    )
    return table.drop(columns=["_fastai", "_order"]).reset_index(drop=True)


def _int8_columns(int8: list[dict | None]) -> dict:
    """`--quantize int8`: the int8 model's validation accuracy beside the fp32 ONNX model's (both
    run by ONNX Runtime on the same photos), in percent, means over seeds; blank where not quantized."""
    done = [d for d in int8 if isinstance(d, dict)]
    if not done:
        return {"int8_acc": float("nan"), "int8_fp32_acc": float("nan")}
    return {
        "int8_acc": round(100 * float(np.mean([d["valid_accuracy"] for d in done])), 2),
        "int8_fp32_acc": round(100 * float(np.mean([d["fp32_valid_accuracy"] for d in done])), 2),
    }


def read_filter(run_dir: Path) -> dict | None:
    """A run folder's filter.json (`write_filter`); None for other tasks and older runs."""
    try:
        return json.loads((run_dir / "filter.json").read_text())
    except (OSError, ValueError):
        return None  # not a two-class task, or a run from before search filters


def _filter_columns(filters: list[dict | None]) -> dict:
    """Two-class tasks: the search filter's threshold on valid and the precision and recall it keeps
    (means over seeds, recall 0 where no threshold reached the target); absent for other tasks."""
    done = [f for f in filters if isinstance(f, dict)]
    if not done:
        return {}
    reached = [f for f in done if f["threshold"] is not None]

    def mean(key: str) -> float:
        return round(float(np.mean([f[key] for f in reached])), 4) if reached else float("nan")

    return {
        "filter": done[0]["column"],
        "target_precision": done[0]["target_precision"],
        "threshold": mean("threshold"),
        "filter_precision": mean("precision"),
        "filter_recall": round(float(np.mean([f["recall"] or 0.0 for f in done])), 4),
        "average_precision": round(float(np.mean([f["average_precision"] for f in done])), 4),
    }


def _audit_columns(audit: dict | None) -> dict:
    """What the run's audit found in its validation set: leaked valid photos (near-duplicates of
    training photos) and photos under two labels; blank where it was not audited (--no-audit)."""
    if not isinstance(audit, dict):
        return {"leaked_valid": float("nan"), "conflicts": float("nan")}
    return {"leaked_valid": audit["leaked_valid_photos"], "conflicts": audit["conflict_groups"]}


def to_markdown(table: pd.DataFrame) -> str:
    """A GitHub-style markdown table (pandas needs the optional `tabulate` package for this)."""
    cells = table.astype(object).where(table.notna(), "")
    lines = ["| " + " | ".join(table.columns) + " |", "|" + "---|" * len(table.columns)]
    lines += [
        "| " + " | ".join(str(v) for v in row) + " |" for row in cells.itertuples(index=False)
    ]
    return "\n".join(lines) + "\n"


def plot_curves(runs: pd.DataFrame, what: str, title: str, path: Path) -> None:
    """The study's figure: one subplot per backbone, train vs valid `what` per epoch, shared axes."""
    plt = _pyplot()
    archs = sorted(
        set(runs.arch), key=lambda a: (_arch_order(a), a)
    )  # timm names: alphabetical, after the five
    cols = min(3, len(archs))
    rows = -(-len(archs) // cols)
    fig, axes = plt.subplots(
        rows, cols, figsize=(4.2 * cols, 3.2 * rows), sharex=True, sharey=True, squeeze=False
    )
    for ax in axes.flat[len(archs) :]:
        ax.axis("off")
    for ax, arch in zip(axes.flat, archs):
        run = runs[runs.arch == arch].sort_values("seed").iloc[0]
        history = pd.read_csv(run.run_dir / "history.csv")
        for split in ("train", "valid"):
            ax.plot(history.epoch, history[f"{split}_{what}"], marker=".", label=split)
        ax.set_title(arch)
        ax.grid(alpha=0.3)
        ax.xaxis.set_tick_params(labelbottom=True)  # shared x hides them above an empty grid cell
    axes.flat[0].legend()
    for ax in axes[-1]:
        ax.set_xlabel("epoch")
        ax.xaxis.get_major_locator().set_params(integer=True)
    for ax in axes[:, 0]:
        ax.set_ylabel(what)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_tradeoff(table: pd.DataFrame, task: str, path: Path) -> None:
    """Max valid accuracy against training time for every cell, labelled; the study's cells in grey."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 5))
    markers = {"frozen": "o", "unfrozen": "s"}
    for row in table.itertuples():
        ax.scatter(
            row.train_s,
            row.max_valid_acc,
            marker=markers[row.mode],
            color="tab:blue" if row.recipe == "paper" else "tab:orange",
        )
        ax.annotate(
            f"{row.arch} {row.mode}"
            + ("" if row.recipe == "paper" else f" ({row.recipe})")
            + (f" cached x{row.cache_features}" if row.cache_features else "")
            + (" freeze-bn" if row.freeze_bn else "")
            + ("" if row.precision == "fp32" else f" {row.precision}"),
            (row.train_s, row.max_valid_acc),
            fontsize=7,
            xytext=(4, 3),
            textcoords="offset points",
        )
        if pd.notna(row.paper_acc) and row.recipe == "paper":
            ax.scatter(
                row.paper_s,
                row.paper_acc,
                marker=markers[row.mode],
                facecolors="none",
                edgecolors="grey",
            )
    ax.set(
        xscale="log",
        xlabel="training time, s (log)",
        ylabel="max valid accuracy, %",
        title=f"{task}: accuracy vs training time"
        + (" (hollow grey: the 2019 study on a K80)" if table.paper_acc.notna().any() else ""),
    )
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _embed(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode()


def write_html(
    table: pd.DataFrame, runs: pd.DataFrame, figures: list[Path], failures: list[dict], path: Path
) -> None:
    """One page that opens from disk: the table (best cell highlighted, the study's numbers beside
    ours), the figures embedded, and each cell's confusion matrix and top losses from its run folder."""
    best = table.sort_values(["max_valid_acc", "train_s"], ascending=[False, True]).index[0]
    head = "".join(f"<th>{html.escape(c)}</th>" for c in table.columns)
    body = "".join(
        f"<tr{' class=best' if i == best else ''}>"
        + "".join(f"<td>{'' if pd.isna(v) else html.escape(str(v))}</td>" for v in row)
        + "</tr>"
        for i, row in zip(table.index, table.itertuples(index=False))
    )
    b = table.loc[best]
    parts = [
        f"<h1>{html.escape(path.parent.parent.name)}: backbones compared</h1>",
        f"<p class=lead>Best cell: <b>{b['arch']} {b['mode']}</b> ({b['recipe']} recipe"
        f"{f', features cached for {b.cache_features} views' if b.cache_features else ''}"
        f"{', body in eval mode' if b.freeze_bn else ''}), max valid accuracy "
        f"{b.max_valid_acc}% (95% CI {b.ci95_low}-{b.ci95_high}%), {b.train_s}s of training. "
        f"Cells whose intervals overlap are not clearly different on this validation set.</p>",
        "<p>max_valid_acc is the best epoch's validation accuracy, as the study reports it (it flatters, "
        "being chosen on the same images); last_acc is the final epoch's. paper_* are the study's "
        "figures (Tesla K80, 30 epochs, its own data); diff_acc = ours - the study's. cache_features K: "
        "a frozen run that computed the body's outputs once for K augmented views (--cache-features). "
        "freeze_bn: a frozen run whose body ran in eval mode, BatchNorm on its pretrained statistics "
        "(--freeze-bn; False: the study's train mode). "
        "leaked_valid: validation photos with a near-duplicate in train (they inflate the accuracy); "
        "conflicts: photos found under two labels (replicate audit TASK shows them; blank: not audited). "
        "int8_acc: validation accuracy of model.int8.onnx, beside int8_fp32_acc, model.onnx's on the same photos "
        "(--quantize int8; blank: not quantized). Two-class tasks: threshold, the lowest p of the filter's class "
        "that keeps precision on valid at target_precision, with the filter_precision and filter_recall it "
        "gives (--target-precision; predict applies it).</p>",
        f"<table><tr>{head}</tr>{body}</table>",
    ]
    if failures:
        parts.append(
            "<h2>Failed cells</h2><ul>"
            + "".join(
                f"<li><b>{html.escape(f['cell'])}</b>: {html.escape(f['error'])}</li>"
                for f in failures
            )
            + "</ul>"
        )
    parts.append(
        "<h2>Figures</h2>" + "".join(f'<img alt="{p.stem}" src="{_embed(p)}">' for p in figures)
    )
    parts.append("<h2>Cells</h2>")
    for run in runs.sort_values(["recipe", "mode", "arch", "seed"]).itertuples():
        rel = lambda f: html.escape(os.path.relpath(run.run_dir / f, path.parent))  # noqa: E731, B023
        parts.append(
            f"<h3>{html.escape(run.run_dir.name)}: {100 * run.best_acc:.2f}% at epoch {run.best_epoch}</h3>"
            f'<img alt="confusion matrix" src="{rel("confusion_matrix.png")}">'
            + (
                f'<img alt="precision-recall" src="{rel("pr_curve.png")}">'
                if (run.run_dir / "pr_curve.png").is_file()
                else ""
            )
            + f'<img alt="top losses" class=wide src="{rel("top_losses.png")}">'
        )
    style = (
        "body{font-family:sans-serif;margin:2em;max-width:1400px}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:3px 7px;text-align:right}tr.best{background:#ffe9a8;"
        "font-weight:bold}img{max-height:420px;margin:4px;vertical-align:top}img.wide{max-height:520px}"
        ".lead{font-size:1.15em}"
    )
    path.write_text(
        f"<!doctype html><html><head><meta charset=utf-8><title>{html.escape(path.parent.parent.name)}"
        f"</title><style>{style}</style></head><body>{''.join(parts)}</body></html>"
    )


def build_compare_report(
    exports_dir: Path, task: str, recipe: str = "paper"
) -> tuple[Path, pd.DataFrame]:
    """Rebuild exports/TASK/compare[-RECIPE]/ from the run folders alone; returns (folder, table).

    The table holds every recipe found (so both recipes sit side by side); the figures, the
    recipe's own runs.
    """
    task_exports = Path(exports_dir) / task
    runs = load_runs(task_exports)
    if runs.empty or (runs.recipe == recipe).sum() == 0:
        raise ReplicateError(
            f"no finished {recipe} runs under {task_exports}: "
            f"run `replicate compare {task}` or `replicate run {task} --arch ...` first"
        )
    out = task_exports / ("compare" if recipe == "paper" else f"compare-{recipe}")
    out.mkdir(parents=True, exist_ok=True)
    table = summary_table(runs, task)
    table.to_csv(out / "table.csv", index=False)
    (out / "table.md").write_text(to_markdown(table))
    own = runs[runs.recipe == recipe]
    figures = []
    for mode in ("frozen", "unfrozen"):
        for what in ("loss", "accuracy"):
            if (own["mode"] == mode).any():
                figures.append(out / f"{what}_{mode}.png")
                plot_curves(
                    own[own["mode"] == mode],
                    what,
                    f"{task}: {what}, {mode} ({recipe} recipe)",
                    figures[-1],
                )
    figures.append(out / "tradeoff.png")
    plot_tradeoff(table, task, figures[-1])
    failures_path = out / "failures.json"
    failures = json.loads(failures_path.read_text()) if failures_path.is_file() else []
    failures = [
        f for f in failures if f["cell"] not in {p.name for p in runs.run_dir}
    ]  # since trained
    write_html(table, runs, figures, failures, out / "report.html")
    return out, table


# --- the label-cleaning review page -------------------------------------------------------------


def _thumbnail(path: str, size: int = 224) -> str:
    """The image as an embedded JPEG data URI, so the page needs no files beside it."""
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            im.thumbnail((size, size))
            buf = io.BytesIO()
            im.save(buf, "JPEG", quality=80)
        return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()
    except OSError:
        return ""


def write_review(preds: dict[str, pd.DataFrame], classes: list[str], k: int, path: Path) -> Path:
    """A page of the `k` highest-loss images per split, largest first, to mark keep / relabel / remove;
    it downloads the decisions as `path,action,new_label` for `replicate clean`."""
    worst = pd.concat([top_losses(p, k).assign(split=s) for s, p in preds.items()]).sort_values(
        "loss", ascending=False
    )
    cards = [
        {
            "path": row.path,
            "name": Path(row.path).name,
            "thumbnail": _thumbnail(row.path),
            "actual": row.actual,
            "predicted": row.predicted,
            "probability": row.probability,
            "loss": row.loss,
            "split": row.split,
        }
        for row in worst.itertuples()
    ]
    page = render_template("review.html", name=path.parent.name, cards=cards, classes=classes)
    path.write_text(page)
    return path


def decisions_name(task: str, number: int) -> str:
    """The name a labelling round's page downloads its decisions as (one per round: a browser would
    rename a second decisions.csv)."""
    return f"{task}-round-{number}.csv"


def write_label_page(
    batch: pd.DataFrame,
    session,
    number: int,
    counts: dict[str, int],
    accuracy: str,
    pool: int,
    left: int,
    like: bool,
    path: Path,
) -> Path:
    """A labelling round's page (`replicate label`): the batch's photos, the model's guess preselected
    when there is one, keys and buttons as on the review page; it downloads `path,action,new_label`
    (label or skip) for `replicate label TASK --apply`. `session`: the label.Session."""
    cards = [
        {
            "path": row.path,
            "name": Path(row.path).relative_to(session.pool).as_posix(),
            "thumbnail": _thumbnail(row.path),
            "guess": row.guess,
            "probability": row.probability,
        }
        for row in batch.itertuples()
    ]
    page = render_template(
        "label.html",
        task=session.task,
        number=number,
        cards=cards,
        classes=list(session.classes),
        counts=counts,
        labelled=sum(counts.values()),
        accuracy=accuracy,
        pool=pool,
        left=left,
        positive=session.positive,
        like=like,
        guessed=bool(len(batch) and batch.guess.iloc[0]),
        download=decisions_name(session.task, number),
    )
    path.write_text(page)
    return path


# --- the audit page -----------------------------------------------------------------------------


def render_template(template: str, **values) -> str:
    """A page from replicate/templates/ (Jinja2, autoescaped)."""
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.PackageLoader("replicate", "templates"),
        autoescape=jinja2.select_autoescape(["html"]),
    )
    return env.get_template(template).render(**values)


def write_audit(
    result, suggestions: pd.DataFrame, classes: list[str], task_dir: Path, summary: str, out: Path
) -> dict[str, Path]:
    """An audit's outputs in `out` (exports/TASK/audit/): audit.csv (the findings), pairs.csv (every
    candidate pair, confirmed or not), decisions.csv (the suggested decisions, for `replicate clean`)
    and audit.html (to look and decide). {name: path}."""
    out.mkdir(parents=True, exist_ok=True)
    written = {
        name: out / name for name in ("audit.csv", "pairs.csv", "decisions.csv", "audit.html")
    }
    result.findings.to_csv(written["audit.csv"], index=False)
    result.pair_table().to_csv(written["pairs.csv"], index=False)
    suggestions.to_csv(written["decisions.csv"], index=False)
    write_audit_page(result, suggestions, classes, task_dir, summary, written["audit.html"])
    return written


def write_audit_page(
    result, suggestions: pd.DataFrame, classes: list[str], task_dir: Path, summary: str, path: Path
) -> Path:
    """audit.html: each near-duplicate group side by side (then the quality findings), thumbnails
    embedded, the suggested decision preselected; it downloads decisions.csv for `replicate clean`."""
    action = dict(zip(suggestions.path, suggestions.action))
    photos = result.photos.set_index("rel")

    def card(rel: str) -> dict:
        p = photos.loc[rel]
        full = str((task_dir / rel).resolve())
        return {
            "path": full,
            "rel": rel,
            "label": p.label,
            "split": p.split,
            "other_split": "valid" if p.split == "train" else "train",
            "action": action.get(full, "keep"),
            "thumbnail": _thumbnail(p.path),
        }

    groups = []
    findings = result.findings
    near = findings[findings.group != ""]
    for number, g in near.groupby("group", sort=True):
        first = g.iloc[0]
        files = first.files.split(";")
        same = (
            "byte-identical"
            if first.identical
            else "the same picture, encoded differently"
            if first.distance == 0
            else f"near-identical (up to {first.distance} bits apart)"
        )
        groups.append(
            {
                "flags": list(g.finding),
                "title": f"group {number}: {len(files)} copies, {same}",
                "cards": [card(rel) for rel in files],
            }
        )
    for f in findings[findings.group == ""].itertuples():
        if f.finding != "unreadable":
            groups.append(
                {
                    "flags": ["quality"],
                    "title": f"{f.finding}: {f.detail}",
                    "cards": [card(f.files)],
                }
            )
    keys = "relabel: " + ", ".join(f"{i} {c}" for i, c in enumerate(classes, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        render_template(
            "audit.html",
            task=task_dir.name,
            summary=summary,
            threshold=result.threshold,
            groups=groups,
            classes=classes,
            relabel_keys=keys,
        )
    )
    return path
