"""`replicate label --apply`: a round's decisions -> the copies into the task folder (train or
valid), and the record of what earlier rounds copied or skipped (their logs).

    replicate label fireplace --apply ~/Downloads/fireplace-round-1.csv

Each labelled pool photo is copied, never moved: the pool is never changed. About `valid_pct` of
each class goes to valid, near-duplicates of the pool (the audit's, transitively) always in one
split. The logs are `clean`'s format in `data/TASK/_labelling/`, so `--undo` takes one back.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pandas as pd

from ..audit import checks
from ..audit.cleaning import (
    LOG_COLUMNS,
    Decision,
    Move,
    RowProblem,
    check_decisions,
    read_decisions,
    refusal,
)
from ..errors import ReplicateError
from ..folders import SPLITS, class_dirs, image_files


def task_photos(task_dir: Path) -> pd.DataFrame:
    """The labelled photos: path (absolute, as --apply logs it), split, label of every image in
    TASK/{train,valid}/<class>/."""
    task_dir = task_dir.resolve()
    rows = [
        (str(f), split, label)
        for split in SPLITS
        if (task_dir / split).is_dir()
        for label in sorted(class_dirs(task_dir / split))
        for f in image_files(task_dir / split / label)
    ]
    return pd.DataFrame(rows, columns=["path", "split", "label"])


# in the task folder: the --apply logs, the record of which pool photos are done
LOG_DIR = "_labelling"


def logs(task_dir: Path) -> list[Path]:
    """The --apply logs in force (not undone), oldest first: one per round applied."""
    return [
        p for p in sorted((task_dir / LOG_DIR).glob("*.csv")) if not p.name.endswith(".undone.csv")
    ]


def applied(task_dir: Path) -> pd.DataFrame:
    """The rows of the logs in force (clean.LOG_COLUMNS, and `split`: where a copy went, '' for a
    skip), one per pool photo labelled or skipped."""
    frames = [pd.read_csv(log, dtype=str, keep_default_na=False) for log in logs(task_dir)]
    rows = (
        pd.concat(frames, ignore_index=True)
        if frames
        else pd.DataFrame(columns=LOG_COLUMNS, dtype=str)
    )
    return rows.assign(split=[Path(d).parent.parent.name if d else "" for d in rows.destination])


def valid_target(n: int, valid_pct: float) -> int:
    """How many of a class's `n` labelled photos belong in valid: about `valid_pct`, at least one
    from two on (so `run` finds every class in both splits)."""
    return max(1, round(n * valid_pct)) if n >= 2 else 0


def read_label_decisions(path: Path) -> tuple[pd.DataFrame, int]:
    """A round's decisions as `plan_labels` takes them (path, action, new_label), and how many rows
    were left undecided. Either the page's download (path,action,new_label) or the round's own CSV
    filled in by hand (round-N.csv: a class or `skip` in its `label` column; a row left empty is
    not decided yet, and comes back in a later round)."""
    try:
        header = set(pd.read_csv(path, dtype=str, nrows=0).columns)
    except (OSError, ValueError, pd.errors.EmptyDataError) as e:
        raise ReplicateError(f"cannot read decisions file {path}: {e}") from None
    if "action" in header or "label" not in header:
        return read_decisions(path), 0
    if "path" not in header:
        raise ReplicateError(
            f"{path} lacks the column path: expected the round's CSV (path,label,...)"
        )
    rows = pd.read_csv(path, dtype=str, keep_default_na=False)
    label = rows.label.str.strip()
    decided = rows[label != ""]
    skip = label[label != ""].str.lower() == "skip"
    decisions = pd.DataFrame({
        "path": decided.path,
        "action": skip.map({True: "skip", False: "label"}),
        "new_label": label[label != ""].where(~skip, ""),
    })  # fmt: skip
    return decisions.reset_index(drop=True), int((label == "").sum())


def plan_labels(session, pool, task_dir: Path, decisions: pd.DataFrame) -> list[Move]:
    """The copies (and skips) a label page's decisions ask for (`session`: the label.Session;
    `pool`: its label.Pool); ReplicateError listing every problem
    before anything is copied. Each labelled photo goes to train or valid: valid while its class
    has fewer than `valid_target` there, except that near-duplicates of the pool follow the split
    their group went to first."""
    files = pool.files
    index = {str(f): i for i, f in enumerate(files)}
    # a path as the page shows it (relative to the pool) names the pool's photo
    decisions = decisions.assign(
        path=[str(Path(session.pool) / p) if not Path(p).expanduser().is_absolute() else p
              for p in decisions.path]
    )  # fmt: skip
    copies = applied(task_dir)
    chosen = _chosen(session, index, set(copies.source), decisions)
    groups = checks.link_owners(list(range(len(files))), files, frame=pool.prints)
    placed = {
        groups[index[s]]: split
        for s, split in zip(copies.source, copies.split)
        if split and s in index
    }
    counts = Counter(task_photos(task_dir)[["split", "label"]].itertuples(index=False, name=None))
    moves, names, problems = [], set(), []
    for row, label in chosen:
        if label is None:
            moves.append(Move("skip", files[row], None))
            continue
        group = groups[row]
        if group not in placed:
            total = counts["train", label] + counts["valid", label] + 1
            placed[group] = (
                "valid"
                if counts["valid", label] < valid_target(total, session.valid_pct)
                else "train"
            )
        split = placed[group]
        counts[split, label] += 1
        # The pool's sub-folders become part of the name: photos of two listings may share a name.
        destination = (
            task_dir.resolve()
            / split
            / label
            / "__".join(files[row].relative_to(session.pool).parts)
        )
        if destination.exists() or destination in names:
            problems.append(f"{files[row]}: {destination} exists already (name clash)")
        names.add(destination)
        moves.append(Move("copy", files[row], destination, label))
    if problems:
        raise refusal(problems, "copied", shown=5)
    return moves


def _chosen(
    session, index: dict[str, int], finished: set[str], decisions: pd.DataFrame
) -> list[tuple[int, str | None]]:
    """(pool row, class; None for a skip) per row of a label page's decisions; ReplicateError
    listing every row that is not a pool photo (`index`: {path: row}) yet to label (`finished`
    holds those labelled or skipped already) with a known action and class."""

    def place(source: Path) -> int:
        if str(source) not in index:
            raise RowProblem(f"not a readable photo of the pool {session.pool}")
        if str(source) in finished:
            raise RowProblem("labelled or skipped already (decisions applied twice?)")
        return index[str(source)]

    def decide(row: Decision, placed: int) -> tuple[int, str | None]:
        if row.action == "skip":
            return placed, None
        if row.new_label not in session.classes:
            raise RowProblem(
                f"unknown class {row.new_label!r} (classes: {', '.join(session.classes)})"
            )
        return placed, row.new_label

    hint = "a label page writes label or skip"
    chosen, problems = check_decisions(decisions, ("label", "skip"), hint, place, decide)
    if problems:
        raise refusal(problems, "copied", shown=5)
    return chosen


def describe(moves: list[Move]) -> pd.DataFrame:
    """Copied photos per split and class, and the skipped ones: the table --apply prints."""
    rows = [
        (
            "skipped" if m.destination is None else m.destination.parent.parent.name,
            m.new_label or "-",
        )
        for m in moves
    ]
    table = (
        pd.DataFrame(rows, columns=["split", "class"]).value_counts().rename("photos").reset_index()
    )
    return table.sort_values(["split", "class"]).reset_index(drop=True)
