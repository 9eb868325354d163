"""The real Houses photos end to end, imported once for the session by `replicate data houses`
(conftest.houses): the import's counts and split, the audit's known groups, the DataLoaders a run builds. The
three Houses attributes in one bundle: tests/test_shared_body.py.

    python -m pytest tests/test_houses.py
"""

from __future__ import annotations

import pandas as pd
from test_audit import run_audit
from test_sources import house_ids

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


def test_houses_load_as_the_study_s_dataloaders(houses):
    """The real listing photos, as `replicate data houses` imported them, through the fastai
    DataBlock a run builds: every photo in its split, a batch of each at the run's size. (Training
    on them: the README's tour in tests/test_shared_body.py, and the accuracy with real weights in
    tests/test_transfer.py.)"""
    import torch

    from replicate.config import RunConfig
    from replicate.models import archs

    cfg = RunConfig(
        "rooms", "resnet18", size=64, bs=16, workers=0, pretrained=False, data_dir=houses
    )
    scan = dataloaders.scan_task(cfg.task_dir)
    dls = dataloaders.dataloaders(scan, cfg, archs.resolve(cfg).preprocess, torch.device("cpu"))
    assert len(dls.train_ds) == 1284 and len(dls.valid_ds) == 321
    assert list(dls.vocab) == ["bathroom", "bedroom", "kitchen"]
    for dl in (dls.train, dls.valid):
        xb, yb = dl.one_batch()
        assert tuple(xb.shape) == (16, 3, 64, 64) and int(yb.max()) <= 2
    assert scan.counts.values.sum() == 1605
