"""Data-parallel training under `accelerate launch`: two CPU processes (gloo) stand in for GPUs.

    python -m pytest tests/test_distributed.py
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from conftest import make_task
from replicate.cli import app

pytestmark = pytest.mark.slow
CLASSES = {"blue": (40, 60, 200), "red": (200, 50, 40), "green": (40, 190, 60)}  # 9 valid images: an odd split


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def accelerate(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """`accelerate launch` with two processes on this machine's CPUs."""
    launcher = Path(sys.executable).with_name("accelerate")
    cmd = [str(launcher), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
           "-m", "replicate", *args, "--device", "cpu", "--no-pretrained", "--workers", "0"]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.fixture
def three_classes(tmp_path) -> Path:
    make_task(tmp_path / "data" / "toy", n_train=4, n_valid=3, classes=CLASSES)
    return tmp_path


def test_two_processes_train_one_run_folder_like_a_single_process(three_classes, runner):
    args = ["run", "toy", "--arch", "resnet18", "--size", "32", "--epochs", "2", "--bs", "4"]
    done = accelerate(*args, "--exports-dir", "exports-2", cwd=three_classes)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert done.stdout.count("results: ") == 1  # one process speaks
    single = runner.invoke(app, [*args, "--device", "cpu", "--no-pretrained", "--workers", "0",
                                 "--data-dir", str(three_classes / "data"),
                                 "--exports-dir", str(three_classes / "exports-1")])
    assert single.exit_code == 0, single.output

    two, one = (three_classes / d / "toy" for d in ("exports-2", "exports-1"))
    assert [p.name for p in two.iterdir()] == ["resnet18-frozen"]  # no staging or partial folders left
    two, one = two / "resnet18-frozen", one / "resnet18-frozen"
    assert {p.name for p in two.iterdir()} == {p.name for p in one.iterdir()}
    config = {d: json.loads((d / "config.json").read_text()) for d in (one, two)}
    assert (config[one]["processes"], config[two]["processes"]) == (1, 2)
    h1, h2 = pd.read_csv(one / "history.csv"), pd.read_csv(two / "history.csv")
    assert list(h1.columns) == list(h2.columns) and len(h1) == len(h2) == 2
    assert h2.valid_accuracy.between(0, 1).all()
    m1, m2 = (json.loads((d / "metrics.json").read_text()) for d in (one, two))
    assert m1.keys() == m2.keys() and (m2["n_train"], m2["n_valid"]) == (12, 9)
    p1, p2 = pd.read_csv(one / "valid_predictions.csv"), pd.read_csv(two / "valid_predictions.csv")
    assert sorted(p2.path) == sorted(p1.path) and len(p2) == 9  # every valid image once, none padded in
    # The run's record is the best epoch, and the export holds that epoch's weights.
    assert (p2.actual == p2.predicted).mean() == pytest.approx(m2["best_valid_accuracy"], abs=1e-6)


def test_compare_under_accelerate_writes_one_report(three_classes):
    done = accelerate("compare", "toy", "--archs", "resnet18", "--modes", "frozen,unfrozen", "--size", "32",
                      "--epochs", "2", "--bs", "4", "--cache-features", "2", "--exports-dir", "exports",
                      cwd=three_classes)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert done.stdout.count("report: ") == 1
    out = three_classes / "exports" / "toy"
    assert sorted(p.name for p in out.iterdir()) == ["compare", "resnet18-frozen-cached2", "resnet18-unfrozen"]
    table = pd.read_csv(out / "compare" / "table.csv")
    assert list(zip(table["mode"], table.cache_features)) == [("frozen", 2), ("unfrozen", 0)]
    preds = pd.read_csv(out / "resnet18-frozen-cached2" / "valid_predictions.csv")
    best = json.loads((out / "resnet18-frozen-cached2" / "metrics.json").read_text())["best_valid_accuracy"]
    assert len(preds) == 9 and (preds.actual == preds.predicted).mean() == pytest.approx(best, abs=1e-6)


def test_predict_under_accelerate_shares_the_photos_and_writes_one_table(three_classes, runner):
    """Two processes tag half the photos each (accelerate's split_between_processes); the main one
    writes one table with each photo once, the same as one process writes."""
    args = ["run", "toy", "--arch", "resnet18", "--size", "32", "--epochs", "1", "--bs", "4"]
    trained = runner.invoke(app, [*args, "--device", "cpu", "--no-pretrained", "--workers", "0",
                                  "--data-dir", str(three_classes / "data"), "--exports-dir",
                                  str(three_classes / "exports")])
    assert trained.exit_code == 0, trained.output
    run_dir, photos = three_classes / "exports" / "toy" / "resnet18-frozen", three_classes / "data" / "toy"
    (photos / "valid" / "red" / "broken.jpg").write_text("not a photo")
    single = runner.invoke(app, ["predict", str(run_dir), str(photos), "--out", str(three_classes / "one.csv"),
                                 "--device", "cpu"])
    assert single.exit_code == 0, single.output
    launcher = Path(sys.executable).with_name("accelerate")
    cmd = [str(launcher), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
           "-m", "replicate", "predict", str(run_dir), str(photos), "--out", str(three_classes / "two.csv"),
           "--device", "cpu", "--workers", "1"]
    done = subprocess.run(cmd, cwd=three_classes, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert done.stdout.count("table: ") == 1 and done.stdout.count("unreadable: ") == 1  # one process speaks
    one, two = pd.read_csv(three_classes / "one.csv"), pd.read_csv(three_classes / "two.csv")
    assert len(two) == 22 and two.path.is_unique
    pd.testing.assert_frame_equal(one, two)
