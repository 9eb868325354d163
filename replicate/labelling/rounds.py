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
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from ..audit import cleaning as cleaning
from ..audit import fingerprints
from ..config import RunConfig
from ..errors import ReplicateError
from ..folders import SPLITS, class_dirs, image_files
from ..report import pages
from .active import (
    ARCH,
    estimate,
    estimate_text,
    fit_head,
    nearest,
    next_batch,
    pool_features,
    spread,
)
from .copies import LOG_DIR, applied, describe, logs, plan_labels, read_label_decisions, task_photos

BATCH = 20  # photos a round: a few minutes in the page
VALID_PCT = 0.2  # share of each class's labelled photos put in valid
DEFAULT_CLASSES = ("yes", "no")


@dataclass(frozen=True)
class Session:
    """What `replicate label TASK` remembers between rounds (exports/TASK/label/session.json)."""

    task: str
    pool: str  # the folder of unlabelled photos, absolute
    classes: tuple[str, ...]
    # the class a yes/no filter looks for: half of each batch is its likeliest photos
    positive: str | None
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
            f"no labelling session of {task_dir.name} in {out}: give --pool DIR, the folder of "
            "unlabelled photos, for its first round (or the --data-dir and --exports-dir it was "
            "started with)"
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


@dataclass(frozen=True)
class Round:
    """A round's batch and where the labelling stands."""

    number: int
    batch: pd.DataFrame  # path, guess, probability of the guess ('' and NaN before two classes)
    counts: dict[str, int]  # labelled photos per class, in the task folder
    estimate: dict | None  # the head's, cross-validated over every label (`active.estimate`)
    pool: int  # the pool's readable photos: labelled + skipped + left
    labelled: int  # pool photos labelled
    skipped: int
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
    p = head.predict_proba(x[batch_rows]) if head is not None and batch_rows else None
    if p is not None:
        batch["guess"], batch["probability"] = head.classes_[p.argmax(axis=1)], p.max(axis=1)
    number = len(logs(task_dir)) + 1
    counts = {c: int((labelled.label == c).sum()) for c in session.classes}
    _round_csv(batch, p, head, session).to_csv(out / f"round-{number}.csv", index=False)
    done = dict(zip(copies.source, copies.destination))
    in_pool = [done[str(f)] for f in pool.files if str(f) in done]  # a copy's place, '' a skip
    found = Round(
        number, batch, counts, estimate(x, labels, session.positive), len(pool.files),
        sum(d != "" for d in in_pool), sum(d == "" for d in in_pool), len(candidates),
        out / f"round-{number}.html",
    )  # fmt: skip
    pages.write_label_page(found, session, estimate_text(found.estimate), like_used)
    return found


def _round_csv(batch: pd.DataFrame, p: np.ndarray | None, head, session: Session) -> pd.DataFrame:
    """The round's CSV, to fill in by hand as the page is: a `label` column to fill (a class, or
    skip), the head's guess beside it, and a probability named for its class: p_<positive> for a
    filter's session, else p_guess (the guess's)."""
    table = pd.DataFrame({"path": batch.path, "label": "", "guess": batch.guess})
    if session.positive:
        k = list(head.classes_).index(session.positive) if p is not None else None
        table[f"p_{session.positive}"] = p[:, k] if k is not None else np.nan
    else:
        table["p_guess"] = batch.probability
    return table


# What `label` suggests once the labels are in: the head on frozen EfficientNet-Lite0 features, the
# body's outputs cached (seconds to a minute on a CPU for a few hundred photos).
TRAIN_LABELLED = "replicate run {task} --arch tf_efficientnet_lite0 --freeze-bn --cache-features 3"


@dataclass(frozen=True)
class Request:
    """What a `replicate label` names: the task, and for its session the pool, the classes, the
    positive class, the batch size, example photos (--like) and the spread's seed."""

    task: str
    pool: Path | None = None
    classes: str | None = None
    positive: str | None = None
    batch: int | None = None
    like: list[Path] = field(default_factory=list)
    seed: int = 0


def run(
    request: Request,
    data_dir: Path,
    exports_dir: Path,
    *,
    apply: Path | None = None,
    undo: Path | None = None,
    log=print,
) -> Round | None:
    """`replicate label`: take a log's copies back (`undo`), or copy a round's decisions in
    (`apply`) and write the next round's page; returns the round (None after an undo)."""
    task, task_dir, out = (
        request.task,
        data_dir / request.task,
        exports_dir / request.task / "label",
    )
    where = _where(data_dir, exports_dir)
    if undo is not None:
        took = cleaning.undo(undo)
        log(f"took back {took} photo(s) of {undo}; replicate label {task}{where} writes the round again")  # fmt: skip
        return None
    session = open_session(
        task_dir, out, request.pool, request.classes, request.positive, request.batch
    )
    photos = pool_photos(session, out, log=log)
    if len(photos.unreadable):
        photos.unreadable.to_csv(out / "unreadable.csv", index=False)
        log(
            f"warning: {len(photos.unreadable)} photo(s) of the pool do not decode and are left out "
            f"(listed in {out / 'unreadable.csv'})"
        )
    if apply is not None:
        decisions, undecided = read_label_decisions(apply)
        moves = plan_labels(session, photos, task_dir, decisions)
        written = cleaning.apply(task_dir, moves, task_dir / LOG_DIR)
        log(describe(moves).to_string(index=False))
        copied = sum(m.destination is not None for m in moves)
        log(f"copied {copied} photo(s) into {task_dir}; log: {written}")
        if undecided:
            log(f"{undecided} row(s) with no label left undecided: they come back in a later round")
        log(f"undo with: replicate label {task}{where} --undo {written}\n")
    found = next_round(session, photos, task_dir, out, request.like, request.seed, log=log)
    _say_round(found, task, where, log)
    return found


def _where(data_dir: Path, exports_dir: Path) -> str:
    """The folder options a session's next commands need: the ones given, as absolute paths, so
    they also work from another folder; none for the defaults."""
    if Path(data_dir) == RunConfig.data_dir and Path(exports_dir) == RunConfig.exports_dir:
        return ""
    return f" --data-dir {Path(data_dir).resolve()} --exports-dir {Path(exports_dir).resolve()}"


def _say_round(found: Round, task: str, where: str, log) -> None:
    counts = ", ".join(f"{c} {n}" for c, n in found.counts.items())
    log(
        f"the pool's {found.pool} photos: {found.labelled} labelled, {found.skipped} skipped, "
        f"{found.left} left; the task holds {sum(found.counts.values())} ({counts})"
    )
    log(f"the current model: {estimate_text(found.estimate)}")
    train = TRAIN_LABELLED.format(task=task) + where
    if not len(found.batch):
        log(f"every photo of the pool is labelled or skipped: {train}")
        return
    csv = found.page.with_suffix(".csv")
    log(
        f"round {found.number}: {len(found.batch)} photos; open {found.page} in a browser, mark "
        f"them and download the decisions (or fill in the label column of {csv}), then: "
        f"replicate label {task}{where} --apply ~/Downloads/{pages.decisions_name(task, found.number)}"
    )
    log(f"when the estimate is where you want it: {train}")
