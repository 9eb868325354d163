"""Audit a task's photos before trusting a number: duplicates, leaks across the split, one photo
under two labels, and photos a scraper should not have kept.

    replicate audit rooms

Every photo is fingerprinted (`fingerprints`: its SHA-256, and perceptual hashes of centre crops
of its content inside any uniform border), and near-duplicates within `THRESHOLD` bits are
searched, confirmed by their pixels and grouped (`duplicates`). Each group is flagged:

- leak: copies in train and in valid, so validation accuracy is inflated;
- conflict: the same photo under different labels, a contradiction to learn;
- duplicate: copies within one split, which overweight that photo.

Quality checks flag what a scraped set holds: too small, nearly uniform (blank), very dark or
blown out (levels of the content inside any border), an extreme aspect ratio, unreadable. Uniform
photos and those whose content is under 32 px are left out of the grouping: their hashes say
nothing.

Fingerprints are cached per file in TASK/_audit/fingerprints.csv, keyed on path, size and mtime,
so auditing again costs a second.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from ..errors import ReplicateError
from ..folders import task_files
from ..report import pages
from . import duplicates, fingerprints
from .fingerprints import CROPS, MIN_STD

THRESHOLD = 8  # bits of 64; see the module docstring and the README for how it was chosen
# Quality limits: short side in px, grey-level mean (0-255), long/short side; MIN_STD (nearly
# uniform) is the fingerprints' own, below which a hash means nothing.
MIN_SIDE, DARK, BRIGHT, MAX_ASPECT = 100, 30.0, 225.0, 3.0
PADDED = 0.02  # share of the image in trimmed borders from which a photo counts as padded
FINDING_COLUMNS = [
    "finding",
    "group",
    "n",
    "files",
    "splits",
    "labels",
    "identical",
    "distance",
    "detail",
]


# --- owners linked by their photos (a split keeps them together) --------------------------------


def link_owners(owners: list, photos: list, frame: pd.DataFrame | None = None) -> dict:
    """{owner: group}: owners (houses, listings) that share a near-duplicate photo, transitively,
    get the same group; `photos[k]` (bytes or a file) belongs to `owners[k]`. Transitive on
    purpose: a split that keeps a chain's owners together cannot leak any pair of it. `frame`:
    the photos' fingerprints when they are known already (`fingerprints.fingerprints`' rows)."""
    frame = (
        pd.DataFrame(fingerprints.fingerprint_many(photos))
        if frame is None
        else frame.reset_index(drop=True)
    )
    _, pairs = duplicates.linked(frame, THRESHOLD, photos)
    pairs = pairs[pairs.confirmed.to_numpy(bool)]
    names = sorted(set(owners))
    index = {o: i for i, o in enumerate(names)}
    ends = ([index[owners[i]] for i in pairs.i], [index[owners[j]] for j in pairs.j])
    edges = coo_matrix((np.ones(len(pairs)), ends), shape=(len(names), len(names)))
    return dict(zip(names, connected_components(edges, directed=False)[1]))


# --- a task's findings ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Audit:
    """A task's photos (fingerprints with split and label), its findings, and the time it took."""

    photos: pd.DataFrame
    findings: pd.DataFrame
    # every candidate pair the search found, with its similarity and whether it held
    pairs: pd.DataFrame
    seconds: float
    threshold: int

    def counts(self) -> dict:
        """The numbers a run records in its metrics and a report shows."""
        f = self.findings
        leaks = f[f.finding == "leak"]
        leaked_valid = sum(s.split(";").count("valid") for s in leaks.splits)
        return {
            "photos": len(self.photos),
            "threshold": self.threshold,
            "leak_groups": len(leaks),
            "leaked_valid_photos": int(leaked_valid),
            "conflict_groups": int((f.finding == "conflict").sum()),
            "duplicate_groups": int((f.finding == "duplicate").sum()),
            "quality_findings": int((~f.finding.isin(["leak", "conflict", "duplicate"])).sum()),
            "candidate_pairs": len(self.pairs),
            "confirmed_pairs": int(self.pairs.confirmed.sum()),
            "padded_photos": int(padded(self.photos).sum()),
        }

    def pair_table(self) -> pd.DataFrame:
        """Every candidate pair as files: distance in bits, crops, similarity, confirmed (pairs.csv)."""
        rel, p = self.photos.rel.to_numpy(), self.pairs
        return pd.DataFrame(
            {
                "file_a": rel[p.i.to_numpy(int)],
                "file_b": rel[p.j.to_numpy(int)],
                "distance": p.distance,
                "crop_a": [CROPS[c] for c in p.crop_i],
                "crop_b": [CROPS[c] for c in p.crop_j],
                "similarity": p.similarity.round(4),
                "confirmed": p.confirmed,
            }
        )


def split_and_label(path: Path, task_dir: Path) -> tuple[str, str]:
    """(split, class) of a photo at TASK/<split>/<class>/..."""
    parts = Path(path).resolve().relative_to(task_dir.resolve()).parts
    return parts[0], parts[1]


def audit_task(task_dir: Path, files: list[Path], threshold: int = THRESHOLD) -> Audit:
    """Fingerprint (cached) and check a task's photos; `files` are its train and valid images."""
    start = time.perf_counter()
    photos = fingerprints.fingerprints(files, cache=task_dir / "_audit" / "fingerprints.csv")
    where = [split_and_label(p, task_dir) for p in photos.path]
    photos["split"], photos["label"] = [w[0] for w in where], [w[1] for w in where]
    photos["rel"] = [
        Path(p).resolve().relative_to(task_dir.resolve()).as_posix() for p in photos.path
    ]
    photos["group"], pairs = duplicates.linked(photos, threshold)
    findings = pd.concat(
        [_group_findings(photos, pairs[pairs.confirmed.to_numpy(bool)]), _quality_findings(photos)],
        ignore_index=True,
    )
    return Audit(photos, findings, pairs, time.perf_counter() - start, threshold)


def padded(photos: pd.DataFrame) -> pd.Series:
    """Photos with at least PADDED of their area in trimmed uniform borders."""
    sizes = content_sizes(photos)
    area = (photos.width * photos.height).clip(lower=1)
    return (photos.error == "") & (sizes.content_width * sizes.content_height < (1 - PADDED) * area)


def _group_findings(photos: pd.DataFrame, pairs: pd.DataFrame) -> pd.DataFrame:
    rows = []
    sizes = photos[photos.group >= 0].groupby("group").size()
    distance = {}
    for p in pairs.itertuples():
        g = photos.group.iat[p.i]
        if g == photos.group.iat[p.j]:  # pairs that would have chained two groups are not theirs
            distance[g] = max(distance.get(g, 0), int(p.distance))
    for number, g in enumerate(sorted(sizes[sizes > 1].index), 1):
        members = photos[photos.group == g].sort_values(["split", "rel"], ascending=[True, True])
        base = {
            "group": number,
            "n": len(members),
            "files": ";".join(members.rel),
            "splits": ";".join(members.split),
            "labels": ";".join(members.label),
            "identical": members.sha256.nunique() == 1,
            "distance": distance.get(g, 0),
        }
        if members.split.nunique() > 1:
            rows.append(
                {
                    **base,
                    "finding": "leak",
                    "detail": "copies in train and valid: validation accuracy is inflated",
                }
            )
        if members.label.nunique() > 1:
            rows.append(
                {
                    **base,
                    "finding": "conflict",
                    "detail": "the same photo under " + " and ".join(sorted(set(members.label))),
                }
            )
        if (members.groupby("split").size() > 1).any():
            rows.append(
                {
                    **base,
                    "finding": "duplicate",
                    "detail": "copies within one split overweight this photo",
                }
            )
    return pd.DataFrame(rows, columns=FINDING_COLUMNS)


def content_sizes(photos: pd.DataFrame) -> pd.DataFrame:
    """(content_width, content_height) per photo: its size inside any uniform border; 0 when unreadable."""
    box = photos.box.str.split(expand=True).reindex(columns=range(4)).fillna(0).astype(int)
    return pd.DataFrame(
        {"content_width": box[2] - box[0], "content_height": box[3] - box[1]}, index=photos.index
    )


def _quality_findings(photos: pd.DataFrame) -> pd.DataFrame:
    """Size and aspect of the whole file (a trimmed border may be a flat sky); levels of the content
    (white padding does not make a dark photo look bright)."""
    short = photos[["width", "height"]].min(axis=1)
    aspect = photos[["width", "height"]].max(axis=1) / short.clip(lower=1)
    ok = photos.error == ""
    checks = [
        ("unreadable", ~ok, lambda r: r.error),
        (
            "too_small",
            ok & (short < MIN_SIDE),
            lambda r: f"{r.width}x{r.height}: short side below {MIN_SIDE} px",
        ),
        (
            "uniform",
            ok & (photos["std"] < MIN_STD),
            lambda r: f"nearly uniform (grey-level std {r['std']:.1f})",
        ),
        (
            "dark",
            ok & (photos["mean"] < DARK),
            lambda r: f"very dark (mean grey level {r['mean']:.0f} of 255)",
        ),
        (
            "bright",
            ok & (photos["mean"] > BRIGHT),
            lambda r: f"blown out (mean grey level {r['mean']:.0f} of 255)",
        ),
        (
            "aspect",
            ok & (aspect > MAX_ASPECT),
            lambda r: f"{r.width}x{r.height}: aspect ratio above {MAX_ASPECT:g}",
        ),
    ]
    rows = []
    for name, mask, detail in checks:
        for _, r in photos[mask].iterrows():
            rows.append(
                {
                    "finding": name,
                    "group": "",
                    "n": 1,
                    "files": r.rel,
                    "splits": r.split,
                    "labels": r.label,
                    "identical": "",
                    "distance": "",
                    "detail": detail(r),
                }
            )
    return pd.DataFrame(rows, columns=FINDING_COLUMNS)


# --- what to do about them ------------------------------------------------------------------------

FLAG_ORDER = {"leak": 0, "conflict": 1, "duplicate": 2}


def top_groups(result: Audit, width: int, limit: int = 10) -> list[str]:
    """One line per near-duplicate group, at most `width` characters, leaks first, then conflicts:
    its flags, size and files; the first `limit`, then how many more there are."""
    groups = result.findings[result.findings.group != ""]
    if groups.empty:
        return []
    table = groups.groupby("group").agg(
        findings=("finding", "+".join), n=("n", "first"), files=("files", "first")
    )
    table["rank"] = [min(FLAG_ORDER[f] for f in found.split("+")) for found in table.findings]
    table = table.sort_values(["rank", "group"])
    lines = []
    for number, row in table.head(limit).iterrows():
        line = f"  #{number} {row.findings}: {row.n} photos: {row.files.replace(';', ', ')}"
        lines.append(line if len(line) <= width else line[: max(width - 3, 20)] + "...")
    if len(table) > limit:
        lines.append(
            f"  ... and {len(table) - limit} more groups (all in audit.html and audit.csv)"
        )
    return lines


def suggested_decisions(result: Audit, task_dir: Path) -> pd.DataFrame:
    """A decisions file for `replicate clean` (path,action,new_label, and why): in each group without
    a label conflict, keep one copy (a training one if the group leaks) and remove the others;
    conflicts and quality findings are left as `keep` for a person to decide."""
    rows = []
    groups = result.photos[result.photos.group >= 0]
    conflicted = {g for g, members in groups.groupby("group") if members.label.nunique() > 1}
    for g, members in groups.groupby("group"):
        if len(members) < 2:
            continue
        # "train" sorts before "valid": a training copy is kept
        members = members.sort_values(["split", "rel"])
        for k, row in enumerate(members.itertuples()):
            if g in conflicted:
                action, why = "keep", "label conflict: choose the right label (relabel) or remove"
            elif k == 0:
                action, why = "keep", "the copy kept"
            else:
                action = "remove"
                why = (
                    "leak: a copy of a training photo"
                    if row.split != members.split.iat[0]
                    else "duplicate"
                )
            rows.append(
                {
                    "path": str((task_dir / row.rel).resolve()),
                    "action": action,
                    "new_label": "",
                    "reason": why,
                }
            )
    return pd.DataFrame(rows, columns=["path", "action", "new_label", "reason"])


def summary(result: Audit) -> str:
    """The printed summary: counts per finding."""
    c = result.counts()
    quality = result.findings[~result.findings.finding.isin(["leak", "conflict", "duplicate"])]
    kinds = ", ".join(f"{n} {k}" for k, n in quality.finding.value_counts().items()) or "none"
    padding = f"; uniform borders trimmed from {c['padded_photos']}" if c["padded_photos"] else ""
    return (
        f"{c['photos']} photos audited in {result.seconds:.1f}s{padding}; near-duplicate threshold "
        f"{c['threshold']} of 64 bits: {c['candidate_pairs']} pairs within it, {c['confirmed_pairs']} confirmed "
        f"(byte-identical, or by their pixels)\n  leak: {c['leak_groups']} groups with copies in train and valid "
        f"({c['leaked_valid_photos']} valid photos)\n  conflict: {c['conflict_groups']} photos under two labels\n"
        f"  duplicate: {c['duplicate_groups']} groups with copies within one split\n  quality: {kinds}"
    )


def warning_line(counts: dict) -> str:
    """One line for `run`/`compare` when the split leaks or labels conflict; '' when clean."""
    problems = []
    if counts["leak_groups"]:
        problems.append(
            f"{counts['leak_groups']} near-duplicate group(s) span train and valid "
            f"({counts['leaked_valid_photos']} valid photos): validation accuracy is inflated"
        )
    if counts["conflict_groups"]:
        problems.append(
            f"{counts['conflict_groups']} photo(s) under two labels: a contradiction to learn"
        )
    return f"warning: {'; '.join(problems)}; see: replicate audit TASK" if problems else ""


def check_threshold(threshold: int) -> None:
    if not 0 <= threshold <= 32:
        raise ReplicateError(
            f"--max-distance {threshold}: give a number of differing bits from 0 to 32 (default {THRESHOLD})"
        )


def run(task_dir: Path, threshold: int, out: Path, log=print) -> dict[str, Path]:
    """`replicate audit`: audit a task folder (changing nothing), write its findings, pairs,
    suggested decisions and page into `out` (pages.write_audit), and say what was found."""
    check_threshold(threshold)
    files, classes = task_files(task_dir)  # unreadable photos become findings, not errors
    result = audit_task(task_dir, [f for fs in files.values() for f in fs], threshold)
    suggestions = suggested_decisions(result, task_dir)
    text = summary(result)
    written = pages.write_audit(result, suggestions, classes, task_dir, text, out)
    log(text)
    lines = top_groups(result, shutil.get_terminal_size((100, 24)).columns)
    if lines:
        log("\n" + "\n".join(lines))
    removes = int((suggestions.action == "remove").sum())
    log(
        f"\nwritten: {written['audit.html']} (open it to decide), {written['audit.csv']}, "
        f"{written['pairs.csv']}, {written['decisions.csv']}"
    )
    log(
        f"suggested: remove {removes} copies; see them with: replicate clean {task_dir.name} "
        f"--decisions {written['decisions.csv']} (then --apply; --undo puts them back)"
    )
    return written
