"""Label decisions -> file moves in a task folder, logged and undoable. Nothing is ever deleted.

    replicate clean rooms --decisions decisions.csv            # show what would happen
    replicate clean rooms --decisions decisions.csv --apply    # do it, and log it
    replicate clean rooms --undo data/rooms/_cleaning/20261127-101500.csv

A decisions file has the columns `path,action,new_label` (the review and audit pages write it,
`replicate audit` suggests one; a hand-edited CSV works too; other columns are ignored).
relabel moves a photo to another class folder of the same split; move puts it in the same class
of the other split (a leaked copy, say); remove moves it to `TASK/_removed/<split>/<class>/`.
The whole batch is checked before the first file moves, so a bad row changes nothing.

`replicate label` logs its copies from a pool into a task (action `copy`) and the photos it was told
to leave out (`skip`, nothing done) in the same format, under `TASK/_labelling/`; `undo` takes
either log.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from ..errors import ReplicateError
from ..folders import SPLITS, class_dirs, sha256_file

ACTIONS = ("keep", "relabel", "remove", "move")
LOG_COLUMNS = ["action", "source", "destination", "new_label", "sha256"]


@dataclass(frozen=True)
class Move:
    action: str  # one of ACTIONS but keep, or copy / skip (replicate label's)
    source: Path
    destination: Path | None  # None: skip, nothing moves
    new_label: str = ""


def read_decisions(path: Path) -> pd.DataFrame:
    """The decisions CSV, checked for its columns."""
    try:
        decisions = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (OSError, ValueError, pd.errors.EmptyDataError) as e:
        raise ReplicateError(f"cannot read decisions file {path}: {e}") from None
    missing = {"path", "action"} - set(decisions.columns)
    if missing:
        raise ReplicateError(
            f"{path} lacks the column(s) {', '.join(sorted(missing))}: expected path,action,new_label"
        )
    if "new_label" not in decisions:
        decisions["new_label"] = ""
    return decisions


class RowProblem(Exception):
    """Why a decisions row is refused, raised by a caller's rule in `check_decisions`."""


@dataclass(frozen=True)
class Decision:
    """A row of a decisions file, read: `action` in lower case, `source` resolved."""

    where: str  # "line N (path)": how its problems begin
    action: str
    new_label: str
    source: Path


def check_decisions(
    decisions: pd.DataFrame, actions: tuple[str, ...], hint: str, place, decide
) -> tuple[list, list[str]]:
    """(what `decide` made of each row that passed, None left out; every problem, "line N (path):
    why"). Each row in turn: its action one of `actions` (else refused, with `hint`);
    `place(source)` says where the photo is, or raises RowProblem; a photo named twice is refused,
    then one that is not a file; `decide(row, place's answer)` makes it a move, or raises.

    Shared by `plan` (a task's decisions) and `label.plan_labels` (a label page's): every row is
    checked, so one error can list all that is wrong before anything moves."""
    made, problems, seen = [], [], set()
    for line, row in enumerate(decisions.itertuples(index=False), start=2):  # line 1 is the header
        source = Path(row.path).expanduser().resolve()
        read = Decision(
            f"line {line} ({row.path})", row.action.strip().lower(), row.new_label.strip(), source
        )
        try:
            if read.action not in actions:
                raise RowProblem(f"unknown action {row.action!r} ({hint})")
            placed = place(source)
            if source in seen:
                raise RowProblem("the same photo appears twice")
            seen.add(source)
            if not source.is_file():
                raise RowProblem("no such file (moved or cleaned already?)")
            result = decide(read, placed)
        except RowProblem as e:
            problems.append(f"{read.where}: {e}")
            continue
        if result is not None:
            made.append(result)
    return made, problems


def refusal(problems: list[str], undone: str, shown: int | None = None) -> ReplicateError:
    """One error for all the `problems` (the first `shown` of them, then how many more): nothing
    was `undone` ("moved", "copied")."""
    more = f"; and {len(problems) - shown} more" if shown and len(problems) > shown else ""
    return ReplicateError(
        f"nothing was {undone}; {len(problems)} problem(s): " + "; ".join(problems[:shown]) + more
    )


def plan(task_dir: Path, decisions: pd.DataFrame) -> list[Move]:
    """The moves the decisions ask for; ReplicateError listing every problem, before anything moves."""
    task_dir = task_dir.resolve()
    classes = class_dirs(task_dir / "train") if (task_dir / "train").is_dir() else set()

    def place(source: Path) -> tuple[str, str, str]:
        try:
            split, label, name = source.relative_to(task_dir).parts
        except ValueError:
            raise RowProblem(f"not a photo in {task_dir}/{{train,valid}}/<class>/") from None
        if split not in SPLITS:
            raise RowProblem(f"not in the train or valid split of {task_dir}")
        return split, label, name

    def decide(row: Decision, placed: tuple[str, str, str]) -> Move | None:
        split, label, name = placed
        if row.action == "keep":
            return None
        if row.action == "relabel":
            if row.new_label not in classes:
                raise RowProblem(
                    f"unknown class {row.new_label!r} (classes: {', '.join(sorted(classes))})"
                )
            if row.new_label == label:
                raise RowProblem(f"already labelled {label!r}")
            destination = task_dir / split / row.new_label / name
        elif row.action == "move":
            destination = task_dir / ("valid" if split == "train" else "train") / label / name
        else:
            destination = task_dir / "_removed" / split / label / name
        return Move(row.action, row.source, destination, row.new_label)

    hint = f"use {', '.join(ACTIONS)}"
    moves, problems = check_decisions(decisions, ACTIONS, hint, place, decide)
    targets = [m.destination for m in moves]
    for m in moves:
        if m.destination.exists() or targets.count(m.destination) > 1:
            problems.append(
                f"{m.source}: {m.destination} exists already or is the target of another row (name clash)"
            )
    if problems:
        raise refusal(problems, "moved")
    return moves


def apply(task_dir: Path, moves: list[Move], log_dir: Path | None = None) -> Path:
    """Move (or copy) the files, logging each as it happens; returns the log (`log_dir`/<time>.csv,
    TASK/_cleaning/ by default)."""
    log_dir = log_dir or task_dir / "_cleaning"
    log_dir.mkdir(parents=True, exist_ok=True)
    log = log_dir / f"{time.strftime('%Y%m%d-%H%M%S')}.csv"
    n = 1
    while log.exists():
        log, n = log_dir / f"{time.strftime('%Y%m%d-%H%M%S')}-{n}.csv", n + 1
    rows = []
    try:
        for m in moves:
            digest = sha256_file(m.source)
            if m.destination is not None:
                m.destination.parent.mkdir(parents=True, exist_ok=True)
                (shutil.copy2 if m.action == "copy" else shutil.move)(m.source, m.destination)
            rows.append(
                [
                    m.action,
                    str(m.source),
                    "" if m.destination is None else str(m.destination),
                    m.new_label,
                    digest,
                ]
            )
    finally:  # written even when a move fails half-way, so --undo can put back what did move
        pd.DataFrame(rows, columns=LOG_COLUMNS).to_csv(log, index=False)
    return log


def undo(log: Path) -> int:
    """Put every file of a cleaning log back where it was; returns how many. Checks all first.

    A copy is taken out of the task: deleted when its original is still where it was copied from,
    byte for byte (nothing is lost), else moved back there."""
    try:
        rows = pd.read_csv(log, dtype=str, keep_default_na=False)
    except (OSError, ValueError) as e:
        raise ReplicateError(f"cannot read cleaning log {log}: {e}") from None
    if list(rows.columns) != LOG_COLUMNS:
        raise ReplicateError(f"{log} is not a cleaning log (columns {', '.join(LOG_COLUMNS)})")
    rows = rows[rows.action != "skip"]  # nothing was done to them
    problems, original = [], {}
    for row in rows.itertuples(index=False):
        source, destination = Path(row.source), Path(row.destination)
        if not destination.is_file():
            problems.append(f"{destination} is gone")
        elif sha256_file(destination) != row.sha256:
            problems.append(
                f"{destination} changed since it was {'copied' if row.action == 'copy' else 'moved'}"
            )
        elif row.action == "copy":
            original[destination] = source.is_file()
            if original[destination] and sha256_file(source) != row.sha256:
                problems.append(
                    f"{source} changed since it was copied: its copy {destination} is its only old version"
                )
        elif source.exists():
            problems.append(f"{source} exists again")
    if problems:
        raise ReplicateError(
            f"nothing was put back; {len(problems)} problem(s): " + "; ".join(problems)
        )
    for row in reversed(list(rows.itertuples(index=False))):
        source, destination = Path(row.source), Path(row.destination)
        if original.get(destination):
            destination.unlink()  # the same bytes are still at the source
        else:
            source.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(destination, source)
    # a second --undo of the same log is refused
    log.rename(log.with_name(log.stem + ".undone.csv"))
    return len(rows)


def describe(moves: list[Move], task_dir: Path) -> pd.DataFrame:
    """The moves as a table of paths relative to the task folder."""
    root = task_dir.resolve()
    return pd.DataFrame(
        [
            {
                "action": m.action,
                "from": m.source.relative_to(root).as_posix(),
                "to": m.destination.relative_to(root).as_posix(),
            }
            for m in moves
        ],
        columns=["action", "from", "to"],
    )


def run(task_dir: Path, decisions: Path | None, apply_them: bool, undo_log: Path | None, log=print):
    """`replicate clean`: put a log's files back (`undo_log`), or show the moves `decisions` asks
    for and, with `apply_them`, make them (logged)."""
    if undo_log is not None:
        log(f"put back {undo(undo_log)} file(s) from {undo_log}")
        return
    if decisions is None:
        raise ReplicateError("give --decisions FILE (or --undo LOG)")
    if not task_dir.is_dir():
        raise ReplicateError(f"task folder {task_dir} not found")
    moves = plan(task_dir, read_decisions(decisions))
    table = describe(moves, task_dir)
    log(table.to_string(index=False) if len(table) else "nothing to move (all keep)")
    if not apply_them:
        log(f"\n{len(moves)} move(s) planned; nothing changed. Add --apply to move the files.")
        return
    written = apply(task_dir, moves)
    log(f"\nmoved {len(moves)} file(s); log: {written}")
    log(f"undo with: replicate clean {task_dir.name} --undo {written}")
