"""Runs that share a body: recorded in the run folder, run once by `predict` for all their heads.

Three runs keep the pretrained tf_efficientnet_lite0 body untouched (frozen, --freeze-bn) on two
tasks; a fourth (resnet18 from random init) shares nothing. Tagged together, the three get one body
pass per batch and must give the probabilities each gives alone.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import ROOMS, make_task

from replicate import onnx_engine, runs, train
from replicate.cli import app
from replicate.config import RunConfig

LITE = "tf_efficientnet_lite0"


def quiet(*args, **kwargs) -> None:
    pass


@pytest.fixture(scope="module")
def four(tmp_path_factory) -> tuple[list[Path], Path]:
    """([three runs on one lite0 body, one resnet18 run], a folder of photos to tag)."""
    root = tmp_path_factory.mktemp("shared")
    make_task(root / "data" / "rooms", classes=ROOMS)
    make_task(root / "data" / "kitchen", classes={"yes": (200, 180, 60), "no": (40, 60, 200)})
    where = dict(data_dir=root / "data", exports_dir=root / "exports", workers=0, audit=False)
    shared = dict(epochs=3, cache_features=1, freeze_bn=True, **where)
    made = [
        train.run(RunConfig("rooms", LITE, **shared), log=quiet),
        train.run(RunConfig("rooms", LITE, seed=43, **shared), log=quiet),
        train.run(RunConfig("kitchen", LITE, **shared), log=quiet),
        train.run(RunConfig("rooms", "resnet18", epochs=1, size=32, pretrained=False, **where)),
    ]
    return made, root / "data" / "rooms" / "valid"


def test_a_run_records_its_body_and_writes_its_head(four):
    made, _ = four
    bodies = [runs.Run(d).config["body"] for d in made]
    assert bodies[3] is None and not runs.Run(made[3]).head.is_file()
    assert bodies[0]["key"] == bodies[1]["key"] == bodies[2]["key"]
    assert bodies[0]["arch"] == LITE and bodies[0]["frozen_eval"] and bodies[0]["weights_sha256"]
    for d in made[:3]:
        run = runs.Run(d)
        assert run.head.is_file() and set(run.metrics["checksums"]) >= {"model.onnx", "head.onnx"}
        assert onnx_engine.load_onnx(d).body == bodies[0]["key"]


def test_models_on_one_body_run_it_once_and_tag_as_they_do_alone(four, monkeypatch):
    made, photos = four
    files = sorted(photos.rglob("*.jpg"))
    models = [onnx_engine.load_onnx(d, name=f"m{i}") for i, d in enumerate(made)]
    assert [len(g) for g in onnx_engine.sharing(models)] == [3, 1]
    passes = []

    def spy(m, method):
        real = getattr(m, method)
        return lambda batch: passes.append((m.name, method)) or real(batch)

    for m in models:
        for method in ("probabilities", "with_features"):
            monkeypatch.setattr(m, method, spy(m, method))
    together = onnx_engine.tag_onnx(models, files, bs=4, workers=0, progress=False)
    batches = -(-len(files) // 4)
    assert sorted(set(passes)) == [("m0", "with_features"), ("m3", "probabilities")]
    assert len(passes) == 2 * batches  # one body pass per batch for the three, one for the other
    monkeypatch.undo()
    for m in models:
        alone = onnx_engine.tag_onnx([m], files, bs=4, workers=0, progress=False)
        columns = [c for c in alone.columns if c.startswith(f"{m.name}_")]
        assert (together[f"{m.name}_predicted"] == alone[f"{m.name}_predicted"]).all()
        diff = np.abs(together[columns[1:]].to_numpy() - alone[columns[1:]].to_numpy()).max()
        assert diff <= 1e-5, (m.name, diff)


def test_predict_tags_shared_and_unshared_models_in_one_call(four, runner, tmp_path):
    made, photos = four
    together, alone = tmp_path / "together.csv", tmp_path / "alone.csv"
    result = runner.invoke(app, ["predict", *map(str, made), str(photos), "--out", str(together)])
    assert result.exit_code == 0, result.output
    assert "4 model(s) on 2 body pass(es)" in result.output
    assert (
        runner.invoke(app, ["predict", str(made[2]), str(photos), "--out", str(alone)]).exit_code
        == 0
    )
    a, b = pd.read_csv(together), pd.read_csv(alone)
    kitchen = ["kitchen_p_no", "kitchen_p_yes"]  # the one kitchen model: named by its task
    assert (a.path == b.path).all() and np.abs(
        a[kitchen].to_numpy() - b[kitchen].to_numpy()
    ).max() <= 1e-5


def test_export_adds_the_body_and_head_to_a_run_folder_from_before(four, tmp_path):
    made, _ = four
    old = tmp_path / "old" / made[0].name
    shutil.copytree(made[0], old)
    config = json.loads((old / runs.CONFIG).read_text())
    del config["body"]
    (old / runs.CONFIG).write_text(json.dumps(config))
    (old / runs.HEAD).unlink()
    assert onnx_engine.load_onnx(old).head is None  # as before: tagged alone
    from replicate import export

    export.export_run(old)
    assert runs.Run(old).config["body"]["key"] == runs.Run(made[0]).config["body"]["key"]
    assert (old / runs.HEAD).is_file() and onnx_engine.load_onnx(old).body is not None
