"""Data-parallel training under `accelerate launch`: two CPU processes (gloo) stand in for GPUs.

python -m pytest tests/test_distributed.py
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from conftest import folders_args, free_port, make_task

from replicate.cli import app

pytestmark = pytest.mark.slow
CLASSES = {
    "blue": (40, 60, 200),
    "red": (200, 50, 40),
    "green": (40, 190, 60),
}  # 9 valid images: an odd split


def accelerate(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """`replicate ARGS --device cpu` under `accelerate launch` with two processes on this machine's CPUs."""
    launcher = Path(sys.executable).with_name("accelerate")
    cmd = [
        str(launcher),
        "launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(free_port()),
        "-m",
        "replicate",
        *args,
        "--device",
        "cpu",
    ]
    return subprocess.run(
        cmd,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


@pytest.fixture(scope="module")
def launched(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """One `replicate compare` under `accelerate launch` with two processes: resnet18 frozen (cached
    features) and unfrozen, with model.onnx. (root, the launch). Tests read it, never change it."""
    root = tmp_path_factory.mktemp("launched")
    make_task(root / "data" / "toy", n_train=4, n_valid=3, classes=CLASSES)
    done = accelerate(
        "compare",
        "toy",
        "--archs",
        "resnet18",
        "--modes",
        "frozen,unfrozen",
        *RUN_ARGS,
        "--cache-features",
        "2",
        "--onnx",
        "--no-pretrained",
        "--workers",
        "0",
        "--exports-dir",
        "exports",
        cwd=root,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return root, done


RUN_ARGS = ["--size", "32", "--epochs", "2", "--bs", "4"]


def test_two_processes_train_one_run_folder_like_a_single_process(launched, runner, tmp_path):
    root, _ = launched
    single = runner.invoke(
        app,
        [
            "run",
            "toy",
            "--arch",
            "resnet18",
            "--unfreeze",
            *RUN_ARGS,
            "--onnx",
            "--device",
            "cpu",
            "--no-pretrained",
            "--workers",
            "0",
            *folders_args(root / "data", tmp_path / "exports-1"),
        ],
    )
    assert single.exit_code == 0, single.output

    two, one = (
        root / "exports" / "toy" / "resnet18-unfrozen",
        tmp_path / "exports-1" / "toy" / "resnet18-unfrozen",
    )
    assert not [
        p.name for p in two.parent.iterdir() if p.name.startswith(".")
    ]  # no staging or partial folders
    assert {p.name for p in two.iterdir()} == {p.name for p in one.iterdir()}
    config = {d: json.loads((d / "config.json").read_text()) for d in (one, two)}
    assert (config[one]["processes"], config[two]["processes"]) == (1, 2)
    h1, h2 = pd.read_csv(one / "history.csv"), pd.read_csv(two / "history.csv")
    assert list(h1.columns) == list(h2.columns) and len(h1) == len(h2) == 2
    m1, m2 = (json.loads((d / "metrics.json").read_text()) for d in (one, two))
    assert m1.keys() == m2.keys() and (m2["n_train"], m2["n_valid"]) == (12, 9)
    assert m2["best_valid_accuracy"] == h2.valid_accuracy.max()
    p1, p2 = pd.read_csv(one / "valid_predictions.csv"), pd.read_csv(two / "valid_predictions.csv")
    assert (
        sorted(p2.path) == sorted(p1.path) and len(p2) == 9
    )  # every valid image once, none padded in
    # The run's record is the best epoch, and the export holds that epoch's weights.
    assert (p2.actual == p2.predicted).mean() == pytest.approx(m2["best_valid_accuracy"], abs=1e-6)


def test_compare_under_accelerate_writes_one_report(launched):
    root, done = launched
    assert done.stdout.count("report: ") == 1
    out = root / "exports" / "toy"
    assert sorted(p.name for p in out.iterdir()) == [
        "compare",
        "resnet18-frozen-cached2",
        "resnet18-unfrozen",
    ]
    table = pd.read_csv(out / "compare" / "table.csv")
    assert list(zip(table["mode"], table.cache_features)) == [("frozen", 2), ("unfrozen", 0)]
    preds = pd.read_csv(out / "resnet18-frozen-cached2" / "valid_predictions.csv")
    best = json.loads((out / "resnet18-frozen-cached2" / "metrics.json").read_text())[
        "best_valid_accuracy"
    ]
    assert len(preds) == 9 and (preds.actual == preds.predicted).mean() == pytest.approx(
        best, abs=1e-6
    )


def test_predict_under_accelerate_shares_the_photos_and_writes_one_table(
    launched, runner, tmp_path
):
    """Two processes tag half the photos each (accelerate's split_between_processes); the main one
    writes one table with each photo once, the same as one process writes."""
    root, _ = launched
    run_dir, photos = root / "exports" / "toy" / "resnet18-unfrozen", tmp_path / "photos"
    shutil.copytree(root / "data" / "toy", photos)
    (photos / "valid" / "red" / "broken.jpg").write_text("not a photo")
    single = runner.invoke(
        app,
        [
            "predict",
            str(run_dir),
            str(photos),
            "--out",
            str(tmp_path / "one.csv"),
            "--device",
            "cpu",
        ],
    )
    assert single.exit_code == 0, single.output
    done = accelerate(
        "predict",
        str(run_dir),
        str(photos),
        "--out",
        str(tmp_path / "two.csv"),
        "--decode-threads",
        "1",
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert (
        done.stdout.count("table: ") == 1 and done.stdout.count("unreadable: ") == 1
    )  # one process speaks
    one, two = pd.read_csv(tmp_path / "one.csv"), pd.read_csv(tmp_path / "two.csv")
    assert len(two) == 22 and two.path.is_unique
    pd.testing.assert_frame_equal(one, two)
