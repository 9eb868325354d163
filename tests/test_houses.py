"""The real Houses photos end to end, imported once for the session by `replicate data houses`
(conftest.houses): the import's counts and split, the audit's known groups, one short run. The
three Houses attributes in one bundle: tests/test_shared_body.py.

    python -m pytest tests/test_houses.py
"""

from __future__ import annotations

import json

import pandas as pd
from test_audit import run_audit
from test_sources import house_ids
from test_train import run_cli

from replicate import folders
from replicate.audit import checks
from replicate.training import dataloaders


def test_real_houses_zip_gives_535_photos_per_room_split_80_20(houses):
    tasks = {t: houses / t for t in ("rooms", "exterior")}
    counts = dataloaders.scan_task(tasks["rooms"]).counts
    assert (counts.sum(axis=1) == 535).all()
    assert (counts["valid"] == 107).all()  # round(535 * 0.2)
    assert house_ids(tasks["rooms"] / "train").isdisjoint(house_ids(tasks["rooms"] / "valid"))
    ext = dataloaders.scan_task(tasks["exterior"]).counts
    assert ext.loc["frontal"].sum() == 535 and ext.loc["indoor"].sum() == 3 * 535
    kitchen = dataloaders.scan_task(houses / "kitchen").counts  # yes/no: "is it a kitchen?"
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
    ext = checks.audit_task(
        data_dir / "exterior", dataloaders.scan_task(data_dir / "exterior").files
    )
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
    assert dataloaders.scan_task(houses / "rooms").counts.values.sum() == 1605
