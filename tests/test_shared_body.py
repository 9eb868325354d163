"""The README's tour, run as written, and runs that share a body, which it makes.

The tour: every command of the README's ```bash blocks, in order, in a fresh folder, so the commands
and the runs they make stay true together. The small-data override the tests set: `replicate data
houses` finds a miniature Houses archive (12 real listings, or made-up photos where ../shared is not
here) where it keeps its download; training commands get options that make them short
(OVERRIDES); the placeholder folders the tour names (~/scraped, photos/, ~/photos/unlabelled,
photo.jpg) are made with a few photos; `serve` is started and its curl lines sent. What cannot run
here is skipped, with the reason (SKIPPED: the lines that start so).

Its three lite0 runs keep the pretrained body untouched (frozen, --freeze-bn), one per Houses
attribute (rooms, exterior, kitchen); its resnet18 run (the grid's) shares nothing. Tagged
together, the three get one body pass per batch and must give the probabilities each gives alone;
bundled, they are one file, which predict, the bundle's own script, the index and the server run
alike.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest
from conftest import HOUSES_ZIP, ROOMS, make_houses_zip, server, synthetic_photo
from typer.testing import CliRunner

from replicate import runs
from replicate.cli import app
from replicate.data.sources import HOUSE_PHOTO
from replicate.engine import onnx_models

LITE = "tf_efficientnet_lite0"


def quiet(*args, **kwargs) -> None:
    pass


TASKS = {  # the three Houses attributes; their colours where the Houses zip is not here
    "rooms": ROOMS,
    "exterior": {"frontal": (90, 160, 220), "indoor": (160, 120, 80)},
    "kitchen": {"yes": (200, 180, 60), "no": (40, 60, 200)},
}


README = Path(__file__).resolve().parents[1] / "README.md"

# What each command gets appended: short training (one epoch, small inputs, random init where
# the study's weights would be downloaded), the grid of one backbone, and --onnx where a later
# command opens the run's model.onnx (the suite skips that export unless asked: conftest).
SHORT = ["--epochs", "1", "--size", "32", "--no-pretrained"]
OVERRIDES = {
    "compare": ["--archs", "resnet18", "--modes", "unfrozen", *SHORT, "--onnx"],
    "run exterior": ["--epochs", "3", "--onnx"],
    # a target below the valid photos' share of kitchens (1 in 4): the lowest threshold reaches it,
    # so kitchen has a filter however little a few photos taught it
    "run kitchen": ["--epochs", "3", "--target-precision", "0.2", "--onnx"],
    "run rooms --arch tf_efficientnet_lite0": ["--epochs", "3", "--onnx"],
    "bundle": ["--calibration", "8"],
    "label": ["--batch", "4"],
}
# Not run here, with the reason; a `replicate` line among them is still parsed (its command and
# options must exist: `parses`), but for the cluster's, whose paths are not here.
SKIPPED = {
    "make ": "make runs the installer and this suite",
    "replicate archs": "builds every network to describe it: tests/test_models.py runs it",
    "replicate run rooms --arch densenet121": "the study's grid is run for every arch in tests/test_archs.py",
    "replicate weights": "downloads weights (tests/test_weights.py runs it against a stand-in server)",
    "replicate index exports/tagger /shared/photos": "a cluster's (tests/test_index.py runs a real local Ray)",
    "replicate demo": "picks its backbone by the weights at hand; tests/test_commands.py runs it",
}


def parses(args: list[str]) -> None:
    """The command line `replicate ARGS` names a command and options that exist (click parses it
    without running it)."""
    import typer.main

    group = typer.main.get_command(app)
    context = group.make_context("replicate", [args[0]])
    command = group.get_command(context, args[0])
    assert command is not None, f"no command {args[0]!r}"
    command.make_context(args[0], list(args[1:]), parent=context)


def readme_lines() -> list[str]:
    """The README's shell commands in order: continuation lines joined, comments kept (shlex drops
    them)."""
    blocks = re.findall(r"```bash\n(.*?)```", README.read_text(), re.S)
    return [
        line for block in blocks for line in block.replace("\\\n", " ").splitlines() if line.strip()
    ]


def expand(words: list[str]) -> list[str]:
    """Bash's brace expansion of the one form the tour uses: a/{b,c}/d -> a/b/d a/c/d; and ~."""
    out = []
    for word in words:
        m = re.fullmatch(r"(.*)\{([^}]*)\}(.*)", word)
        parts = [f"{m[1]}{x}{m[3]}" for x in m[2].split(",")] if m else [word]
        out += [os.path.expanduser(p) for p in parts]
    return out


def mini_houses(path: Path) -> None:
    """A Houses archive in the real layout: 12 real listings, or made-up photos without the zip."""
    if not HOUSES_ZIP.is_file():
        make_houses_zip(path, n_houses=12)
        return
    with zipfile.ZipFile(HOUSES_ZIP) as source, zipfile.ZipFile(path, "w") as mini:
        for info in source.infolist():
            m = HOUSE_PHOTO.search(info.filename)
            if (m and int(m[1]) <= 12) or info.filename.endswith("HousesInfo.txt"):
                mini.writestr(info.filename, source.read(info))


def placeholders(home: Path, here: Path) -> None:
    """The folders and files the tour names as a user's own."""
    for label in ("yes", "no"):
        (home / "scraped" / label).mkdir(parents=True)
        for k in range(8):
            synthetic_photo(10 * k + (label == "yes"), (240, 220)).save(
                home / "scraped" / label / f"{k}.jpg"
            )
    pool = home / "photos" / "unlabelled"
    pool.mkdir(parents=True)
    for k in range(12):
        synthetic_photo(200 + k).save(pool / f"p{k}.jpg")
    (here / "photos").mkdir()
    for k, room in enumerate(("kitchen", "frontal")):
        synthetic_photo(300 + k).save(here / "photos" / f"1_{room}.jpg")
        shutil.copy(here / "photos" / f"1_{room}.jpg", here / f"1_{room}.jpg")
    shutil.copy(here / "1_kitchen.jpg", here / "photo.jpg")


def curl(words: list[str], port: int) -> httpx.Response:
    """The tour's curl line, sent with httpx (curl may not be installed): --data-binary @FILE
    or -F name=@FILE ..., then the URL."""
    url = words[-1].replace(":8000", f":{port}")
    if words[1] == "--data-binary":
        return httpx.post(url, content=Path(words[2][1:]).read_bytes(), timeout=30)
    files = [(w.split("=")[0], (w.split("@")[1], Path(w.split("@")[1]).read_bytes()))
             for w in words[1:-1] if w != "-F"]  # fmt: skip
    return httpx.post(url, files=files, timeout=30)


@pytest.fixture(scope="module")
def tour(tmp_path_factory) -> dict:
    """The README's tour run in a fresh folder (`here`, HOME at `home`): the lines run, in order."""
    root = tmp_path_factory.mktemp("tour")
    home, here = root / "home", root / "work"
    home.mkdir()
    (here / "data" / ".downloads").mkdir(parents=True)
    mini_houses(here / "data" / ".downloads" / "Houses-dataset-master.zip")
    placeholders(home, here)
    runner, ran, port = CliRunner(), [], None
    with pytest.MonkeyPatch.context() as mp, contextlib.ExitStack() as running:
        mp.setenv("HOME", str(home))
        mp.chdir(here)
        for line in readme_lines():
            if line.startswith(tuple(SKIPPED)):
                if line.startswith("replicate") and "/shared/" not in line:
                    parses(expand(shlex.split(line, comments=True))[1:])
                continue
            words = expand(shlex.split(line.split(" > ")[0], comments=True))
            if words[0] == "python":  # the bundle's own script, its output where the line sends it
                done = subprocess.run([sys.executable, *words[1:]], capture_output=True, text=True, timeout=120)  # fmt: skip
                assert done.returncode == 0, (line, done.stderr)
                Path(shlex.split(line.split(" > ")[1], comments=True)[0]).write_text(done.stdout)
            elif words[0] == "curl":
                assert port is not None, "a curl line before `replicate serve`"
                answer = curl(words, port)
                assert answer.status_code == 200, (line, answer.text)
            elif words[1] == "serve":  # started for the curl lines after it, on a free port
                models = [w for w in words[2:] if w not in ("--port", "8000")]
                client, _ = running.enter_context(server(models))
                port = client.base_url.port
            else:
                more = next(
                    (v for k, v in OVERRIDES.items() if line.startswith(f"replicate {k}")), []
                )
                result = runner.invoke(app, words[1:] + more)
                assert result.exit_code == 0, (line, result.output)
            ran.append(line)
    return {"here": here, "ran": ran}


@pytest.fixture(autouse=True)
def in_the_tours_folder(tour, monkeypatch):
    """Each test in the folder the tour ran in, as its user: the runs and the bundle name paths
    relative to it."""
    monkeypatch.chdir(tour["here"])


def test_the_readme_tour_runs_as_written(tour):
    here = tour["here"]
    commands = {line.split()[1] for line in tour["ran"] if line.startswith("replicate")}
    assert {"data", "prepare", "audit", "clean", "run", "compare", "report", "interpret", "review",
            "label", "predict", "bundle", "export", "serve", "index"} <= commands  # fmt: skip
    assert (here / "tags_listings.csv").is_file()
    assert (here / "exports" / "index" / "listings.parquet").is_file()
    tags, alone = (here / "tags.csv").read_text(), (here / "tags_alone.csv").read_text()
    assert len(alone.splitlines()) == len(tags.splitlines()) > 1


@pytest.fixture(scope="module")
def four(tour) -> tuple[list[Path], Path]:
    """([the tour's three Houses attributes as lite0 heads on one body, its resnet18 run], the
    rooms task's valid photos to tag)."""
    exports = tour["here"] / "exports"
    made = [exports / task / f"{LITE}-frozen-cached3-freezebn" for task in TASKS]
    return [*made, exports / "rooms" / "resnet18-unfrozen"], tour[
        "here"
    ] / "data" / "rooms" / "valid"


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
def bundled(tour) -> Path:
    """The tour's `replicate bundle` of the three runs on one body (with int8)."""
    return tour["here"] / "exports" / "tagger"


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
    assert kitchen["listing_rule"]["pattern"] == r"^(\d+)_"
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
         "--listing-pattern", r"^(\d+)_"],
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


# --- the index keeps what the body saw ---------------------------------------------------------


def read_rows(index: Path) -> pd.DataFrame:
    return pd.read_parquet(index / "photos").sort_values("path", ignore_index=True)


def assert_tagged_alike(a: pd.DataFrame, b: pd.DataFrame, thresholds: dict[str, float]) -> None:
    """The same photos, probabilities within 1e-5, the same answers but for a photo whose score
    is within 1e-5 of its filter's threshold (the valid photo that set it, for one)."""
    assert list(a.path) == list(b.path) and list(a.columns) == list(b.columns)
    probabilities = [c for c in a.columns if "_p_" in c]
    assert np.abs(a[probabilities].to_numpy() - b[probabilities].to_numpy()).max() <= 1e-5
    for name, threshold in thresholds.items():
        near = (a[f"{name}_p_yes"] - threshold).abs() <= 1e-5 if name == "kitchen" else False
        same = a[f"{name}_predicted"] == b[f"{name}_predicted"]
        assert (same | near).all(), name


def test_a_new_head_on_an_indexed_body_is_tagged_from_stored_features(four, runner, tmp_path):
    """The index keeps each photo's lite0 features (2 bytes a value); a kitchen head added later
    runs on them alone, no photo read, and tags as a fresh index from the photos does; an index
    without them (--no-features) tags from the photos as before."""
    made, _ = four
    photos = Path("data") / "exterior"  # the tour's: every Houses photo it imported
    rooms, kitchen = str(made[0]), str(made[2])
    threshold = json.loads((made[2] / "filter.json").read_text())["threshold"]
    out, plain, fresh = tmp_path / "index", tmp_path / "plain", tmp_path / "fresh"
    for where, more in ((out, []), (plain, ["--no-features"])):
        result = runner.invoke(app, ["index", rooms, str(photos), "--out", str(where), *more])
        assert result.exit_code == 0, result.output
    stored = read_rows(out)
    column = onnx_models.features_name(runs.Run(made[0]).config["body"]["key"])
    assert stored[column].map(len).eq(8 + 1280 * 2).all()  # the photo's range, 1280 uint16 codes
    assert column not in read_rows(plain).columns
    n = len(stored)
    added = runner.invoke(app, ["index", rooms, kitchen, str(photos), "--out", str(out)])
    assert added.exit_code == 0, added.output
    assert f"{n} for a changed model, {n} of them from stored features)" in added.output
    assert "from stored features" in added.output.splitlines()[0]
    again = runner.invoke(app, ["index", rooms, kitchen, str(photos), "--out", str(plain), "--no-features"])  # fmt: skip
    assert again.exit_code == 0 and f"{n} for a changed model)" in again.output  # from photos
    result = runner.invoke(app, ["index", rooms, kitchen, str(photos), "--out", str(fresh)])
    assert result.exit_code == 0, result.output
    assert_tagged_alike(read_rows(out), read_rows(fresh), {"kitchen": threshold, "rooms": 0})
    assert (read_rows(out)[column] == read_rows(fresh)[column]).all()  # the features kept as stored
    without = read_rows(plain)
    assert_tagged_alike(without, read_rows(fresh).drop(columns=column), {"kitchen": threshold})
