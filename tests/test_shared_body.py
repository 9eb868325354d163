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
from conftest import HOUSES_ZIP, ROOMS, make_task, server
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


def listing_photos(four, folder: Path) -> Path:
    """Real Houses photos named <house>_<room>.jpg, 20 listings (where the zip is here: the valid
    houses of `four` and the 16 houses after them, photos no run was trained on; else the valid
    photos made for `four`), an unreadable photo in one listing and a listing of only one."""
    folder.mkdir()
    if HOUSES_ZIP.is_file():
        with zipfile.ZipFile(HOUSES_ZIP) as zf:
            for i in zf.infolist():
                m = HOUSE_PHOTO.search(i.filename)
                if m and 5 <= int(m[1]) <= 24:
                    (folder / f"{int(m[1])}_{m[2]}.jpg").write_bytes(zf.read(i))
    else:
        for k, photo in enumerate(sorted(four[1].rglob("*.jpg"))):
            shutil.copy(photo, folder / f"{k // 4}_{photo.name}")
    (folder / "5_broken.jpg").write_bytes(b"not a photo")
    (folder / "999_broken.jpg").write_bytes(b"not a photo either")
    return folder


def answers_agree(photos: pd.DataFrame, listings: pd.DataFrame | None = None) -> None:
    """One answer per attribute: kitchen_predicted is the filter's answer (yes exactly where
    kitchen_has_kitchen), both empty for an unreadable photo; a listing has what any of its readable
    photos answers (one column per class for rooms), its answers empty when none is readable."""
    ok = photos.error.fillna("") == ""
    assert (
        photos.kitchen_predicted[~ok].isna().all() and photos.kitchen_has_kitchen[~ok].isna().all()
    )
    assert (
        (photos.kitchen_predicted[ok] == "yes") == photos.kitchen_has_kitchen[ok].astype(bool)
    ).all()
    assert (
        (photos.exterior_predicted[ok] == "frontal") == photos.exterior_has_frontal[ok].astype(bool)
    ).all()
    if listings is None:
        return
    house = photos.path.map(lambda p: Path(p).name.split("_")[0])
    readable = ok.groupby(house).sum()
    assert (listings.photos == readable.reindex(listings.index)).all()
    for listing, row in listings.iterrows():
        mine = photos[(house == listing) & ok]
        expected = {f"rooms_has_{c}": (mine.rooms_predicted == c).any() for c in ROOMS}
        expected["kitchen_has_kitchen"] = (mine.kitchen_predicted == "yes").any()
        expected["exterior_has_frontal"] = (mine.exterior_predicted == "frontal").any()
        for column, value in expected.items():
            assert pd.isna(row[column]) if mine.empty else row[column] == value, (listing, column)
    assert not [
        c
        for c in listings.columns
        if c.startswith("has_") or c.endswith(("_has_no", "_has_indoor"))
    ]


def test_predict_the_script_the_index_and_the_server_give_one_answer_per_attribute(
    four, bundled, runner, tmp_path
):
    """The bundle of rooms, exterior and kitchen on real Houses photos and their listings, through
    every engine: predict, the bundle's own tag.py (alone: onnxruntime, numpy and Pillow), the
    index and the server; each says one thing per attribute, and all say the same."""
    photos = listing_photos(four, tmp_path / "photos")
    pattern = ["--listing-pattern", r"^(\d+)_"]
    moved = tmp_path / "moved"  # the bundle folder alone, away from its run folders
    shutil.copytree(bundled, moved)
    result = runner.invoke(
        app, ["predict", str(moved), str(photos), "--out", str(tmp_path / "tags.csv"), *pattern]
    )
    assert result.exit_code == 0, result.output
    tags = pd.read_csv(tmp_path / "tags.csv", keep_default_na=True, dtype={"error": str})
    listings = pd.read_csv(tmp_path / "tags_listings.csv", dtype={"listing": str}).set_index(
        "listing"
    )
    answers_agree(tags, listings)
    assert listings.loc["999", "error"] == "none of its photos could be read"
    assert listings.loc["5", "unreadable_photos"] == str(photos / "5_broken.jpg")

    done = tag_alone(moved / "tag.py", photos, "--out", tmp_path / "alone.csv")
    assert done.returncode == 0, done.stderr
    alone = pd.read_csv(tmp_path / "alone.csv", dtype={"error": str})
    answers_agree(alone)
    assert list(alone.columns) == list(tags.columns) and (alone.path == tags.path).all()
    columns = probability_columns(tags)
    assert np.nanmax(np.abs(alone[columns].to_numpy() - tags[columns].to_numpy())) <= 1e-5

    result = runner.invoke(
        app, ["index", str(moved), str(photos), "--out", str(tmp_path / "i"), *pattern]
    )
    assert result.exit_code == 0, result.output
    indexed = pd.read_parquet(tmp_path / "i" / "photos").sort_values("path", ignore_index=True)
    in_index = pd.read_parquet(tmp_path / "i" / "listings.parquet").set_index("listing")
    answers_agree(indexed, in_index)
    ordered = tags.sort_values("path", ignore_index=True)
    for c in [c for c in tags.columns if c.endswith("_predicted") or "_has_" in c]:
        assert indexed[c].astype(str).equals(ordered[c].astype(str).replace("nan", "None")), c
    answer_columns = [c for c in listings.columns if "_has_" in c]
    assert (
        in_index[answer_columns]
        .astype(str)
        .equals(listings[answer_columns].astype(str).replace("nan", "<NA>"))
    )

    table = tags.set_index("path")
    with server([moved]) as (client, _):
        for listing in listings.index:
            files = sorted(photos.glob(f"{listing}_*.jpg"))
            sent = [("photos", (f.name, f.read_bytes())) for f in files]
            body = client.post(f"/v1/listings/{listing}", files=sent).json()
            for f, photo in zip(files, body["photos"]):
                row = table.loc[str(f)]
                if "error" in photo:
                    assert row.error == row.error and pd.isna(row.kitchen_has_kitchen)
                    continue
                for name, said in photo["models"].items():
                    assert said["class"] == row[f"{name}_predicted"], (f, name)
                assert photo["models"]["kitchen"]["has_kitchen"] == row.kitchen_has_kitchen
            for column in answer_columns:
                expected = listings.loc[listing, column]
                assert body["listing"][column] == (None if pd.isna(expected) else expected), column


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
