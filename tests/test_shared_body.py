"""Runs that share a body: recorded in the run folder, run once by `predict` for all their heads.

Three runs keep the pretrained tf_efficientnet_lite0 body untouched (frozen, --freeze-bn), one per
Houses attribute (rooms, exterior, kitchen); a fourth (resnet18 from random init) shares nothing.
Tagged together, the three get one body pass per batch and must give the probabilities each gives
alone; bundled, they are one file, which predict and the bundle's own script run alike.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import HOUSES_ZIP, ROOMS, make_task
from typer.testing import CliRunner

from replicate import runs
from replicate.cli import app
from replicate.config import RunConfig
from replicate.data.sources import HOUSE_PHOTO
from replicate.engine import onnx_models
from replicate.training import train

LITE = "tf_efficientnet_lite0"


def quiet(*args, **kwargs) -> None:
    pass


TASKS = {  # the three Houses attributes; their colours where the Houses zip is not here
    "rooms": ROOMS,
    "exterior": {"frontal": (90, 160, 220), "indoor": (160, 120, 80)},
    "kitchen": {"yes": (200, 180, 60), "no": (40, 60, 200)},
}


def houses_subset(data_dir: Path, n: int = 4) -> None:
    """The three Houses tasks as `replicate data houses` lays them out, on the real photos of the
    zip's first `n` houses (train) and the next `n` (valid): read straight from the zip, cheaper
    than the whole import for a dozen photos a class."""
    with zipfile.ZipFile(HOUSES_ZIP) as zf:
        found = {
            (int(m[1]), m[2]): i for i in zf.infolist() if (m := HOUSE_PHOTO.search(i.filename))
        }
        houses = sorted({h for h, _ in found})
        for split, chosen in (("train", houses[:n]), ("valid", houses[n : 2 * n])):
            for house in chosen:
                for room in ("bathroom", "bedroom", "kitchen", "frontal"):
                    data, name = zf.read(found[house, room]), f"{house}_{room}.jpg"
                    classes = {
                        "rooms": None if room == "frontal" else room,
                        "exterior": "frontal" if room == "frontal" else "indoor",
                        "kitchen": "yes" if room == "kitchen" else "no",
                    }
                    for task, label in classes.items():
                        if label:
                            (data_dir / task / split / label).mkdir(parents=True, exist_ok=True)
                            (data_dir / task / split / label / name).write_bytes(data)


@pytest.fixture(scope="module")
def four(tmp_path_factory) -> tuple[list[Path], Path]:
    """([the three Houses attributes as lite0 heads on one body, one resnet18 run], a folder of
    photos to tag). Trained on a few real Houses photos per class, or on coloured noise where the
    Houses zip is not beside the repo."""
    root = tmp_path_factory.mktemp("shared")
    if HOUSES_ZIP.is_file():
        houses_subset(root / "data")
    else:
        for task, classes in TASKS.items():
            make_task(root / "data" / task, classes=classes)
    where = dict(data_dir=root / "data", exports_dir=root / "exports", workers=0, audit=False)
    # target precision 0.2, below the valid photos' share of kitchens (1 in 4): the lowest threshold
    # reaches it, so kitchen has a filter however little a few photos taught it
    shared = dict(epochs=2, cache_features=1, freeze_bn=True, target_precision=0.2, **where)
    made = [train.run(RunConfig(task, LITE, **shared), log=quiet) for task in TASKS]
    made.append(
        train.run(RunConfig("rooms", "resnet18", epochs=1, size=32, pretrained=False, **where))
    )
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
        assert onnx_models.load_onnx(d).body == bodies[0]["key"]


def test_models_on_one_body_run_it_once_and_tag_as_they_do_alone(four, monkeypatch):
    made, photos = four
    files = sorted(photos.rglob("*.jpg"))
    models = [onnx_models.load_onnx(d, name=f"m{i}") for i, d in enumerate(made)]
    assert [len(g) for g in onnx_models.sharing(models)] == [3, 1]
    passes = []

    def spy(m, method):
        real = getattr(m, method)
        return lambda batch: passes.append((m.name, method)) or real(batch)

    for m in models:
        for method in ("probabilities", "with_features"):
            monkeypatch.setattr(m, method, spy(m, method))
    together = onnx_models.tag_onnx(models, files, bs=4, workers=0, progress=False)
    batches = -(-len(files) // 4)
    assert sorted(set(passes)) == [("m0", "with_features"), ("m3", "probabilities")]
    assert len(passes) == 2 * batches  # one body pass per batch for the three, one for the other
    monkeypatch.undo()
    for m in models:
        alone = onnx_models.tag_onnx([m], files, bs=4, workers=0, progress=False)
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
    assert onnx_models.load_onnx(old).head is None  # as before: tagged alone
    from replicate.training import export

    export.export_run(old)
    assert runs.Run(old).config["body"]["key"] == runs.Run(made[0]).config["body"]["key"]
    assert (old / runs.HEAD).is_file() and onnx_models.load_onnx(old).body is not None


# --- bundles: the three runs on one body in one file ---------------------------------------------

# Run in a fresh interpreter (-I: no site-packages of the user, not the working directory): the
# bundle's own tag.py, which must need nothing but onnxruntime, numpy and Pillow.
ALONE = """
import runpy, sys
sys.argv = [sys.argv[1], *sys.argv[2:]]
runpy.run_path(sys.argv[0], run_name="__main__")
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("replicate", "torch", "fastai", "pandas"))
assert not heavy, heavy
"""


def tag_alone(script: Path, *args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-I", "-c", ALONE, str(script), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture(scope="module")
def bundled(four, tmp_path_factory) -> Path:
    """`replicate bundle` of the three runs on one body (with int8), as a user runs it."""
    made, _ = four
    out = tmp_path_factory.mktemp("bundle") / "tagger"
    result = CliRunner().invoke(
        app,
        ["bundle", *map(str, made[:3]), "--out", str(out), "--quantize", "int8",
         "--calibration", "12", "--listing-pattern", r"^(\w+?)_"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "3 attribute(s)" in result.output and "int8 kitchen: valid accuracy" in result.output
    return out


def probability_columns(table: pd.DataFrame) -> list[str]:
    return [c for c in table.columns if "_p_" in c]


def test_a_bundle_is_one_file_with_an_output_per_attribute_and_its_metadata(four, bundled):
    import onnx

    made, _ = four
    proto = onnx.load(bundled / runs.BUNDLE)
    names = [o.name for o in proto.graph.output]
    assert names == list(TASKS) and [i.name for i in proto.graph.input] == ["input"]
    meta = json.loads(proto.metadata_props[0].value)
    kitchen = meta["attributes"][2]
    assert kitchen["classes"] == ["no", "yes"] and kitchen["filter"]["column"] == "has_kitchen"
    assert (
        kitchen["filter"]["threshold"]
        == json.loads((made[2] / "filter.json").read_text())["threshold"]
    )
    assert kitchen["listing_rule"]["pattern"] == r"^(\w+?)_"
    assert kitchen["source"]["checksums"] == {
        k: v
        for k, v in runs.Run(made[2]).metrics["checksums"].items()
        if k in (runs.ONNX, runs.HEAD)
    }
    assert meta["body"] == runs.Run(made[0]).config["body"]["key"]
    # one body: the bundle is about one model.onnx, not three
    assert (bundled / runs.BUNDLE).stat().st_size < 1.2 * (made[0] / runs.ONNX).stat().st_size
    manifest = json.loads((bundled / runs.MANIFEST).read_text())
    assert set(manifest["checksums"]) == {runs.BUNDLE, runs.BUNDLE_INT8, "tag.py", "photos.py"}
    assert set(manifest["int8"]["attributes"]) == {a["name"] for a in meta["attributes"]}


def test_predict_takes_a_bundle_where_it_takes_run_folders(four, bundled, runner, tmp_path):
    made, photos = four
    by_runs, by_bundle = tmp_path / "runs.csv", tmp_path / "bundle.csv"
    result = runner.invoke(
        app, ["predict", *map(str, made[:3]), str(photos), "--out", str(by_runs)]
    )
    assert result.exit_code == 0, result.output
    result = runner.invoke(  # the bundle and a run that shares nothing: both paths in one call
        app,
        ["predict", str(bundled), str(made[3]), str(photos), "--out", str(by_bundle),
         "--listing-pattern", r"^(\w+?)_"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "4 model(s) on 2 body pass(es)" in result.output and "warning" not in result.output
    a, b = pd.read_csv(by_runs), pd.read_csv(by_bundle)
    # two rooms models in one call: each named by its task and folder, as predict names them
    b.columns = [c.replace(f"rooms_{bundled.name}_", "rooms_") for c in b.columns]
    assert set(a.columns) < set(b.columns) and (a.path == b.path).all()
    assert f"rooms_{made[3].name}_predicted" in b.columns  # the resnet18 run, tagged as before
    columns = probability_columns(a)
    assert np.abs(a[columns].to_numpy() - b[columns].to_numpy()).max() <= 1e-5
    assert (a.kitchen_has_kitchen == b.kitchen_has_kitchen).all()
    rules = json.loads((tmp_path / "bundle_listings_filters.json").read_text())
    assert rules["kitchen"]["listing_precision"] is not None


def test_the_bundles_own_script_tags_alone_as_predict_does(four, bundled, runner, tmp_path):
    made, photos = four
    shutil.copytree(photos, tmp_path / "photos")
    (tmp_path / "photos" / "broken.jpg").write_bytes(b"not a photo")
    moved = tmp_path / "moved"  # the folder alone, away from the run folders
    shutil.copytree(bundled, moved)
    expected = tmp_path / "predict.csv"
    result = runner.invoke(
        app, ["predict", str(moved), str(tmp_path / "photos"), "--out", str(expected)]
    )
    assert result.exit_code == 0, result.output
    done = tag_alone(moved / "tag.py", tmp_path / "photos", "--out", tmp_path / "alone.csv")
    assert done.returncode == 0, done.stderr
    a, b = pd.read_csv(expected, keep_default_na=False), pd.read_csv(tmp_path / "alone.csv",
                                                                     keep_default_na=False)  # fmt: skip
    assert list(a.columns) == list(b.columns) and (a.path == b.path).all()
    ok = a.error == ""
    assert (~ok).sum() == 1 and (b.error[~ok] != "").all()
    columns = probability_columns(a)
    diff = np.abs(a[columns][ok].astype(float).to_numpy() - b[columns][ok].astype(float).to_numpy())
    assert diff.max() <= 1e-5
    assert (a.kitchen_has_kitchen[ok] == b.kitchen_has_kitchen[ok]).all()


def test_an_int8_bundle_tags_and_a_changed_bundle_is_named(bundled, four, runner, tmp_path):
    _, photos = four
    result = runner.invoke(
        app,
        ["predict", str(bundled / runs.BUNDLE_INT8), str(photos), "--out", str(tmp_path / "t.csv")],
    )
    assert result.exit_code == 0 and "warning" not in result.output, result.output
    table = pd.read_csv(tmp_path / "t.csv")
    assert len(probability_columns(table)) == 3 + 2 + 2 and "kitchen_has_kitchen" in table.columns
    changed = tmp_path / "changed"
    shutil.copytree(bundled, changed)
    manifest = json.loads((changed / runs.MANIFEST).read_text())
    manifest["checksums"][runs.BUNDLE] = "0" * 64  # as if the file had changed since
    (changed / runs.MANIFEST).write_text(json.dumps(manifest))
    result = runner.invoke(
        app, ["predict", str(changed), str(photos), "--out", str(tmp_path / "c.csv")]
    )
    assert "does not match the SHA-256" in result.output


def test_bundle_refuses_what_it_cannot_merge(four, bundled, runner, tmp_path):
    made, _ = four
    cases = [
        ([str(made[0]), str(made[3]), "--out", str(tmp_path / "new")], "has no body to share"),
        ([str(bundled), "--out", str(tmp_path / "new")], "is a bundle already"),
        ([str(made[0]), "--out", str(bundled)], "holds a bundle already: --force replaces it"),
        ([str(made[0]), "--out", str(made[1])], "is not a bundle folder"),
    ]
    for args, message in cases:
        result = runner.invoke(app, ["bundle", *args])
        assert result.exit_code == 2, (args, result.output)
        assert message in result.output and "Traceback" not in result.output
    again = tmp_path / "again"
    for _ in range(2):
        result = runner.invoke(app, ["bundle", str(made[2]), "--out", str(again), "--force"])
        assert result.exit_code == 0, result.output
    assert [p.name for p in tmp_path.iterdir()] == ["again"]  # no staging or old folder left


def test_a_bundle_left_half_written_is_swept_by_the_next(four, runner, tmp_path):
    made, _ = four
    left = tmp_path / ".tagger.partial-dead"  # as a killed `bundle` leaves it, long ago
    left.mkdir()
    (left / runs.BUNDLE).write_bytes(b"half")
    os.utime(left, (time.time() - 3600, time.time() - 3600))
    other = tmp_path / ".notes.partial-keep"  # some other folder's: not this bundle's to remove
    other.mkdir()
    os.utime(other, (time.time() - 3600, time.time() - 3600))
    result = runner.invoke(app, ["bundle", str(made[2]), "--out", str(tmp_path / "tagger")])
    assert result.exit_code == 0, result.output
    assert "removed 1 unfinished" in result.output and not left.exists() and other.exists()


def test_bundle_refuses_before_loading_pytorch(four, bundled, tmp_path):
    """An existing bundle without --force, or a listing pattern that does not compile, is refused
    before the seconds PyTorch takes to load: the console script runs with a `torch` that cannot be
    imported, and still gives its one `error:` line and exit code 2."""
    made, _ = four
    fake = tmp_path / "no-torch" / "torch"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('PyTorch was loaded')\n")
    env = {**os.environ, "PYTHONPATH": str(fake.parent)}
    for args, says in (
        (["--out", str(bundled)], "holds a bundle already: --force replaces it"),
        (
            ["--out", str(tmp_path / "new"), "--listing-pattern", "^(\\d+_"],
            "not a regular expression",
        ),
    ):
        done = subprocess.run(
            [sys.executable, "-m", "replicate", "bundle", str(made[0]), *args],
            capture_output=True, text=True, timeout=120, env=env,
        )  # fmt: skip
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 2 and len(lines) == 1 and says in lines[0], done.stderr
    assert not (tmp_path / "new").exists()
