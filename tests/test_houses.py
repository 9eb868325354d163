"""The real Houses photos end to end, imported once for the session by `replicate data houses`
(conftest.houses): the import's counts and split, the audit's known groups, one short run, and
three Houses attributes in one bundle that a plain ONNX Runtime script runs as `predict` does.

    python -m pytest tests/test_houses.py
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
from test_audit import run_audit
from test_shared_body import probability_columns, tag_alone
from test_sources import house_ids
from test_train import run_cli

from replicate import audit, data, folders, train
from replicate.cli import app
from replicate.config import RunConfig


def test_real_houses_zip_gives_535_photos_per_room_split_80_20(houses):
    tasks = {t: houses / t for t in ("rooms", "exterior")}
    counts = data.scan_task(tasks["rooms"]).counts
    assert (counts.sum(axis=1) == 535).all()
    assert (counts["valid"] == 107).all()  # round(535 * 0.2)
    assert house_ids(tasks["rooms"] / "train").isdisjoint(house_ids(tasks["rooms"] / "valid"))
    ext = data.scan_task(tasks["exterior"]).counts
    assert ext.loc["frontal"].sum() == 535 and ext.loc["indoor"].sum() == 3 * 535
    kitchen = data.scan_task(houses / "kitchen").counts  # yes/no: "is it a kitchen?"
    assert kitchen.loc["yes"].sum() == 535 and kitchen.loc["no"].sum() == 3 * 535
    assert (kitchen.loc["yes"] == counts.loc["kitchen"]).all()  # the same split


def test_real_houses_audit_finds_the_known_groups_and_a_fresh_import_does_not_leak(houses, runner):
    data_dir = houses
    result, out = run_audit(runner, data_dir)
    findings = pd.read_csv(out / "audit.csv", keep_default_na=False)
    groups = [set(f.split(";")) for f in findings.files]
    names = lambda g: {p.split("/")[-1] for p in g}  # noqa: E731
    for pair in (
        {"199_bathroom.jpg", "214_bathroom.jpg"},
        {"9_bedroom.jpg", "21_bedroom.jpg"},
        {"259_bathroom.jpg", "296_bathroom.jpg"},
        {"227_bedroom.jpg", "227_kitchen.jpg"},
    ):
        assert any(names(g) == pair for g in groups), pair
    conflicts = {
        frozenset(names(f.split(";"))) for f in findings[findings.finding == "conflict"].files
    }
    assert {next(iter(c)).split("_")[0] for c in conflicts} == {"227", "343", "466", "354", "12"}
    assert all(len({n.split("_")[0] for n in c}) == 1 for c in conflicts)  # each within one house
    assert (findings.finding == "leak").sum() == 0  # the import kept linked houses together
    ext = audit.audit_task(data_dir / "exterior", data.scan_task(data_dir / "exterior").files)
    assert ext.counts()["leak_groups"] == 0
    for task in ("rooms", "exterior"):
        counts = folders.image_counts(data_dir / task)
        share = counts["valid"] / counts.sum(axis=1)
        assert share.between(0.18, 0.22).all(), counts


def test_houses_end_to_end(houses, runner):
    """The real listing photos, as `replicate data houses` imported them: one short unfrozen run of the
    study's smallest backbone."""
    result, exports = run_cli(
        runner, houses, "rooms", "--arch", "resnet18", "--epochs", "1", "--size", "64", "--unfreeze"
    )
    assert result.exit_code == 0, result.output
    metrics = json.loads((exports / "rooms" / "resnet18-unfrozen" / "metrics.json").read_text())
    assert metrics["n_train"] == 1284 and metrics["n_valid"] == 321
    assert metrics["best_valid_accuracy"] > 0.4  # 3 balanced classes: chance is 1/3
    assert data.scan_task(houses / "rooms").counts.values.sum() == 1605


def test_three_houses_attributes_in_one_bundle_tag_alone_as_predict_does(houses, runner, tmp_path):
    """rooms, exterior and the kitchen filter, each a lite0 head on its pip-installed ImageNet
    body, trained on a few real photos per class; bundled; the bundle's own script, in a fresh
    interpreter with onnxruntime, numpy and Pillow alone, against `predict` on the valid photos."""
    data_dir, made = tmp_path / "data", []
    for task in ("rooms", "exterior", "kitchen"):
        for split, n in (("train", 8), ("valid", 6)):
            for folder in sorted((houses / task / split).iterdir()):
                (data_dir / task / split / folder.name).mkdir(parents=True)
                for photo in sorted(folder.glob("*.jpg"))[:n]:
                    shutil.copy(photo, data_dir / task / split / folder.name)
        cfg = RunConfig(task, "tf_efficientnet_lite0", epochs=2, cache_features=1, freeze_bn=True,
                        workers=0, audit=False, data_dir=data_dir, exports_dir=tmp_path / "exports")  # fmt: skip
        made.append(train.run(cfg, log=lambda *a, **k: None))
    tagger = tmp_path / "tagger"
    result = runner.invoke(app, ["bundle", *map(str, made), "--out", str(tagger)])
    assert result.exit_code == 0, result.output
    photos = [data_dir / task / "valid" for task in ("rooms", "exterior", "kitchen")]
    result = runner.invoke(
        app, ["predict", str(tagger), *map(str, photos), "--out", str(tmp_path / "p.csv")]
    )
    assert result.exit_code == 0, result.output
    done = tag_alone(tagger / "tag.py", *photos, "--out", tmp_path / "alone.csv")
    assert done.returncode == 0, done.stderr
    a, b = pd.read_csv(tmp_path / "p.csv"), pd.read_csv(tmp_path / "alone.csv")
    assert len(a) == 3 * 6 + 2 * 6 + 2 * 6 and list(a.columns) == list(b.columns)
    assert (a.path == b.path).all() and (a.error.isna()).all()
    columns = probability_columns(a)
    assert {c.split("_p_")[0] for c in columns} == {"rooms", "exterior", "kitchen"}
    assert np.abs(a[columns].to_numpy() - b[columns].to_numpy()).max() <= 1e-5
    for name in ("rooms", "exterior", "kitchen"):
        assert (a[f"{name}_predicted"] == b[f"{name}_predicted"]).all()
