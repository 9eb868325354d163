"""A two-class task as a search filter: which class it looks for, the threshold that keeps the
target precision on valid, `filter.json`, applying filters to a tag table, and the listing rule.

    python -m replicate.engine.filters exports/kitchen/tf_efficientnet_lite0-frozen   # its filter

`replicate run` and `compare` write a two-class run's filter (`write`, and the precision-recall
curve beside it: plots.render_filter); `predict` reads it for each model (`of_models`), adds
<model>_has_<attribute> per photo and makes the model's <model>_predicted follow it (`apply`: one
answer per attribute), and per listing (`listings`) a listing has what any of its photos answers
(`listing_rule` measures that rule for a filter on the run's valid photos).
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from ..config import RunConfig
from ..errors import ReplicateError
from ..runs import VALID_PREDICTIONS, Run, run_of

FILTER = "filter.json"  # in a two-class run folder
TARGET_PRECISION = RunConfig.target_precision  # for run folders from before --target-precision


def check_positive(positive: str | None, classes: list[str], task: str) -> None:
    """--positive names one class of a two-class task, before any training."""
    if positive and (len(classes) != 2 or positive not in classes):
        raise ReplicateError(
            f"--positive {positive}: give one of the two classes of a yes/no task; "
            f"{task} has {', '.join(classes)}"
        )


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


def write(
    run: Run, positive: str | None = None, target: float | None = None, preds=None
) -> dict | None:
    """filter.json of a two-class run folder, from its valid predictions (`preds`, else read from
    the folder; None for other tasks); `positive` and `target` default to the run's config
    (--positive, --target-precision)."""
    positive = positive or run.config.get("positive")
    target = target or run.config.get("target_precision") or TARGET_PRECISION
    preds = run.valid_predictions() if preds is None else preds
    found = search_filter(preds, run.classes, run.task, positive, target)
    if found is not None:
        (run.path / FILTER).write_text(json.dumps(found, indent=2))
    return found


def read(run_dir: Path) -> dict | None:
    """A run folder's filter.json (`write`); None for other tasks and older runs."""
    try:
        return json.loads((Path(run_dir) / FILTER).read_text())
    except (OSError, ValueError):
        return None  # not a two-class task, or a run from before search filters


def check_pattern(pattern: str) -> re.Pattern:
    """`--listing-pattern` compiled; one-line ReplicateError for a pattern that does not compile
    or captures no listing id. Called where the pattern enters, before any photo is tagged."""
    try:
        regex = re.compile(pattern)
    except re.error as e:
        raise ReplicateError(
            f"--listing-pattern {pattern!r} is not a regular expression ({e}): e.g. '^(\\d+)_'"
        ) from None
    if regex.groups < 1:
        raise ReplicateError(
            f"--listing-pattern {pattern!r} needs a group that captures the listing id, e.g. '^(\\d+)_'"
        )
    return regex


def listing_ids(paths: pd.Series, pattern: str) -> pd.Series:
    """The listing id of each path: `pattern`'s first group, searched in the file name (or in the
    path, if the pattern has a /); None where it does not match."""
    regex = check_pattern(pattern)

    def listing_id(path: str) -> str | None:
        p = Path(path)
        m = regex.search(p.as_posix() if "/" in pattern else p.name)
        return m[1] if m else None

    return paths.map(listing_id)


def check_names(paths: list, pattern: str) -> None:
    """Refuse, before any tagging, a pattern that matches none of the photos' names."""
    if len(paths) and listing_ids(pd.Series([str(p) for p in paths]), pattern).isna().all():
        example = Path(str(paths[0])).name
        raise ReplicateError(
            f"--listing-pattern {pattern!r} matched none of the file names ({len(paths)} photos, "
            f"e.g. {example!r}): its first group must capture the listing id"
        )


def listings(
    table: pd.DataFrame,
    pattern: str,
    classes: dict[str, list[str]],
    filters: dict[str, dict] | None = None,
) -> tuple[pd.DataFrame, list[str]]:
    """`by_listing` of `table`'s photos grouped by `pattern`'s listing ids, and the paths of the
    photos whose names the pattern does not match (in no listing)."""
    ids = listing_ids(table.path, pattern)
    if ids.isna().all():
        raise ReplicateError(f"--listing-pattern {pattern!r} matched none of the file names")
    return by_listing(table, ids, classes, filters), list(table.path[ids.isna()])


def by_listing(
    table: pd.DataFrame,
    ids: pd.Series,
    classes: dict[str, list[str]],
    filters: dict[str, dict] | None = None,
) -> pd.DataFrame:
    """One row per listing (`ids`: each photo's listing id; None: in none) of a photo table
    (`apply`'s) for the models `classes` ({name: classes}), by the listing rule: a listing has
    what any of its readable photos answers. Columns: listing; photos (readable ones), unreadable
    and unreadable_photos (their paths, "; " between), error (when none could be read); per
    model its answers, <name>_has_<attribute> for a search filter (its flag), else
    <name>_has_<class> for each class (a photo's <name>_predicted); then max_<name>_p_<class> of
    the same classes, the listing's best photo's score. No readable photo: the answers empty."""
    filters = filters or {}
    listed = ids.notna().to_numpy()
    photos, key = table[listed], ids[listed]
    ok = photos.error.fillna("").eq("")
    out = pd.DataFrame({
        "photos": ok.groupby(key).sum().astype(int),
        "unreadable": (~ok).groupby(key).sum().astype(int),
    })  # fmt: skip
    bad = photos.path[~ok].astype(str)
    out["unreadable_photos"] = bad.groupby(key[~ok]).agg("; ".join).reindex(out.index).fillna("")
    none = out.photos == 0
    out["error"] = np.where(none, "none of its photos could be read", "")
    answers, scores = {}, {}
    for name, names in classes.items():
        found = filters.get(name)
        for c in [found["positive"]] if found else names:
            column = f"{name}_{found['column']}" if found else f"{name}_has_{c}"
            shown = photos[f"{name}_predicted"].eq(c).groupby(key).any()
            answers[column] = shown.astype("boolean").mask(none)
            scores[f"max_{name}_p_{c}"] = photos[f"{name}_p_{c}"].groupby(key).max()
    out = pd.concat([out, pd.DataFrame(answers), pd.DataFrame(scores)], axis=1)
    return out.rename_axis("listing").reset_index()


def of_models(models: list) -> dict[str, dict]:
    """{model name: its run's filter.json} for the models (each with a `name` and the `path` it was
    loaded from) of two-class runs whose filter found a threshold; a bundle's attribute (`bundle`
    set) carries its filter, and its listing rule, in its metadata (`meta`)."""
    found = {}
    for m in models:
        if getattr(m, "bundle", None):
            spec, recorded = m.meta.get("filter"), m.meta.get("listing_rule")
            source = Path(m.meta.get("source", {}).get("run", ""))
            run_dir = source if (source / VALID_PREDICTIONS).is_file() else None
        else:
            run_dir, recorded = run_of(m.path).path, None
            spec = read(run_dir)
        if spec and spec["threshold"] is not None:
            run_dir = run_dir and str(run_dir)
            found[m.name] = {**spec, "classes": m.classes, "run_dir": run_dir, "recorded": recorded}
    return found


def passes(found: dict, p_positive):
    """The search filter `found`'s rule for a photo: its p_<positive> (a number or an array) at or
    above the filter's threshold. Every engine's flag is this rule: tables, answers, listings."""
    return p_positive >= found["threshold"]


def answer(found: dict, flag: bool) -> str:
    """The class a filtered model answers for a photo: its positive class where the photo passes
    the filter, else the other one. A yes/no attribute has this one answer everywhere."""
    return (
        found["positive"] if flag else next(c for c in found["classes"] if c != found["positive"])
    )


def apply(table: pd.DataFrame, filters: dict[str, dict]) -> pd.DataFrame:
    """`table` with each search filter's <model>_has_<attribute> per photo (`passes`), and the
    model's <model>_predicted made its `answer`: one answer per attribute. A photo without
    probabilities (unreadable) has neither: empty, not False."""
    for name, found in filters.items():
        p = table[f"{name}_p_{found['positive']}"].to_numpy(dtype=np.float64)
        read = ~np.isnan(p)
        flag = pd.array(passes(found, p), dtype="boolean")
        flag[~read] = pd.NA
        yes, no = answer(found, True), answer(found, False)
        predicted = np.where(np.asarray(flag.fillna(False), dtype=bool), yes, no).astype(object)
        predicted[~read] = None
        table[f"{name}_predicted"] = predicted
        table[f"{name}_{found['column']}"] = flag
    return table


def listing_rule(found: dict, pattern: str) -> dict:
    """How the per-listing rule (a listing has the attribute when any of its photos passes the
    filter) does on the run's own validation photos, grouped into listings by `pattern`. For a
    bundle's attribute whose source run folder is not here: what the bundle recorded for the same
    pattern, else the rule without its measures (None)."""
    if found["run_dir"] is None:
        recorded = found.get("recorded") or {}
        if recorded.get("pattern") == pattern:
            return {k: v for k, v in recorded.items() if k != "pattern"}
        unmeasured = (
            "valid_listings",
            "valid_listings_with",
            "listing_precision",
            "listing_recall",
        )
        return {**_rule(found), **dict.fromkeys(unmeasured)}
    preds = Run(Path(found["run_dir"])).valid_predictions()
    ids = listing_ids(preds.path, pattern)
    preds = preds.assign(listing=ids).dropna(subset=["listing"])
    truth = (preds.actual == found["positive"]).groupby(preds.listing).any()
    shown = passes(found, preds[f"p_{found['positive']}"]).groupby(preds.listing).any()
    hits = int((truth & shown).sum())
    return {
        **_rule(found),
        "valid_listings": int(len(truth)),
        "valid_listings_with": int(truth.sum()),
        "listing_precision": hits / max(int(shown.sum()), 1) if shown.any() else None,
        "listing_recall": hits / int(truth.sum()) if truth.any() else None,
    }


def _rule(found: dict) -> dict:
    keys = ("column", "positive", "threshold", "target_precision")
    return {
        **{k: found[k] for k in keys},
        "photo_precision": found["precision"],
        "photo_recall": found["recall"],
    }


def write_listing_rules(filters: dict[str, dict], pattern: str, path: Path) -> dict[str, dict]:
    """`listing_rule` of every search filter, written to `path` (JSON); returns them."""
    rules = {name: listing_rule(found, pattern) for name, found in filters.items()}
    path.write_text(json.dumps(rules, indent=2))
    return rules


if __name__ == "__main__":
    print(json.dumps({k: v for k, v in (read(Path(sys.argv[1])) or {}).items() if k != "curve"}))
