"""Labelling a pool of photos in short rounds: pretrained features once, a head in seconds, the
next batch where a label helps most, labelled in the browser and copied into a task folder.

    replicate label fireplace --pool ~/photos/unlabelled           # round 1: a page of 20 photos
    replicate label fireplace --apply ~/Downloads/fireplace-round-1.csv   # copy them in; round 2's page
    replicate label fireplace --undo data/fireplace/_labelling/20261201-101500.csv

The engine (the features, the head, which photos come next) is `active`. This is the session
(`Session`, `next_round`, `plan_labels`): the pool is never changed. What is labelled is what the
task folder holds (`data/TASK/{train,valid}/<class>/`, whatever put it there); which pool photos
were labelled or skipped is read from the logs of `--apply` in `data/TASK/_labelling/` (`clean`'s
log format: `--undo` takes a log back); a labelled photo copied from the pool is represented by
its pool photo's features, never computed twice. `--apply` puts about VALID_PCT of each class in
valid, near-duplicates of the pool (the audit's, transitively) always in one split. The round's
page, its batch and the caches are in `exports/TASK/label/`.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from . import audit, fingerprints, report
from .active import ARCH, fit_head, nearest, next_batch, pool_features, spread
from .clean import LOG_COLUMNS, Decision, Move, RowProblem, check_decisions, refusal
from .errors import ReplicateError
from .folders import SPLITS, class_dirs, image_files

BATCH = 20  # photos a round: a few minutes in the page
VALID_PCT = 0.2  # share of each class's labelled photos put in valid
DEFAULT_CLASSES = ("yes", "no")
LOG_DIR = (
    "_labelling"  # in the task folder: the --apply logs, the record of which pool photos are done
)


@dataclass(frozen=True)
class Session:
    """What `replicate label TASK` remembers between rounds (exports/TASK/label/session.json)."""

    task: str
    pool: str  # the folder of unlabelled photos, absolute
    classes: tuple[str, ...]
    positive: (
        str | None
    )  # the class a yes/no filter looks for: half of each batch is its likeliest photos
    batch: int = BATCH
    valid_pct: float = VALID_PCT
    arch: str = ARCH


def _class_names(text: str) -> tuple[str, ...]:
    names = tuple(c.strip() for c in text.split(",") if c.strip())
    bad = [c for c in names if c.startswith(("_", ".")) or "/" in c or "\\" in c]
    if len(set(names)) != len(names) or len(names) < 2 or bad:
        raise ReplicateError(
            f"--classes {text!r}: give two or more different class names, comma-separated, "
            f"none starting with _ or . or holding a slash (e.g. yes,no or bathroom,bedroom,kitchen)"
        )
    return names


def open_session(
    task_dir: Path,
    out: Path,
    pool: Path | None = None,
    classes: str | None = None,
    positive: str | None = None,
    batch: int | None = None,
) -> Session:
    """The task's labelling session, started or continued; what is given overrides what is remembered.
    Classes: --classes, else the remembered ones, else the task folder's, else yes/no."""
    stored = (
        json.loads((out / "session.json").read_text()) if (out / "session.json").is_file() else {}
    )
    if pool is None and not stored:
        raise ReplicateError(
            f"give --pool DIR, the folder of unlabelled photos, for the first round of {task_dir.name}"
        )
    pool = Path(pool).expanduser().resolve() if pool is not None else Path(stored["pool"])
    if not pool.is_dir():
        raise ReplicateError(
            f"the pool {pool} is not a folder: give --pool DIR, a folder of photos (any layout)"
        )
    task = task_dir.resolve()
    if pool == task or pool in task.parents or task in pool.parents:
        raise ReplicateError(
            f"the pool {pool} and the task folder {task} overlap: the labelled copies would "
            f"join the pool; keep the unlabelled photos in a folder of their own"
        )
    existing = set().union(*(class_dirs(task_dir / s) for s in SPLITS if (task_dir / s).is_dir()))
    names = (
        _class_names(classes)
        if classes
        else tuple(stored.get("classes", ())) or tuple(sorted(existing)) or DEFAULT_CLASSES
    )
    if len(names) < 2:
        raise ReplicateError(
            f"{task_dir} has the one class {names[0]}: give --classes with all of them"
        )
    if existing - set(names):
        raise ReplicateError(
            f"{task_dir} holds the class(es) {', '.join(sorted(existing - set(names)))} that "
            f"--classes {','.join(names)} lacks: name every class the task has"
        )
    if positive is None and tuple(stored.get("classes", ())) == names:
        positive = stored.get("positive")
    elif positive is None and len(names) == 2 and "yes" in names:
        positive = "yes"
    if positive is not None and positive not in names:
        raise ReplicateError(f"--positive {positive} is not one of the classes {', '.join(names)}")
    session = Session(
        task_dir.name,
        str(pool),
        names,
        positive,
        batch or stored.get("batch", BATCH),
        stored.get("valid_pct", VALID_PCT),
        stored.get("arch", ARCH),
    )
    out.mkdir(parents=True, exist_ok=True)
    (out / "session.json").write_text(json.dumps(asdict(session), indent=2) + "\n")
    return session


@dataclass(frozen=True)
class Pool:
    """The pool's readable photos with their fingerprints (the audit's), and the unreadable files."""

    files: list[Path]
    prints: pd.DataFrame  # one row per file of `files`
    unreadable: pd.DataFrame  # path, error


def pool_photos(session: Session, out: Path, log=None) -> Pool:
    """The pool's photos, fingerprinted (cached in `out`). The pool is read, never written."""
    files = image_files(Path(session.pool))
    if not files:
        raise ReplicateError(f"no photos (.jpg, .png, ...) in the pool {session.pool}")
    prints = fingerprints.fingerprints(files, cache=out / "fingerprints.csv", log=log)
    readable = (prints.error == "").to_numpy()
    return Pool(
        [f for f, ok in zip(files, readable) if ok],
        prints[readable].reset_index(drop=True),
        prints.loc[~readable, ["path", "error"]],
    )


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


@dataclass(frozen=True)
class Round:
    """A round's batch and where the labelling stands."""

    number: int
    batch: pd.DataFrame  # path, guess, probability (guess '' before two classes are labelled)
    counts: dict[str, int]  # labelled photos per class
    correct: int  # the head trained on the train labels, on the valid labels
    validated: int
    pool: int
    left: int  # pool photos neither labelled nor skipped
    page: Path


def next_round(
    session: Session,
    pool: Pool,
    task_dir: Path,
    out: Path,
    like: list[Path] = (),
    seed: int = 0,
    log=None,
) -> Round:
    """Train the head on the labels so far, pick the next batch, write its page; the Round.

    A labelled photo copied from the pool is its pool row (its features are not computed twice);
    photos put in the task otherwise, and the `like` examples, get rows after the pool's."""
    like = [Path(p) for p in like]
    missing = [str(p) for p in like if not Path(p).is_file()]
    if missing:
        raise ReplicateError(f"--like: no such photo {', '.join(missing)}")
    labelled, copies = task_photos(task_dir), applied(task_dir)
    row_of = {str(f): i for i, f in enumerate(pool.files)}
    source_of = dict(zip(copies.destination, copies.source))
    rows = np.array([row_of.get(source_of.get(p), -1) for p in labelled.path], dtype=int)
    others = [Path(p) for p, r in zip(labelled.path, rows) if r < 0]
    n = len(pool.files) + len(others)
    rows[rows < 0] = np.arange(len(pool.files), n)
    if log:
        log(
            f"features of {len(pool.files)} pool photos, {len(others)} other labelled ones and {len(like)} "
            f"examples ({session.arch}, cached)"
        )
    x = pool_features(pool.files + others + like, out / "features.npz", session.arch)
    finished = set(copies.source)
    candidates = np.array(
        [i for i, f in enumerate(pool.files) if str(f) not in finished], dtype=int
    )
    labels = pd.Series(labelled.label.to_numpy(), index=rows, dtype=object)
    k = min(session.batch, len(candidates))
    head = fit_head(x[rows], labels.tolist()) if labels.nunique() >= 2 else None
    like_used = bool(like) and head is None
    if like_used:  # half nearest the examples, half spread over the rest
        picks = nearest(x, candidates, x[n:], (k + 1) // 2, rows)
        rest = candidates[~np.isin(candidates, picks)]
        batch_rows = picks + spread(
            x, rest, k - len(picks), np.concatenate([rows, picks]).astype(int), seed
        )
    else:
        batch_rows = (
            next_batch(x[:n], labels, k, session.positive, seed, candidates, head) if k else []
        )
    batch = pd.DataFrame(
        {"path": [str(pool.files[r]) for r in batch_rows], "guess": "", "probability": np.nan}
    )
    if head is not None and batch_rows:
        p = head.predict_proba(x[batch_rows])
        batch["guess"], batch["probability"] = head.classes_[p.argmax(axis=1)], p.max(axis=1)
    correct, validated = _validate(x, labels, labelled.split.to_numpy())
    number = len(logs(task_dir)) + 1
    counts = {c: int((labelled.label == c).sum()) for c in session.classes}
    batch.to_csv(out / f"round-{number}.csv", index=False)
    page = out / f"round-{number}.html"
    report.write_label_page(
        batch,
        session,
        number,
        counts,
        accuracy_text(correct, validated),
        len(pool.files),
        len(candidates),
        like_used,
        page,
    )
    return Round(number, batch, counts, correct, validated, len(pool.files), len(candidates), page)


def accuracy_text(correct: int, validated: int) -> str:
    """The current head's validation accuracy as the page and the terminal say it."""
    if not validated:
        return "not yet (needs two classes in train and a photo in valid)"
    return f"{correct / validated:.1%} ({correct} of {validated} valid photos)"


def _validate(x: np.ndarray, labels: pd.Series, splits: np.ndarray) -> tuple[int, int]:
    """(correct, photos) of a head trained on the train split's labels, on the valid split's; (0, 0)
    until train holds two classes and valid a photo."""
    train, valid = labels[splits == "train"], labels[splits == "valid"]
    if train.nunique() < 2 or not len(valid):
        return 0, 0
    predicted = fit_head(x[train.index], train.tolist()).predict(x[valid.index])
    return int((predicted == valid.to_numpy()).sum()), len(valid)


def valid_target(n: int, valid_pct: float) -> int:
    """How many of a class's `n` labelled photos belong in valid: about `valid_pct`, at least one
    from two on (so `run` finds every class in both splits)."""
    return max(1, round(n * valid_pct)) if n >= 2 else 0


def plan_labels(
    session: Session, pool: Pool, task_dir: Path, decisions: pd.DataFrame
) -> list[Move]:
    """The copies (and skips) a label page's decisions ask for; ReplicateError listing every problem
    before anything is copied. Each labelled photo goes to train or valid: valid while its class
    has fewer than `valid_target` there, except that near-duplicates of the pool follow the split
    their group went to first."""
    files = pool.files
    index = {str(f): i for i, f in enumerate(files)}
    copies = applied(task_dir)
    chosen = _chosen(session, index, set(copies.source), decisions)
    groups = audit.link_owners(list(range(len(files))), files, frame=pool.prints)
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
    session: Session, index: dict[str, int], finished: set[str], decisions: pd.DataFrame
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
