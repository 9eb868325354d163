"""`replicate run` through the real CLI: redrawn plots, failures, bad input, devices. Every arch's
run folder is in test_archs.py, the real Houses photos in test_houses.py.

    python -m pytest tests/test_train.py
"""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
from conftest import folders_args

from replicate.cli import app
from replicate.report import plots
from replicate.training import dataloaders, train


def run_cli(runner, data_dir, *args):
    exports = data_dir.parent / "exports"
    result = runner.invoke(
        app,
        [
            "run",
            *args,
            "--no-pretrained",
            "--workers",
            "0",
            *folders_args(data_dir, exports),
        ],
    )
    return result, exports


def test_report_rebuilds_the_plots_from_the_folder_alone(tiny_task, runner):
    result, exports = run_cli(
        runner, tiny_task, "toy", "--arch", "resnet18", "--epochs", "1", "--size", "32"
    )
    run_dir = exports / "toy" / "resnet18-frozen"
    figures = [
        run_dir / p for p in ("loss.png", "accuracy.png", "confusion_matrix.png", "top_losses.png")
    ]
    for p in figures:
        p.unlink()
    (run_dir / "export.pkl").unlink()  # no learner needed
    written = plots.render_run(run_dir)
    assert all(p in written and p.is_file() for p in figures)
    worst = pd.read_csv(run_dir / "top_losses.csv")
    assert list(worst.columns) == ["path", "actual", "predicted", "probability", "loss"]
    assert worst.loss.is_monotonic_decreasing and len(worst) == 4


def test_a_failed_run_leaves_no_folder_that_looks_finished(tiny_task, runner, monkeypatch):
    def broken(run_dir):
        raise RuntimeError("disk full")

    monkeypatch.setattr(plots, "render_run", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        train.run(
            train.RunConfig(
                "toy",
                "resnet18",
                epochs=1,
                size=32,
                pretrained=False,
                onnx=False,
                workers=0,
                data_dir=tiny_task,
                exports_dir=tiny_task.parent / "exports",
            )
        )
    assert list((tiny_task.parent / "exports" / "toy").iterdir()) == []


def test_a_symlink_loop_in_a_task_folder_counts_each_photo_once(tiny_task, runner):
    red = tiny_task / "toy" / "train" / "red"
    (red / "again").symlink_to(red, target_is_directory=True)  # red/again/again/... forever
    images = dataloaders.scan_task(tiny_task / "toy")
    assert images.counts.loc["red", "train"] == 4 and len(images.files) == 12


def test_unreadable_image_is_skipped_and_the_run_goes_on(tiny_task, runner):
    (tiny_task / "toy" / "train" / "red" / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    result, exports = run_cli(
        runner, tiny_task, "toy", "--arch", "resnet18", "--epochs", "1", "--size", "32"
    )
    assert result.exit_code == 0, result.output
    assert "broken.jpg" in result.output
    metrics = json.loads((exports / "toy" / "resnet18-frozen" / "metrics.json").read_text())
    assert metrics["n_train"] == 8 and metrics["skipped_images"][0].endswith("broken.jpg")


@pytest.mark.parametrize(
    "args, message",
    [
        (["toy", "--arch", "resnet19"], "unknown arch 'resnet19'"),
        (["nosuchtask", "--arch", "resnet18"], "task folder"),
        (["toy", "--arch", "alexnet", "--size", "32"], "at least 63"),
    ],
)
def test_bad_input_is_one_line_and_exit_code_2(tiny_task, runner, args, message):
    result, _ = run_cli(runner, tiny_task, *args)
    assert result.exit_code == 2 and message in " ".join(result.output.split())
    assert "Traceback" not in result.output


def test_unknown_arch_fails_before_any_data_is_read(tmp_path, runner):
    result = runner.invoke(
        app, ["run", "rooms", "--arch", "resnet19", "--data-dir", str(tmp_path / "none")]
    )
    assert result.exit_code == 2 and "task folder" not in result.output
    assert (
        result.output.startswith("error: unknown arch 'resnet19'")
        and len(result.output.splitlines()) == 1
    )
    assert "inception_v3" in result.output and "did you mean resnet18" in result.output


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_a_gpu_is_a_clear_error(tiny_task, runner):
    result, _ = run_cli(runner, tiny_task, "toy", "--arch", "resnet18", "--device", "cuda")
    assert result.exit_code == 2 and "sees no CUDA GPU" in result.output


def test_missing_weights_exit_2_with_one_line_before_data_loads(tmp_path, runner, offline):
    result = runner.invoke(
        app, ["run", "toy", "--arch", "resnet18", "--data-dir", str(tmp_path / "none")]
    )
    assert result.exit_code == 2
    assert result.output.startswith("error: pretrained weights for resnet18 not found")
    assert "resnet18-f37072fd.pth" in result.output and len(result.output.strip().splitlines()) == 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_run_on_cuda(tiny_task, runner):
    result, exports = run_cli(
        runner,
        tiny_task,
        "toy",
        "--arch",
        "resnet18",
        "--epochs",
        "1",
        "--size",
        "32",
        "--device",
        "cuda",
    )
    assert result.exit_code == 0, result.output
    assert "device: cuda" in result.output


def test_a_log_gets_one_plain_line_per_epoch_and_no_bar_frames(tiny_task, runner):
    """Not on a terminal (CliRunner, like a file or a pipe): no progress bar, one line per epoch
    that trained (none for the predictions fastai makes afterwards), cached features included."""
    for extra, epochs in (([], 3), (["--cache-features", "2"], 2)):
        result, _ = run_cli(
            runner, tiny_task, "toy", "--arch", "resnet18", "--epochs", str(epochs), "--size", "32",
            *extra,
        )  # fmt: skip
        assert result.exit_code == 0, result.output
        assert "\r" not in result.output and "█" not in result.output
        lines = [line for line in result.output.splitlines() if line.startswith("epoch ")]
        assert [line.split(":")[0] for line in lines] == [
            f"epoch {e}/{epochs}" for e in range(1, epochs + 1)
        ]
        assert all("valid_accuracy" in line for line in lines)
