"""`replicate index`: the Parquet index against `predict`'s table, incremental calls, a job killed
with SIGKILL and resumed; the tagging here in threads and on a real local Ray (2 CPUs, dashboard
off), one cluster shared by this file's tests, which the CLI joins with --ray ADDRESS.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import ROOMS, make_task, synthetic_photo

from replicate import store, train
from replicate.cli import app
from replicate.config import RunConfig
from replicate.folders import sha256_file

KITCHEN = {"yes": (200, 180, 60), "no": (40, 60, 200)}
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
def indexed(tmp_path_factory) -> dict:
    """Two runs (rooms: three classes; kitchen: yes/no, a search filter), 40 photos of 10 listings
    with a corrupt one among them, and predict's tables of them."""
    root = tmp_path_factory.mktemp("index")
    make_task(root / "data" / "rooms", classes=ROOMS)
    make_task(root / "data" / "kitchen", n_train=6, n_valid=6, classes=KITCHEN)
    runs = [
        train_run(root, "rooms", root / "exports", target_precision=0.95),
        train_run(root, "kitchen", root / "exports", target_precision=0.5),
    ]
    photos = root / "photos"
    photos.mkdir()
    for i in range(39):
        synthetic_photo(i, (160, 120)).save(photos / f"{i // 4 + 1}_{i % 4}.jpg")
    (photos / "10_3.jpg").write_text("not a photo at all")
    out = root / "tags.csv"
    predicted = cli([*map(str, runs), str(photos), "--out", str(out), "--listing-pattern", LISTING], "predict")  # fmt: skip
    assert predicted.returncode == 0, predicted.stderr
    table = pd.read_csv(out, keep_default_na=False)
    listings = pd.read_csv(root / "tags_listings.csv", dtype={"listing": str})
    return {"root": root, "runs": runs, "photos": photos, "table": table, "listings": listings}


def cli(args: list[str], command: str = "index", **popen) -> subprocess.CompletedProcess:
    """The command as a user runs it, in a fresh process."""
    line = [sys.executable, "-m", "replicate", command, *args]
    return subprocess.run(line, capture_output=True, text=True, timeout=300, **popen)


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
    done = cli(index_args(indexed, here, "--listing-pattern", LISTING, "--part-size", "16"))
    assert done.returncode == 0, done.stderr
    assert "40 photos in the index: 40 tagged" in done.stdout and "1 unreadable" in done.stdout
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
