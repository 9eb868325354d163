"""Closing the loop: interpret, the review page, `clean` (and its undo), and `predict`.

python -m pytest tests/test_cleaning.py
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import make_image, odd_photos
from fastai.learner import load_learner
from PIL import Image

from replicate.cli import app
from replicate.config import RunConfig
from replicate.training import train


@pytest.fixture
def trained(rooms_run):
    """A task with three classes and resnet18 trained on it (conftest.rooms_run, made once)."""
    return rooms_run


@pytest.fixture
def task(trained, tmp_path):
    """A fresh copy of the trained task's data for tests that move files."""
    root, run_dir = trained
    shutil.copytree(root / "data", tmp_path / "data")
    return tmp_path / "data" / "rooms"


def tree(folder):
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def clean(runner, task_dir, *args):
    return runner.invoke(app, ["clean", "rooms", "--data-dir", str(task_dir.parent), *args])


# --- interpret and review ----------------------------------------------------------------------


def test_interpret_scores_both_splits_without_augmentation(trained, runner):
    root, run_dir = trained
    result = runner.invoke(app, ["interpret", str(run_dir), "-k", "5"])
    assert result.exit_code == 0, result.output
    assert "most confused (actual -> predicted)" in result.output
    for split, n in (("valid", 6), ("train", 12)):
        preds = pd.read_csv(run_dir / f"predictions_{split}.csv")
        assert len(preds) == n and set(preds.actual) == {"bathroom", "bedroom", "kitchen"}
        assert all(f"/{split}/" in p for p in preds.path)
        assert len(pd.read_csv(run_dir / f"interpret_{split}_top_losses.csv")) == 5
        with Image.open(run_dir / f"interpret_{split}_confusion.png") as im:
            assert im.format == "PNG"
        confused = pd.read_csv(run_dir / f"interpret_{split}_most_confused.csv")
        assert confused["count"].sum() == (preds.actual != preds.predicted).sum()
    # Scored without augmentation: the valid scores equal those saved by training (same weights, same transforms).
    saved = pd.read_csv(run_dir / "valid_predictions.csv").set_index("path")
    fresh = pd.read_csv(run_dir / "predictions_valid.csv").set_index("path").loc[saved.index]
    assert np.allclose(saved.loss, fresh.loss, atol=1e-4)
    again = runner.invoke(app, ["interpret", str(run_dir), "--split", "valid", "-k", "5"])
    assert again.exit_code == 0 and "train:" not in again.output


def test_review_page_lists_the_top_losses_with_keys_and_a_download(trained, runner):
    root, run_dir = trained
    result = runner.invoke(app, ["review", str(run_dir), "-k", "3"])
    assert result.exit_code == 0, result.output
    page = (run_dir / "review.html").read_text()
    cards = re.findall(
        r'<div class="card" data-path="([^"]+)">\s*<img src="data:image/jpeg;base64,', page
    )
    assert len(cards) == 6  # 3 per split, images embedded
    losses = re.findall(r"loss=([0-9.]+)", page)
    assert [float(x) for x in losses] == sorted((float(x) for x in losses), reverse=True)
    assert 'const CLASSES = ["bathroom", "bedroom", "kitchen"]' in page
    assert "path,action,new_label" in page and "decisions.csv" in page
    assert page.count('data-action="remove"') == 6 and page.count('data-action="relabel"') == 12


# --- clean ----------------------------------------------------------------------------------------


def decisions_file(tmp_path, rows):
    path = tmp_path / "decisions.csv"
    pd.DataFrame(rows, columns=["path", "action", "new_label"]).to_csv(path, index=False)
    return path


def test_decisions_from_review_apply_and_undo_restores_every_byte(task, runner, tmp_path):
    before = tree(task)
    files = sorted((task / "train").rglob("*.jpg"))
    rows = [
        (str(files[0]), "relabel", "kitchen" if "/kitchen/" not in str(files[0]) else "bedroom"),
        (str(files[1]), "remove", ""),
        (str(files[2]), "keep", ""),
        (str(sorted((task / "valid").rglob("*.jpg"))[0]), "remove", ""),
    ]
    decisions = decisions_file(tmp_path, rows)

    dry = clean(runner, task, "--decisions", str(decisions))
    assert dry.exit_code == 0, dry.output
    assert "3 move(s) planned; nothing changed" in dry.output and tree(task) == before

    done = clean(runner, task, "--decisions", str(decisions), "--apply")
    assert done.exit_code == 0, done.output
    assert not files[0].exists() and not files[1].exists() and files[2].exists()
    assert (task / "train" / rows[0][2] / files[0].name).is_file()
    assert (task / "_removed" / "train" / files[1].parent.name / files[1].name).is_file()
    logs = list((task / "_cleaning").glob("*.csv"))
    assert len(logs) == 1 and len(pd.read_csv(logs[0])) == 3

    undone = clean(runner, task, "--undo", str(logs[0]))
    assert undone.exit_code == 0, undone.output
    images = lambda t: {k: v for k, v in t.items() if not k.startswith("_cleaning/")}  # noqa: E731
    assert images(tree(task)) == images(before)
    again = clean(runner, task, "--undo", str(logs[0]))
    assert again.exit_code == 2 and "cannot read cleaning log" in again.output


@pytest.mark.parametrize(
    "make_row, message",
    [
        (
            lambda t, tmp: (str(make_image(tmp / "elsewhere" / "x.jpg")), "remove", ""),
            "not a photo in",
        ),
        (
            lambda t, tmp: (str(next((t / "train" / "bedroom").iterdir())), "relabel", "garage"),
            "unknown class 'garage'",
        ),
        (lambda t, tmp: (str(t / "train" / "bedroom" / "gone.jpg"), "remove", ""), "no such file"),
        (
            lambda t, tmp: (str(next((t / "train" / "bedroom").iterdir())), "relabel", "bedroom"),
            "already labelled",
        ),
        (
            lambda t, tmp: (str(next((t / "train" / "bedroom").iterdir())), "burn", ""),
            "unknown action 'burn'",
        ),
        (
            lambda t, tmp: (
                str(t / "train" / "bedroom" / ".." / ".." / ".." / "x.jpg"),
                "remove",
                "",
            ),
            "not a photo in",
        ),
    ],
)
def test_clean_refuses_bad_rows_and_moves_nothing(task, runner, tmp_path, make_row, message):
    good = (str(sorted((task / "train" / "kitchen").iterdir())[0]), "remove", "")
    decisions = decisions_file(tmp_path, [good, make_row(task, tmp_path)])
    before = tree(task)
    result = clean(runner, task, "--decisions", str(decisions), "--apply")
    assert (
        result.exit_code == 2 and message in result.output and "nothing was moved" in result.output
    )
    assert tree(task) == before


def test_clean_refuses_name_clashes_and_duplicates(task, runner, tmp_path):
    photo = sorted((task / "train" / "bedroom").iterdir())[0]
    shutil.copy(photo, task / "train" / "kitchen" / photo.name)  # same name in the target class
    before = tree(task)
    result = clean(
        runner,
        task,
        "--decisions",
        str(decisions_file(tmp_path, [(str(photo), "relabel", "kitchen")])),
        "--apply",
    )
    assert result.exit_code == 2 and "name clash" in result.output and tree(task) == before
    result = clean(
        runner, task, "--decisions", str(decisions_file(tmp_path, [(str(photo), "remove", "")] * 2))
    )
    assert result.exit_code == 2 and "appears twice" in result.output


def test_undo_refuses_when_a_moved_file_changed(task, runner, tmp_path):
    photo = sorted((task / "valid" / "bathroom").iterdir())[0]
    assert (
        clean(
            runner,
            task,
            "--decisions",
            str(decisions_file(tmp_path, [(str(photo), "remove", "")])),
            "--apply",
        ).exit_code
        == 0
    )
    moved = task / "_removed" / "valid" / "bathroom" / photo.name
    moved.write_bytes(b"edited")
    log = next((task / "_cleaning").glob("*.csv"))
    result = clean(runner, task, "--undo", str(log))
    assert (
        result.exit_code == 2 and "changed since it was moved" in result.output and moved.exists()
    )


def test_a_cleaned_task_still_trains(task, runner, tmp_path):
    photo = sorted((task / "train" / "bathroom").iterdir())[0]
    clean(
        runner,
        task,
        "--decisions",
        str(decisions_file(tmp_path, [(str(photo), "remove", "")])),
        "--apply",
    )
    cfg = RunConfig(
        "rooms",
        "resnet18",
        epochs=1,
        size=32,
        pretrained=False,
        onnx=False,
        workers=0,
        data_dir=task.parent,
        exports_dir=tmp_path / "exports",
    )
    run_dir = train.run(cfg, log=lambda *a: None)
    assert (
        json.loads((run_dir / "metrics.json").read_text())["n_train"] == 11
    )  # _removed/ is not trained on


# --- predict ------------------------------------------------------------------------------------


def test_predict_agrees_with_the_learners_own_predict(trained, runner, tmp_path):
    root, run_dir = trained
    photos = sorted((root / "data" / "rooms" / "valid").rglob("*.jpg"))[:4]
    out = tmp_path / "tags.csv"
    result = runner.invoke(app, ["predict", str(run_dir), *map(str, photos), "--out", str(out)])
    assert result.exit_code == 0, result.output
    table = pd.read_csv(out, keep_default_na=False)
    learn = load_learner(run_dir / "export.pkl")
    for row in table.itertuples():
        label, _, probs = learn.predict(row.path)
        assert row.rooms_predicted == label
        assert np.allclose(
            [getattr(row, f"rooms_p_{c}") for c in learn.dls.vocab], probs.numpy(), atol=1e-4
        )


def test_a_symlink_loop_under_a_predict_folder_tags_each_photo_once(trained, runner, tmp_path):
    root, run_dir = trained
    photos = tmp_path / "photos"
    for i in range(5):
        make_image(photos / f"{i}.jpg", seed=i)
    (photos / "self").symlink_to(photos, target_is_directory=True)  # photos/self/self/... forever
    out = tmp_path / "tags.csv"
    result = runner.invoke(app, ["predict", str(run_dir), str(photos), "--out", str(out)])
    assert result.exit_code == 0, result.output
    table = pd.read_csv(out)
    assert len(table) == 5 and sorted(Path(p).name for p in table.path) == [
        f"{i}.jpg" for i in range(5)
    ]


def test_predict_survives_bad_files_and_odd_images(trained, runner, tmp_path):
    root, run_dir = trained
    photos = odd_photos(tmp_path / "photos")
    out = tmp_path / "tags.json"
    result = runner.invoke(
        app,
        ["predict", str(run_dir), str(photos), "--out", str(out), "--format", "json", "--bs", "3"],
    )
    assert result.exit_code == 0, result.output
    rows = {r["path"].split("/")[-1]: r for r in json.loads(out.read_text())}
    assert set(rows) == {
        "good.jpg",
        "zero.jpg",
        "text.jpg",
        "truncated.jpg",
        "gray.png",
        "alpha.png",
        "cmyk.jpg",
        "sixteen.png",
        "huge.jpg",
    }
    for bad in ("zero.jpg", "text.jpg", "truncated.jpg"):
        assert rows[bad]["error"] and rows[bad]["rooms_predicted"] is None
        assert f"unreadable: {photos / bad}" in result.output
    for ok in ("good.jpg", "gray.png", "alpha.png", "cmyk.jpg", "sixteen.png", "huge.jpg"):
        assert rows[ok]["error"] == "" and rows[ok]["rooms_predicted"] in (
            "bathroom",
            "bedroom",
            "kitchen",
        )


def test_predict_puts_models_side_by_side_and_summarises_listings(trained, runner, tmp_path):
    root, run_dir = trained
    cfg = RunConfig(
        "rooms",
        "alexnet",
        epochs=1,
        size=64,
        pretrained=False,
        workers=0,
        data_dir=root / "data",
        exports_dir=tmp_path / "exports",
    )
    other = train.run(cfg, log=lambda *a: None)
    photos = tmp_path / "listing-photos"
    for house in (1, 2):
        for room, color in (("kitchen", (60, 180, 60)), ("bedroom", (200, 60, 40))):
            make_image(photos / f"{house}_{room}.jpg", color, seed=house)
    out = tmp_path / "tags.csv"
    result = runner.invoke(
        app,
        [
            "predict",
            str(run_dir),
            str(other),
            str(photos),
            "--out",
            str(out),
            "--listing-pattern",
            r"^(\d+)_",
        ],
    )
    assert result.exit_code == 0, result.output
    table = pd.read_csv(out)
    assert len(table) == 4
    assert {"rooms_resnet18-unfrozen_predicted", "rooms_alexnet-frozen_predicted"} <= set(
        table.columns
    )
    listings = pd.read_csv(tmp_path / "tags_listings.csv")
    assert list(listings.listing) == [1, 2] and list(listings.photos) == [2, 2]
    col = "max_rooms_resnet18-unfrozen_p_kitchen"
    for house in (1, 2):
        mine = table[table.path.str.contains(f"/{house}_")]["rooms_resnet18-unfrozen_p_kitchen"]
        assert listings.set_index("listing").loc[house, col] == pytest.approx(mine.max())
    assert "rooms_resnet18-unfrozen_has_kitchen" in listings.columns


def test_predict_needs_a_model_and_images(trained, runner, tmp_path):
    root, run_dir = trained
    result = runner.invoke(app, ["predict", str(tmp_path)])
    assert result.exit_code == 2 and "give one or more models" in result.output
    result = runner.invoke(app, ["predict", str(run_dir), str(tmp_path / "missing")])
    assert result.exit_code == 2 and "does not exist" in result.output
