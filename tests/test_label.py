"""The labelling engine (`replicate/label.py`): pool features cached, batches kept apart, a yes/no
attribute's likeliest photos in every batch. (The `label` command and its page: not built yet.)

    python -m pytest tests/test_label.py
"""
from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pytest

from conftest import make_image
from replicate import label
from replicate.errors import ReplicateError


def clusters(centres: int, per: int, dims: int = 16, spread: float = 0.8, seed: int = 0) -> np.ndarray:
    """`centres` x `per` unit vectors around random centres (rows grouped by centre): different
    photos of one kind, more than label.NEAR apart in cosine distance, as on real photos."""
    rng = np.random.default_rng(seed)
    middle = rng.normal(size=(centres, dims))
    x = np.repeat(middle, per, axis=0) + spread * rng.normal(size=(centres * per, dims))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_a_spread_takes_one_photo_of_each_cluster_first():
    x = clusters(5, 20)
    picks = label.spread(x, np.arange(len(x)), 5)
    assert sorted(p // 20 for p in picks) == [0, 1, 2, 3, 4]
    # from photos already labelled: the clusters they are in come last
    more = label.spread(x, np.arange(20, 100), 3, chosen=np.arange(0, 20))
    assert len({p // 20 for p in more}) == 3 and all(p >= 20 for p in more)


def test_before_any_label_the_first_batch_is_a_spread():
    x = clusters(4, 25)
    batch = label.next_batch(x, pd.Series(dtype=object), 4)
    assert sorted(p // 25 for p in batch) == [0, 1, 2, 3]


def test_half_the_batch_is_the_likeliest_positives_and_copies_do_not_fill_it():
    rng = np.random.default_rng(1)
    x = clusters(6, 30, seed=3)  # cluster 0 is the attribute ("yes"), rare in what is labelled
    x[150:180] = x[150]  # cluster 5: 30 copies of one photo
    truth = np.where(np.arange(len(x)) < 30, "yes", "no")
    labelled_rows = np.concatenate([[0, 1], rng.choice(np.arange(30, 150), 10, replace=False)])
    labelled = pd.Series(truth[labelled_rows], index=labelled_rows)
    batch = label.next_batch(x, labelled, 10, positive="yes")
    assert len(batch) == 10 and not set(batch) & set(labelled_rows)
    assert sum(truth[b] == "yes" for b in batch) >= 5  # the likeliest half finds the attribute
    assert sum(150 <= b < 180 for b in batch) <= 1  # one copy of the duplicated photo at most


def test_pool_features_are_cached_and_a_changed_file_is_computed_again(tmp_path, monkeypatch):
    files = [make_image(tmp_path / "pool" / f"{k}.jpg", (40 * k, 90, 200 - 30 * k), seed=k) for k in range(5)]
    cache = tmp_path / "features.npz"
    first = label.pool_features(files, cache)
    assert first.shape[0] == 5 and np.allclose(np.linalg.norm(first, axis=1), 1, atol=1e-5)
    real, computed = label._embed, []
    monkeypatch.setattr(label, "_embed", lambda fs, arch, bs: computed.extend(fs) or real(fs, arch, bs))
    assert np.array_equal(label.pool_features(files, cache), first) and computed == []
    os.utime(files[2], ns=(1, 1))
    again = label.pool_features(files, cache)
    assert computed == [files[2]] and np.allclose(again, first, atol=1e-6)


def test_a_photo_that_does_not_decode_is_named(tmp_path):
    good = make_image(tmp_path / "pool" / "good.jpg", (200, 60, 40))
    bad = tmp_path / "pool" / "bad.jpg"
    bad.write_text("not a photo")
    with pytest.raises(ReplicateError, match="bad.jpg cannot be read"):
        label.pool_features([good, bad])
