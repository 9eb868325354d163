"""Run folders -> the compare report: the study's tables and figures, rebuilt from the run folders
alone (never by retraining), so a report can be made again at any time.

    python -m replicate.report.compare_report exports rooms      # exports/rooms/compare/: table, figures, page

`build_compare_report` writes exports/TASK/compare/ (compare-RECIPE/ for another recipe):
table.csv and table.md (one row per cell: means over seeds, 95% CI, the study's numbers beside),
the loss and accuracy curves per mode, the accuracy-vs-time figure, and report.html
(pages.write_compare).
"""

from __future__ import annotations

import json
import sys
from functools import cache
from pathlib import Path

import numpy as np
import pandas as pd

from ..engine import filters
from ..errors import ReplicateError
from ..runs import Run, compare_dir, finished_runs, is_run
from . import pages, plots

FAILURES = "failures.json"  # a compare's failed cells, in its report folder


def _arch_order(arch: str) -> int:
    """The study's table order for its five (the order of paper_results.csv, which is also the
    registry's: read here without importing PyTorch); any other arch after them."""
    study = _study_archs()
    return study.index(arch) if arch in study else len(study)


@cache
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
    """One row per finished run folder under exports/TASK."""
    rows = []
    for run in finished_runs(task_exports):
        config, metrics = run.config, run.metrics
        rows.append(
            {
                "arch": config["arch"],
                "mode": run.mode,
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
                "run_dir": run.path,
                "filter": filters.read(run.path),
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
    plt = plots.pyplot()
    # timm names: alphabetical, after the five
    archs = sorted(set(runs.arch), key=lambda a: (_arch_order(a), a))
    cols = min(3, len(archs))
    rows = -(-len(archs) // cols)
    fig, axes = plt.subplots(
        rows, cols, figsize=(4.2 * cols, 3.2 * rows), sharex=True, sharey=True, squeeze=False
    )
    for ax in axes.flat[len(archs) :]:
        ax.axis("off")
    for ax, arch in zip(axes.flat, archs):
        run = runs[runs.arch == arch].sort_values("seed").iloc[0]
        history = Run(run.run_dir).history()
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
    plt = plots.pyplot()
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
    out = compare_dir(exports_dir, task, recipe)
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
                title = f"{task}: {what}, {mode} ({recipe} recipe)"
                plot_curves(own[own["mode"] == mode], what, title, figures[-1])
    figures.append(out / "tradeoff.png")
    plot_tradeoff(table, task, figures[-1])
    failures = json.loads((out / FAILURES).read_text()) if (out / FAILURES).is_file() else []
    trained_since = {p.name for p in runs.run_dir}
    failures = [f for f in failures if f["cell"] not in trained_since]
    pages.write_compare(table, runs, figures, failures, out / "report.html")
    return out, table


def record_failures(exports_dir: Path, task: str, recipe: str, failures: list[dict]) -> Path:
    """Write a compare's failed cells ({cell, error}) for the report to show; returns the file."""
    path = compare_dir(exports_dir, task, recipe) / FAILURES
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(failures, indent=2))
    return path


def tasks_with_runs(exports_dir: Path) -> list[str]:
    """The task folders under `exports_dir` holding a finished run; a ReplicateError if none does."""
    names = (
        sorted(d.name for d in Path(exports_dir).iterdir() if d.is_dir())
        if Path(exports_dir).is_dir()
        else []
    )
    found = [n for n in names if finished_runs(Path(exports_dir) / n)]
    if not found:
        raise ReplicateError(f"no finished runs under {exports_dir}")
    return found


def rebuild(
    exports_dir: Path, task: str, recipe: str = "paper", log=print
) -> tuple[Path, pd.DataFrame]:
    """`build_compare_report`, and its table (the columns the page shows first) and where the rest
    is said in the log; returns (folder, table)."""
    out, table = build_compare_report(exports_dir, task, recipe)
    first = [c for c in pages.FIRST_COLUMNS if c in table.columns]  # the page's first columns
    shown = table[first].drop(columns=["recipe"] if table.recipe.nunique() == 1 else [])
    log(f"\n{task}:\n{shown.to_string(index=False, na_rep='-')}")
    log(f"every column: {out / 'table.csv'}; report: {out / 'report.html'}")
    return out, table


def command(task: str, recipe: str, exports_dir: Path, log=print) -> None:
    """`replicate report`: a run folder's plots redrawn, or a task's compare report rebuilt (every
    task's for 'all')."""
    if is_run(Path(task)):
        for path in plots.render_run(Path(task)):
            log(path)
        return
    for name in tasks_with_runs(exports_dir) if task == "all" else [task]:
        rebuild(exports_dir, name, recipe, log)


if __name__ == "__main__":
    print(rebuild(Path(sys.argv[1]), sys.argv[2])[0])
