"""`replicate index`: the Parquet index against `predict`'s table, incremental calls, a job killed
with SIGKILL and resumed; the tagging here in threads and on a real local Ray (2 CPUs, dashboard
off), one cluster shared by this file's tests, which the CLI joins with --ray ADDRESS.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import copy_tagging_runs, synthetic_photo

from replicate.cli import app
from replicate.config import RunConfig
from replicate.folders import sha256_file
from replicate.index import store
from replicate.training import train

LISTING = r"^(\d+)_"
QUIET = dict(epochs=2, size=32, pretrained=False, workers=0, audit=False)


def train_run(root: Path, task: str, exports: Path, **more) -> Path:
    where = dict(data_dir=root / "data", exports_dir=exports)
    return train.run(RunConfig(task, "resnet18", **QUIET, **where, **more), log=lambda *a: None)


@pytest.fixture(scope="module")
def ray_address(tmp_path_factory):
    """A local Ray of 2 CPUs started by the tests, its dashboard off; its address for --ray."""
    ray = pytest.importorskip("ray")
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        object_store_memory=200 * 2**20,
        log_to_driver=False,
        _temp_dir=str(tmp_path_factory.mktemp("ray")),
    )
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="module")
def indexed(tmp_path_factory, tagging_runs) -> dict:
    """Two runs (rooms: three classes; kitchen: yes/no, a search filter), 40 photos of 10 listings
    with a corrupt one among them, and predict's tables of them."""
    root = tmp_path_factory.mktemp("index")
    runs = copy_tagging_runs(tagging_runs, root)
    photos = root / "photos"
    photos.mkdir()
    for i in range(39):
        synthetic_photo(i, (160, 120)).save(photos / f"{i // 4 + 1}_{i % 4}.jpg")
    (photos / "10_3.jpg").write_text("not a photo at all")
    out = root / "tags.csv"
    from typer.testing import CliRunner

    args = [*map(str, runs), str(photos), "--out", str(out), "--listing-pattern", LISTING]
    predicted = CliRunner().invoke(app, ["predict", *args])
    assert predicted.exit_code == 0, predicted.output
    table = pd.read_csv(out, keep_default_na=False)
    listings = pd.read_csv(root / "tags_listings.csv", dtype={"listing": str})
    return {"root": root, "runs": runs, "photos": photos, "table": table, "listings": listings}


def cli(args: list[str]) -> subprocess.CompletedProcess:
    """`replicate index` as a user runs it, in a fresh process."""
    line = [sys.executable, "-m", "replicate", "index", *args]
    return subprocess.run(line, capture_output=True, text=True, timeout=300)


def index_here(args: list[str]) -> str:
    """The command in this process (the local path: no fresh process needed); its output."""
    from typer.testing import CliRunner

    result = CliRunner().invoke(app, ["index", *args])
    assert result.exit_code == 0, result.output
    return result.output


def index_args(data: dict, out: Path, *more: str) -> list[str]:
    return [*map(str, data["runs"]), str(data["photos"]), "--out", str(out), *more]


def read_index(out: Path) -> pd.DataFrame:
    """The index as a user reads it: every part, no photo twice, in path order."""
    table = pd.read_parquet(out / store.PHOTOS)
    assert table.path.is_unique
    return table.sort_values("path", ignore_index=True)


def assert_same_rows(a: pd.DataFrame, b: pd.DataFrame, columns=None) -> None:
    """Row for row: the same photos, texts and flags; probabilities within float32 rounding."""
    columns = columns or list(b.columns)
    assert list(a.path) == list(b.path)
    for c in columns:
        x, y = a[c], b[c]
        if x.dtype.kind == "f":  # a CSV read with keep_default_na has '' for an untagged photo
            y = pd.to_numeric(y, errors="coerce")
            np.testing.assert_allclose(x.astype(float), y.astype(float), atol=1e-5, err_msg=c)
        else:
            assert list(x.fillna("").astype(str)) == list(y.fillna("").astype(str)), c


def test_the_index_equals_predicts_table_here_and_on_ray(indexed, ray_address, tmp_path):
    here, on_ray = tmp_path / "here", tmp_path / "ray"
    done = index_here(index_args(indexed, here, "--listing-pattern", LISTING, "--part-size", "16"))
    assert "40 photos in the index: 40 tagged" in done and "1 unreadable" in done
    ray_done = cli(index_args(indexed, on_ray, "--listing-pattern", LISTING, "--ray", ray_address))
    assert ray_done.returncode == 0, ray_done.stderr
    assert "on ray" in ray_done.stdout
    predicted = indexed["table"].sort_values("path", ignore_index=True)
    for out in (here, on_ray):
        table = read_index(out)
        assert_same_rows(table, predicted)  # every column predict writes, and the same values
        corrupt = table.set_index("path").loc[str(indexed["photos"] / "10_3.jpg")]
        assert corrupt.error and np.isnan(corrupt.rooms_p_bedroom)
        assert corrupt.sha256 == sha256_file(indexed["photos"] / "10_3.jpg")
        sizes = [os.stat(p).st_size for p in table.path]
        assert list(table["size"]) == sizes and table.rooms_model_sha256.nunique() == 1
        listings = pd.read_parquet(out / store.LISTINGS)
        assert_same_rows(listings.rename(columns={"listing": "path"}),
                         indexed["listings"].rename(columns={"listing": "path"}))  # fmt: skip
    assert len(store.part_files(here)) == 3  # 16 + 16 + 8 photos
    assert_same_rows(read_index(on_ray), read_index(here))  # both write the same rows


def test_a_second_call_tags_only_what_changed_on_ray(indexed, ray_address, tmp_path):
    photos, kitchen = tmp_path / "photos", tmp_path / "kitchen-run"
    shutil.copytree(indexed["photos"], photos)
    shutil.copytree(indexed["runs"][1], kitchen)
    models = [str(indexed["runs"][0]), str(kitchen)]
    out = tmp_path / "index"
    first = cli([*models, str(photos), "--out", str(out), "--ray", ray_address])
    assert first.returncode == 0, first.stderr
    before = read_index(out).set_index("path")
    synthetic_photo(100, (200, 150)).save(photos / "11_0.jpg")  # new
    synthetic_photo(101, (200, 150)).save(photos / "11_1.jpg")
    synthetic_photo(102, (120, 90)).save(photos / "1_0.jpg")  # changed
    (photos / "2_1.jpg").unlink()  # gone
    retrained = train_run(indexed["root"], "kitchen", tmp_path / "retrained", seed=7,
                          target_precision=0.5)  # fmt: skip
    for f in retrained.iterdir():  # the run folder retrained in place
        if f.is_file():
            shutil.copy(f, kitchen / f.name)
    again = cli([*models, str(photos), "--out", str(out), "--ray", ray_address])
    assert again.returncode == 0, again.stderr
    # 2 new and 1 changed with both models; the other 38 with the retrained kitchen model only
    assert "41 tagged" in again.stdout, again.stdout
    assert "(2 new, 1 changed, 38 for a changed model), 0 kept, 1 gone and dropped" in again.stdout
    after = read_index(out)
    fresh = tmp_path / "fresh"
    index_here([*models, str(photos), "--out", str(fresh)])  # the new state from nothing, here
    assert_same_rows(after, read_index(fresh))
    kept = after.set_index("path").loc[str(photos / "3_0.jpg")]
    old = before.loc[str(photos / "3_0.jpg")]
    assert kept.rooms_p_bedroom == old.rooms_p_bedroom  # carried over, not retagged
    assert kept.kitchen_p_yes != old.kitchen_p_yes  # the retrained model's
    assert kept.kitchen_model_sha256 != old.kitchen_model_sha256
    assert len(after) == 41 and str(photos / "2_1.jpg") not in set(after.path)
    summary = store.read_manifest(out)
    assert (summary["new"], summary["changed"], summary["gone"], summary["generation"]) == (
        2,
        1,
        1,
        2,
    )


@pytest.mark.parametrize("engine", ["here", "ray"])
def test_a_job_killed_half_way_resumes_to_the_same_index(indexed, ray_address, tmp_path, engine):
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(300):
        synthetic_photo(1000 + i, (64, 48)).save(photos / f"{i // 5}_{i % 5}.jpg")
    models = [*map(str, indexed["runs"]), str(photos)]
    on = ["--ray", ray_address] if engine == "ray" else ["--decode-threads", "0"]
    out = tmp_path / "index"
    line = [sys.executable, "-m", "replicate", "index", *models, "--out", str(out), "--part-size", "10", "--bs", "5", *on]  # fmt: skip
    job = subprocess.Popen(line, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while len(store.part_files(out)) < 3 and job.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    assert job.poll() is None, "the job ended before it could be killed half way"
    job.send_signal(signal.SIGKILL)
    job.wait()
    committed = sum(len(pd.read_parquet(f)) for _, f in store.part_files(out))
    assert 0 < committed < 300 and not (out / store.MANIFEST).exists()
    resumed = cli([*models, "--out", str(out), "--part-size", "10", *on])
    assert resumed.returncode == 0, resumed.stderr
    # no raw log line of Ray's C++ core ("[2026-...] logging.cc:303: ...") in what a user reads
    assert not re.search(r"^\[[^]]*\] \w+\.cc:\d+:", resumed.stderr, re.M), resumed.stderr
    tagged = store.read_manifest(out)["tagged"]
    assert tagged <= 300 - committed + 10  # at most the parts in flight again
    whole = tmp_path / "uninterrupted"
    index_here([*models, "--out", str(whole)])
    assert_same_rows(read_index(out), read_index(whole))


def test_without_ray_it_runs_here_and_refuses_what_it_cannot_do(indexed, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    monkeypatch.setitem(sys.modules, "ray", None)  # as on a machine without replicate[ray]
    out = tmp_path / "index"
    assert "40 photos in the index" in index_here(
        index_args(indexed, out, "--listing-pattern", LISTING)
    )
    (out / store.LISTINGS).unlink()
    assert "0 tagged" in index_here(index_args(indexed, out))  # the pattern is remembered
    assert len(pd.read_parquet(out / store.LISTINGS)) == len(indexed["listings"])
    runner = CliRunner()
    refused = {
        "--ray": index_args(indexed, tmp_path / "other", "--ray", "auto"),
        "a file": index_args(indexed, indexed["photos"] / "1_0.jpg"),
        "other things": index_args(indexed, indexed["root"] / "data"),
    }
    with store.IndexFolder(out):  # a job writing it
        refused["locked"] = index_args(indexed, out)
        results = {k: runner.invoke(app, ["index", *args]) for k, args in refused.items()}
    messages = {
        "--ray": "--ray needs Ray: pip install 'replicate[ray]'",
        "a file": "is a file",
        "other things": "is a folder of other things",
        "locked": "another `replicate index` is writing",
    }
    for key, result in results.items():
        assert result.exit_code == 2 and messages[key] in result.output, (key, result.output)
        assert result.output.count("\n") == 1 and result.output.startswith("error:")
    assert len(read_index(out)) == 40  # the refused calls changed nothing


def test_a_call_changes_only_the_folders_it_names(indexed, tmp_path):
    """An index of folder A, then of B, then of B after a photo left it: A's rows stay (not
    "gone": the call did not name A), B's missing photo is dropped, and the summary counts both."""
    a, b, out = tmp_path / "A", tmp_path / "B", tmp_path / "index"
    for folder, first in ((a, 0), (b, 10)):
        folder.mkdir()
        for i in range(first, first + 5):
            synthetic_photo(200 + i, (120, 90)).save(folder / f"{i}_0.jpg")
    runs = [str(r) for r in indexed["runs"]]
    index_here([*runs, str(a), "--out", str(out)])
    second = index_here([*runs, str(b), "--out", str(out)])
    assert "10 photos in the index: 5 tagged" in second, second
    assert "0 gone and dropped, 5 untouched in folders not named" in second, second
    (b / "12_0.jpg").unlink()
    third = index_here([*runs, str(b), "--out", str(out)])
    assert "9 photos in the index: 0 tagged" in third and "4 kept" in third, third
    assert "1 gone and dropped, 5 untouched in folders not named" in third, third
    paths = set(read_index(out).path)
    assert {str(a / f"{i}_0.jpg") for i in range(5)} <= paths and str(b / "12_0.jpg") not in paths
    # a folder whose name starts like another's is not under it
    (tmp_path / "A2").mkdir()
    synthetic_photo(300, (120, 90)).save(tmp_path / "A2" / "x.jpg")
    index_here([*runs, str(tmp_path / "A2"), "--out", str(out)])
    assert len(read_index(out)) == 10
    # one small part per call, merged as the index grows: 10 rows in one part of --part-size 1024
    assert len(store.part_files(out)) == 1
