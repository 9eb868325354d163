"""A yes/no task as a search filter: the threshold for a target precision on valid, its
precision-recall curve in the run folder and the report, and `predict` applying it per photo and
per listing.

    python -m pytest tests/test_filters.py
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from conftest import COLORS, folders_args, make_image
from typer.testing import CliRunner

from replicate.cli import app
from replicate.engine import filters
from replicate.errors import ReplicateError


def predictions(
    yes: list[float], no: list[float], positive: str = "yes", other: str = "no"
) -> pd.DataFrame:
    """valid_predictions.csv's columns for photos of `positive` scoring `yes` and of `other` scoring `no`."""
    score = np.array(yes + no)
    return pd.DataFrame(
        {
            "path": [f"{k}.jpg" for k in range(len(score))],
            "actual": [positive] * len(yes) + [other] * len(no),
            f"p_{positive}": score,
            f"p_{other}": 1 - score,
        }
    )


def test_the_threshold_keeps_the_most_recall_at_the_target_precision():
    # By score: Y .9, N .85, Y .8, Y .7, N .6, Y .4, N .3, N .2, N .1, N .05
    preds = predictions([0.9, 0.8, 0.7, 0.4], [0.85, 0.6, 0.3, 0.2, 0.1, 0.05])
    found = filters.search_filter(preds, ["no", "yes"], "balcony", target=0.75)
    # precision >= 0.75 at p >= .9 (1 of 1, recall .25) and at p >= .7 (3 of 4, recall .75): the second
    assert (found["threshold"], found["precision"], found["recall"]) == (0.7, 0.75, 0.75)
    assert (
        found["column"] == "has_balcony"
        and found["positive"] == "yes"
        and found["valid_positives"] == 4
    )
    strict = filters.search_filter(preds, ["no", "yes"], "balcony", target=0.8)
    assert (strict["threshold"], strict["precision"], strict["recall"]) == (0.9, 1.0, 0.25)
    never = filters.search_filter(
        predictions([0.5, 0.4], [0.9, 0.1]), ["no", "yes"], "balcony", target=0.9
    )
    assert (
        never["threshold"] is None and never["recall"] is None
    )  # the top photo is a "no": 0.9 is out of reach
    assert (
        filters.search_filter(preds.assign(actual="x"), ["x", "y", "z"], "rooms") is None
    )  # not two classes


def test_the_filters_class_is_named_yes_or_the_rarer_one():
    preds = predictions([0.9], [0.2, 0.1], positive="frontal", other="indoor")
    assert (
        filters.search_filter(preds, ["frontal", "indoor"], "exterior")["column"] == "has_frontal"
    )
    assert (
        filters.search_filter(preds, ["frontal", "indoor"], "exterior", positive="indoor")["column"]
        == "has_indoor"
    )
    with pytest.raises(ReplicateError, match="--positive pool"):
        filters.search_filter(preds, ["frontal", "indoor"], "exterior", positive="pool")


@pytest.fixture(scope="module")
def balcony(tmp_path_factory):
    """data/balcony: yes (red) and no (blue) photos named <listing>_<k>.jpg, 2 photos a listing;
    one short run with --target-precision 0.6. Returns (data folder, run folder)."""
    root = tmp_path_factory.mktemp("filters")
    seed = 0
    for split, listings in (("train", range(0, 12)), ("valid", range(100, 110))):
        for listing in listings:
            for k in range(2):
                seed += 1
                label = (
                    "yes" if (listing % 3 == 0 and k == 0) else "no"
                )  # a third of listings show one
                make_image(
                    root / "data" / "balcony" / split / label / f"{listing}_{k}.jpg",
                    COLORS["red" if label == "yes" else "blue"],
                    seed=seed,
                )
    result = CliRunner().invoke(
        app,
        [
            "run",
            "balcony",
            "--arch",
            "resnet18",
            "--unfreeze",
            "--epochs",
            "3",
            "--bs",
            "4",
            "--size",
            "32",
            "--no-pretrained",
            "--workers",
            "0",
            "--target-precision",
            "0.6",
            "--onnx",
            *folders_args(root / "data", root / "exports"),
        ],
    )
    assert result.exit_code == 0, result.output
    return root / "data", root / "exports" / "balcony" / "resnet18-unfrozen"


def test_a_yes_no_run_records_its_filter_and_curve(balcony):
    _, run = balcony
    found = json.loads((run / "filter.json").read_text())
    preds = pd.read_csv(run / "valid_predictions.csv")
    assert found == filters.search_filter(
        preds, ["no", "yes"], "balcony", target=0.6
    )  # rebuilt from the folder
    assert found["column"] == "has_balcony" and found["target_precision"] == 0.6
    assert (run / "pr_curve.png").stat().st_size > 5000
    assert json.loads((run / "config.json").read_text())["target_precision"] == 0.6


def test_predict_applies_the_threshold_per_photo_and_per_listing(balcony, runner, tmp_path):
    data_dir, run = balcony
    found = json.loads((run / "filter.json").read_text())
    assert found["threshold"] is not None  # red against blue: 3 short epochs reach precision 0.6
    out = tmp_path / "tags.csv"
    result = runner.invoke(
        app,
        [
            "predict",
            str(run),
            str(data_dir / "balcony" / "valid"),
            "--out",
            str(out),
            "--listing-pattern",
            r"^(\d+)_",
        ],
    )
    assert result.exit_code == 0, result.output
    tags = pd.read_csv(out)
    assert (tags.balcony_has_balcony == (tags.balcony_p_yes >= found["threshold"])).all()
    per_listing = pd.read_csv(tmp_path / "tags_listings.csv", dtype={"listing": str})
    any_photo = (
        tags.assign(listing=tags.path.str.extract(r"/(\d+)_\d\.jpg$")[0])
        .groupby("listing")
        .balcony_has_balcony.any()
    )
    assert per_listing.set_index("listing").balcony_has_balcony.to_dict() == any_photo.to_dict()
    rule = json.loads((tmp_path / "tags_listings_filters.json").read_text())["balcony"]
    preds = pd.read_csv(run / "valid_predictions.csv")
    listing = preds.path.str.extract(r"/(\d+)_\d\.jpg$")[0]
    truth = (preds.actual == "yes").groupby(listing).any()
    shown = (preds.p_yes >= found["threshold"]).groupby(listing).any()
    assert rule["valid_listings"] == 10 and rule["valid_listings_with"] == int(truth.sum()) == 3
    expected_recall = (truth & shown).sum() / truth.sum()
    assert rule["listing_recall"] == pytest.approx(expected_recall)
    assert "a listing has it when any photo passes" in result.output


def test_positive_must_be_a_class_of_a_two_class_task(balcony, runner, tmp_path):
    data_dir, _ = balcony
    result = runner.invoke(
        app,
        [
            "run",
            "balcony",
            "--arch",
            "resnet18",
            "--positive",
            "pool",
            "--no-pretrained",
            *folders_args(data_dir, tmp_path),
        ],
    )
    assert result.exit_code == 2 and result.output.startswith("error: --positive pool")


def test_compare_reports_the_filter_and_applies_its_target_to_a_reused_run(balcony, runner):
    data_dir, run = balcony
    result = runner.invoke(
        app,
        [
            "compare",
            "balcony",
            "--archs",
            "resnet18",
            "--modes",
            "unfrozen",
            "--epochs",
            "3",
            "--bs",
            "4",
            "--size",
            "32",
            "--no-pretrained",
            "--workers",
            "0",
            "--target-precision",
            "0.5",
            *folders_args(data_dir, run.parent.parent),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "reusing finished run" in result.output
    found = json.loads((run / "filter.json").read_text())
    assert found["target_precision"] == 0.5 and found["precision"] >= 0.5
    table = pd.read_csv(run.parent / "compare" / "table.csv")
    assert table.threshold.iloc[0] == pytest.approx(found["threshold"], abs=1e-4)
    assert table.filter_recall.iloc[0] == pytest.approx(found["recall"], abs=1e-4)
    assert "pr_curve.png" in (run.parent / "compare" / "report.html").read_text()
