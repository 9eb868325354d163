"""Every HTML page replicate writes, each rendered from a Jinja2 template in replicate/templates/:
the compare report, the review page, a labelling round's page and the audit page. Each opens
from disk, its pictures embedded (or, for the compare report, beside it in the run folders).

    replicate report rooms        # exports/rooms/compare/report.html, through write_compare
"""

from __future__ import annotations

import base64
import io
import os
from pathlib import Path

import pandas as pd
from PIL import Image

# The compare table's columns a reader compares first; the others show behind a toggle, so the
# table fits a 1400 px window.
FIRST_COLUMNS = (
    "arch",
    "mode",
    "recipe",
    "seeds",
    "max_valid_acc",
    "ci95_low",
    "ci95_high",
    "last_acc",
    "train_s",
    "paper_acc",
    "diff_acc",
    "threshold",
    "filter_recall",
)


def embed(path: Path) -> str:
    """A PNG file as a data URI, so the page carries it."""
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode()


def thumbnail(path: str, size: int = 224) -> str:
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


def write_review(worst: pd.DataFrame, classes: list[str], path: Path) -> Path:
    """A page of the highest-loss images (`worst`: plots.top_losses of each split, with a `split`
    column), to mark keep / relabel / remove; it downloads the decisions as `path,action,new_label`
    for `replicate clean`."""
    cards = [
        {
            "path": row.path,
            "name": Path(row.path).name,
            "thumbnail": thumbnail(row.path),
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


def write_label_page(found, session, accuracy: str, like: bool) -> Path:
    """A labelling round's page (`replicate label`) at `found.page`: the batch's photos, the model's
    guess preselected when there is one, keys and buttons as on the review page; it downloads
    `path,action,new_label` (label or skip) for `replicate label TASK --apply`. `found`: the
    label.Round (batch, number, counts, pool, labelled, skipped, left); `session`: the
    label.Session; `accuracy`: the head's estimate, in words (`active.estimate_text`); `like`: whether the batch holds photos near examples."""
    batch, number, counts = found.batch, found.number, found.counts
    cards = [
        {
            "path": row.path,
            "name": Path(row.path).relative_to(session.pool).as_posix(),
            "thumbnail": thumbnail(row.path),
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
        pool=found.pool,
        pool_labelled=found.labelled,
        skipped=found.skipped,
        left=found.left,
        positive=session.positive,
        like=like,
        guessed=bool(len(batch) and batch.guess.iloc[0]),
        download=decisions_name(session.task, number),
    )
    found.page.write_text(page)
    return found.page


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
            "thumbnail": thumbnail(p.path),
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


def write_compare(
    table: pd.DataFrame, runs: pd.DataFrame, figures: list[Path], failures: list[dict], path: Path
) -> Path:
    """report.html: the compare table (the best cell highlighted, the columns a reader compares
    first shown and the rest behind a toggle), the figures embedded, and each cell's confusion
    matrix, precision-recall curve and top losses from its run folder (linked, not copied)."""
    best = table.sort_values(["max_valid_acc", "train_s"], ascending=[False, True]).index[0]
    first = [c for c in FIRST_COLUMNS if c in table.columns]
    columns = [{"name": c, "more": c not in first} for c in first] + [
        {"name": c, "more": True} for c in table.columns if c not in first
    ]
    rows = [
        {
            "best": i == best,
            "cells": ["" if pd.isna(row[c["name"]]) else str(row[c["name"]]) for c in columns],
        }
        for i, row in table.iterrows()
    ]

    plots = [("confusion matrix", "confusion_matrix.png"), ("precision-recall", "pr_curve.png"),
             ("top losses", "top_losses.png")]  # fmt: skip
    cells = [
        {
            "name": run.run_dir.name,
            "accuracy": f"{100 * run.best_acc:.2f}",
            "epoch": run.best_epoch,
            "images": [
                (alt, os.path.relpath(run.run_dir / name, path.parent))
                for alt, name in plots
                if (run.run_dir / name).is_file()
            ],
        }
        for run in runs.sort_values(["recipe", "mode", "arch", "seed"]).itertuples()
    ]
    page = render_template(
        "compare.html",
        task=path.parent.parent.name,
        best=table.loc[best].to_dict(),
        columns=columns,
        rows=rows,
        failures=failures,
        figures=[(p.stem, embed(p)) for p in figures],
        cells=cells,
    )
    path.write_text(page)
    return path
