"""`replicate label` and its engine (`replicate/active.py`): pool features cached, batches kept apart,
a yes/no attribute's likeliest photos in every batch; rounds whose decisions are copied into both
splits, near-duplicates together, logged and undone. (Its page in Chromium: tests/test_browser.py.)

    python -m pytest tests/test_label.py
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import COLORS, folders_args, make_image, synthetic_photo
from test_cleaning import tree

from replicate.audit import cleaning
from replicate.cli import app
from replicate.errors import ReplicateError
from replicate.labelling import active, rounds


def clusters(
    centres: int, per: int, dims: int = 16, spread: float = 0.8, seed: int = 0
) -> np.ndarray:
    """`centres` x `per` unit vectors around random centres (rows grouped by centre): different
    photos of one kind, more than active.NEAR apart in cosine distance, as on real photos."""
    rng = np.random.default_rng(seed)
    middle = rng.normal(size=(centres, dims))
    x = np.repeat(middle, per, axis=0) + spread * rng.normal(size=(centres * per, dims))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_a_spread_takes_one_photo_of_each_cluster_first():
    x = clusters(5, 20)
    picks = active.spread(x, np.arange(len(x)), 5)
    assert sorted(p // 20 for p in picks) == [0, 1, 2, 3, 4]
    # from photos already labelled: the clusters they are in come last
    more = active.spread(x, np.arange(20, 100), 3, chosen=np.arange(0, 20))
    assert len({p // 20 for p in more}) == 3 and all(p >= 20 for p in more)


def test_before_any_label_the_first_batch_is_a_spread():
    x = clusters(4, 25)
    batch = active.next_batch(x, pd.Series(dtype=object), 4)
    assert sorted(p // 25 for p in batch) == [0, 1, 2, 3]


def test_half_the_batch_is_the_likeliest_positives_and_copies_do_not_fill_it():
    rng = np.random.default_rng(1)
    x = clusters(6, 30, seed=3)  # cluster 0 is the attribute ("yes"), rare in what is labelled
    x[150:180] = x[150]  # cluster 5: 30 copies of one photo
    truth = np.where(np.arange(len(x)) < 30, "yes", "no")
    labelled_rows = np.concatenate([[0, 1], rng.choice(np.arange(30, 150), 10, replace=False)])
    labelled = pd.Series(truth[labelled_rows], index=labelled_rows)
    batch = active.next_batch(x, labelled, 10, positive="yes")
    assert len(batch) == 10 and not set(batch) & set(labelled_rows)
    assert sum(truth[b] == "yes" for b in batch) >= 5  # the likeliest half finds the attribute
    assert sum(150 <= b < 180 for b in batch) <= 1  # one copy of the duplicated photo at most


def test_pool_features_are_cached_and_a_changed_file_is_computed_again(tmp_path, monkeypatch):
    files = [
        make_image(tmp_path / "pool" / f"{k}.jpg", (40 * k, 90, 200 - 30 * k), seed=k)
        for k in range(5)
    ]
    cache = tmp_path / "features.npz"
    first = active.pool_features(files, cache)
    assert first.shape[0] == 5 and np.allclose(np.linalg.norm(first, axis=1), 1, atol=1e-5)
    real, computed = active._embed, []
    monkeypatch.setattr(
        active, "_embed", lambda fs, arch, bs: computed.extend(fs) or real(fs, arch, bs)
    )
    assert np.array_equal(active.pool_features(files, cache), first) and computed == []
    os.utime(files[2], ns=(1, 1))
    again = active.pool_features(files, cache)
    assert computed == [files[2]] and np.allclose(again, first, atol=1e-6)


def test_a_photo_that_does_not_decode_is_named(tmp_path):
    good = make_image(tmp_path / "pool" / "good.jpg", (200, 60, 40))
    bad = tmp_path / "pool" / "bad.jpg"
    bad.write_text("not a photo")
    with pytest.raises(ReplicateError, match="bad.jpg cannot be read"):
        active.pool_features([good, bad])


# --- the command ------------------------------------------------------------------------------------


def truth(path: str) -> str:
    """The class a test pool's photo shows: its name up to the first underscore."""
    return Path(path).name.split("_")[0]


def label_cli(runner, root: Path, task: str, *args):
    return runner.invoke(
        app,
        [
            "label",
            task,
            *folders_args(root / "data", root / "exports"),
            *args,
        ],
    )


def decide(paths, path: Path, **actions) -> Path:
    """A decisions file as the label page writes it: each photo labelled as it truly is, or as `actions` says."""
    rows = [(p, *actions.get(Path(p).name, ("label", truth(p)))) for p in paths]
    pd.DataFrame(rows, columns=["path", "action", "new_label"]).to_csv(path, index=False)
    return path


def tinted(path: Path, colour: tuple[int, int, int], seed: int) -> Path:
    """A photo-like image washed in `colour`: photos of one colour are different photos (over 0.09
    apart in cosine distance of the features, above active.NEAR) and nearer each other than others."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.blend(
        synthetic_photo(seed, size=(96, 72)), Image.new("RGB", (96, 72), colour), 0.85
    ).save(path)
    return path


@pytest.fixture
def pool(tmp_path) -> Path:
    """Unlabelled photos in two sub-folders: 12 red ones (yes_*), 24 blue ones (no_*), and no_twin.jpg
    in both, the same photo re-encoded at another size."""
    pool = tmp_path / "pool"
    for k in range(12):
        tinted(pool / "a" / f"yes_{k}.jpg", COLORS["red"], seed=k)
    for k in range(24):
        tinted(pool / "b" / f"no_{k}.jpg", COLORS["blue"], seed=100 + k)
    photo = synthetic_photo(7)
    photo.save(pool / "b" / "no_twin.jpg", quality=95)
    photo.resize((240, 180)).save(pool / "a" / "no_twin.jpg", quality=80)
    return pool


def test_rounds_copy_the_labels_into_both_splits_and_undo_takes_them_back(
    pool, runner, tmp_path, monkeypatch
):
    before = tree(pool)
    first = label_cli(runner, tmp_path, "flt", "--pool", str(pool), "--batch", "8")
    assert first.exit_code == 0, first.output
    assert "round 1: 8 photos" in first.output and "the task holds 0 (yes 0, no 0)" in first.output
    out = tmp_path / "exports" / "flt" / "label"
    batch = pd.read_csv(out / "round-1.csv", keep_default_na=False)
    assert len(batch) == 8 and (batch.guess == "").all()  # no guess before any label
    page = (out / "round-1.html").read_text()
    assert page.count('class="card"') == 8 and 'data-suggested="' not in page
    twins = [str(pool / "a" / "no_twin.jpg"), str(pool / "b" / "no_twin.jpg")]
    # The twins first: on their own the second "no" would go to valid (one of two), with its twin in train.
    chosen = twins + [p for p in batch.path if p not in twins][:6] + [str(pool / "a" / "yes_0.jpg")]
    chosen = list(dict.fromkeys(chosen))  # yes_0 may be in the batch already
    decisions = decide(chosen, tmp_path / "decisions.csv", **{"no_0.jpg": ("skip", "")})

    real, computed = active._embed, []
    monkeypatch.setattr(
        active, "_embed", lambda fs, arch, bs: computed.extend(fs) or real(fs, arch, bs)
    )
    applied = label_cli(runner, tmp_path, "flt", "--apply", str(decisions))
    assert applied.exit_code == 0, applied.output
    assert computed == []  # a labelled copy is its pool photo: its features are not computed again
    task = tmp_path / "data" / "flt"
    photos = rounds.task_photos(task).assign(name=lambda t: t.path.map(lambda p: Path(p).name))
    skipped = int("no_0.jpg" in {Path(p).name for p in chosen})
    assert len(photos) == len(chosen) - skipped and "no_0.jpg" not in set(photos.name)
    assert (photos.label == photos.name.map(lambda n: truth(n.split("__")[-1]))).all()
    twin_splits = photos.set_index("name").loc[["a__no_twin.jpg", "b__no_twin.jpg"], "split"]
    assert twin_splits.nunique() == 1  # near-duplicates never straddle the split
    for c in ("yes", "no"):
        splits = photos[photos.label == c].split
        assert (splits == "valid").sum() >= 1 and (splits == "train").sum() >= 1
    assert tree(pool) == before  # the pool is never changed
    log = next((task / "_labelling").glob("*.csv"))
    assert set(pd.read_csv(log).action) == ({"copy", "skip"} if skipped else {"copy"})

    assert "round 2: 8 photos" in applied.output
    counts = photos.label.value_counts()
    estimated = re.search(
        r"the current model: \d+\.\d% accuracy, cross-validated over all (\d+) labels",
        applied.output,
    )
    if len(counts) == 2 and counts.min() >= 2:  # else: "not yet"
        assert estimated and int(estimated[1]) == len(photos)
    else:
        assert "the current model: not yet" in applied.output
    n = len(list(pool.rglob("*.jpg")))
    said = f"the pool's {n} photos: {len(photos)} labelled, {skipped} skipped, {n - len(photos) - skipped} left"
    assert said in applied.output
    second = pd.read_csv(out / "round-2.csv", keep_default_na=False)
    assert not set(second.path) & set(chosen)
    assert (second.guess == second.path.map(truth)).sum() >= 6  # red against blue: the head has it
    assert 'data-suggested="label" data-suggested-label="' in (out / "round-2.html").read_text()

    copied = tree(task)
    again = label_cli(runner, tmp_path, "flt", "--apply", str(decisions))
    assert again.exit_code == 2 and "applied twice" in again.output and tree(task) == copied
    undone = label_cli(runner, tmp_path, "flt", "--undo", str(log))
    assert undone.exit_code == 0, undone.output
    assert rounds.task_photos(task).empty and tree(pool) == before
    assert (
        label_cli(runner, tmp_path, "flt").exit_code == 0
    )  # the pool is remembered; back to round 1
    assert (out / "round-1.csv").is_file() and not rounds.logs(task)


def test_the_rounds_csv_filled_by_hand_is_applied_from_another_folder(
    pool, runner, tmp_path, monkeypatch
):
    """round-N.csv is the file to fill in: a label column (a class, skip, or empty: undecided), the
    guess and p_yes beside it, paths as given or relative to the pool. A session started with
    --data-dir/--exports-dir prints its next command with them, which works from any folder."""
    first = label_cli(runner, tmp_path, "flt", "--pool", str(pool), "--batch", "6")
    assert first.exit_code == 0, first.output
    where = f"--data-dir {tmp_path / 'data'} --exports-dir {tmp_path / 'exports'}"
    assert f"replicate label flt {where} --apply " in first.output
    out = tmp_path / "exports" / "flt" / "label"
    batch = pd.read_csv(out / "round-1.csv", keep_default_na=False)
    assert list(batch.columns) == ["path", "label", "guess", "p_yes"] and (batch.label == "").all()
    batch["label"] = [truth(p) for p in batch.path]
    batch.loc[0, "label"], batch.loc[5, "label"] = "skip", ""  # one skipped, one left for later
    batch["path"] = [str(Path(p).relative_to(pool)) for p in batch.path]  # as the page names them
    batch.to_csv(tmp_path / "filled.csv", index=False)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    command = first.output.split("then: replicate ")[1].splitlines()[0].split()[:-1]  # --apply
    applied = runner.invoke(app, [*command, str(tmp_path / "filled.csv")])
    assert applied.exit_code == 0, applied.output
    assert "1 row(s) with no label left undecided" in applied.output
    photos = rounds.task_photos(tmp_path / "data" / "flt")
    assert len(photos) == 4
    assert (photos.label == photos.path.map(lambda p: truth(Path(p).name.split("__")[-1]))).all()
    n = len(list(pool.rglob("*.jpg")))
    assert f"the pool's {n} photos: 4 labelled, 1 skipped, {n - 5} left" in applied.output
    done = set(rounds.applied(tmp_path / "data" / "flt").source)
    assert str(pool / batch.path[0]) in done and str(pool / batch.path[5]) not in done  # undecided


def test_the_estimate_is_cross_validated_over_every_label():
    """Two clusters of features, labelled: the head's accuracy cross-validated over all labels,
    and the yes filter those predictions make."""
    x = clusters(2, 20, spread=0.3)
    labels = pd.Series(["yes"] * 20 + ["no"] * 20)
    found = active.estimate(x, labels, "yes")
    assert found["labels"] == 40 and found["folds"] == 5 and found["accuracy"] >= 0.95
    assert found["filter"]["positive"] == "yes" and found["filter"]["precision"] >= 0.95
    assert "cross-validated over all 40 labels (5 folds)" in active.estimate_text(found)
    assert active.estimate(x[:3], labels[:3], "yes") is None  # one label of a class: not yet


def test_bad_decisions_copy_nothing_and_say_why(pool, runner, tmp_path):
    assert label_cli(runner, tmp_path, "flt", "--pool", str(pool), "--batch", "4").exit_code == 0
    outside = make_image(tmp_path / "elsewhere" / "yes_x.jpg", COLORS["red"])
    decisions = decide(
        [
            str(pool / "a" / "yes_1.jpg"),
            str(pool / "b" / "no_1.jpg"),
            str(outside),
            str(pool / "b" / "no_2.jpg"),
        ],
        tmp_path / "decisions.csv",
        **{"yes_1.jpg": ("label", "maybe"), "no_2.jpg": ("relabel", "no")},
    )
    result = label_cli(runner, tmp_path, "flt", "--apply", str(decisions))
    assert result.exit_code == 2 and "nothing was copied; 3 problem(s)" in result.output
    assert (
        "unknown class 'maybe'" in result.output
        and "not a readable photo of the pool" in result.output
    )
    assert "unknown action 'relabel'" in result.output
    assert not (tmp_path / "data" / "flt").exists()
    (tmp_path / "data").mkdir()
    overlap = label_cli(runner, tmp_path, "flt", "--pool", str(tmp_path / "data"))
    assert overlap.exit_code == 2 and "overlap" in overlap.output


def test_several_classes_start_near_the_examples_and_remember_the_session(runner, tmp_path):
    pool = tmp_path / "pool"
    colours = {"red": (200, 50, 40), "green": (60, 180, 60), "blue": (40, 60, 200)}
    for c, rgb in colours.items():
        for k in range(10):
            tinted(pool / f"{c}_{k}.jpg", rgb, seed=len(c) * 100 + k)
    example = tinted(tmp_path / "example.jpg", colours["green"], seed=999)
    first = label_cli(
        runner,
        tmp_path,
        "paint",
        "--pool",
        str(pool),
        "--classes",
        "red,green,blue",
        "--batch",
        "6",
        "--like",
        str(example),
    )
    assert first.exit_code == 0, first.output
    out = tmp_path / "exports" / "paint" / "label"
    session = json.loads((out / "session.json").read_text())
    assert session["classes"] == ["red", "green", "blue"] and session["positive"] is None
    batch = pd.read_csv(out / "round-1.csv", keep_default_na=False)
    assert (
        batch.path.map(truth) == "green"
    ).sum() >= 3  # half the batch: the photos nearest the example
    applied = label_cli(
        runner, tmp_path, "paint", "--apply", str(decide(batch.path, tmp_path / "d.csv"))
    )
    assert applied.exit_code == 0, applied.output
    second = pd.read_csv(out / "round-2.csv", keep_default_na=False)
    labelled = set(rounds.task_photos(tmp_path / "data" / "paint").label)
    assert set(second.guess) <= labelled and len(second) == 6


def test_undoing_a_copy_whose_original_is_gone_moves_it_back(tmp_path):
    source = make_image(tmp_path / "pool" / "a.jpg", COLORS["red"])
    task = tmp_path / "data" / "t"
    log = cleaning.apply(
        task,
        [
            cleaning.Move("copy", source, task / "train" / "yes" / "a.jpg", "yes"),
            cleaning.Move("skip", make_image(tmp_path / "pool" / "b.jpg"), None),
        ],
        task / "_labelling",
    )
    original = source.read_bytes()
    assert (task / "train" / "yes" / "a.jpg").read_bytes() == original
    source.unlink()
    assert cleaning.undo(log) == 1
    assert source.read_bytes() == original and not (task / "train" / "yes" / "a.jpg").exists()
