"""`replicate run` end to end through the real CLI: the run folder, its numbers, its export.

    python -m pytest tests/test_train.py
"""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pandas as pd
import pytest
import torch
from PIL import Image

from conftest import ZOO_SIZES
from replicate import data, models, report, train
from replicate.cli import app
from replicate.models import ARCHS

RUN_FILES = {"config.json", "history.csv", "metrics.json", "export.pkl", "loss.png", "accuracy.png",
             "confusion_matrix.png", "top_losses.png", "top_losses.csv", "valid_predictions.csv"}
HISTORY = ["epoch", "train_loss", "train_accuracy", "valid_loss", "valid_accuracy", "seconds", "train_seconds"]
TIMM = ["efficientnet_b0", "convnext_atto", "vit_tiny_patch16_224"]  # BatchNorm CNN, ConvNeXt, ViT


def run_cli(runner, data_dir, *args):
    exports = data_dir.parent / "exports"
    result = runner.invoke(app, ["run", *args, "--no-pretrained", "--workers", "0",
                                 "--data-dir", str(data_dir), "--exports-dir", str(exports)])
    return result, exports


def assert_valid_png(path):
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size[0] > 100 and im.size[1] > 100


@pytest.mark.parametrize("arch", [*ARCHS, "convnext_atto"])
@pytest.mark.parametrize("mode", ["frozen", "unfrozen"])
def test_run_leaves_a_complete_run_folder_for_every_arch(zoo, arch, mode):
    run_dir, output = zoo[arch, mode]
    unfreeze = mode == "unfrozen"
    assert RUN_FILES <= {p.name for p in run_dir.iterdir()}
    assert not [p.name for p in run_dir.parent.iterdir() if p.name.startswith(".")]  # no staging folder left
    assert "device: cpu" in output and f"results: {run_dir}" in output

    history = pd.read_csv(run_dir / "history.csv")
    assert list(history.columns) == HISTORY and list(history.epoch) == [1, 2]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["best_valid_accuracy"] == history.valid_accuracy.max()
    assert metrics["last_valid_accuracy"] == history.valid_accuracy.iloc[-1]
    assert metrics["n_train"] == 8 and metrics["n_valid"] == 4 and metrics["classes"] == ["blue", "red"]
    # The exported weights are the best epoch's: its accuracy is what the predictions give.
    preds = pd.read_csv(run_dir / "valid_predictions.csv")
    assert (preds.actual == preds.predicted).mean() == pytest.approx(metrics["best_valid_accuracy"])
    config = json.loads((run_dir / "config.json").read_text())
    assert config["arch"] == arch and config["unfreeze"] == unfreeze and config["size"] == ZOO_SIZES[arch]
    assert config["lr"] == 0.001 and config["momentum"] == 0.9 and config["bs"] == 32 and config["recipe"] == "paper"
    assert config["aux_logits"] == (arch == "inception_v3")
    assert {"torch", "fastai", "torchvision", "timm", "python"} <= set(config["environment"])
    spec = models.get_arch(arch)  # the input its pretrained weights want: ImageNet's for the study's five
    assert config["preprocess"] == {"size": config["size"], "crop_pct": spec.crop_pct, "interpolation": spec.interpolation,
                                    "mean": list(spec.mean), "std": list(spec.std)}
    assert config["arch_source"] == ("torchvision" if arch in ARCHS else "timm") and config["weights"] is None
    # model.onnx where asked for (--onnx), not otherwise (REPLICATE_ONNX=0 in the tests), and checksummed
    assert (run_dir / "model.onnx").is_file() == unfreeze == config["onnx"]
    assert set(metrics["checksums"]) == ({"export.pkl", "model.onnx"} if unfreeze else {"export.pkl"})
    for png in ("loss.png", "accuracy.png", "confusion_matrix.png", "top_losses.png"):
        assert_valid_png(run_dir / png)


def test_exports_predict_the_same_in_a_fresh_cpu_process(zoo):
    """export.pkl of study, timm CNN, ConvNeXt and ViT runs, loaded by plain fastai in a new process
    (one process for all four: its start-up is most of the time)."""
    runs = [zoo[arch, "unfrozen"][0] for arch in ("resnet18", *TIMM)]
    preds = [pd.read_csv(r / "valid_predictions.csv") for r in runs]
    script = textwrap.dedent("""
        import json, sys
        from fastai.learner import load_learner
        out = []
        for run, paths in json.loads(sys.argv[1]):
            learn = load_learner(run + "/export.pkl", cpu=True)
            out.append([[str(label), probs.tolist()] for label, _, probs in map(learn.predict, paths)])
        print(json.dumps(out))
    """)
    work = json.dumps([[str(r), p.path.tolist()] for r, p in zip(runs, preds)])
    done = subprocess.run([sys.executable, "-c", script, work], capture_output=True, text=True, check=True)
    fresh = json.loads(done.stdout.strip().splitlines()[-1])
    for run, p, got in zip(runs, preds, fresh):
        assert [label for label, _ in got] == p.predicted.tolist(), run
        probs = torch.tensor([q for _, q in got])
        assert torch.allclose(probs, torch.tensor(p[["p_blue", "p_red"]].values, dtype=torch.float32), atol=1e-4), run


def test_report_rebuilds_the_plots_from_the_folder_alone(tiny_task, runner):
    result, exports = run_cli(runner, tiny_task, "toy", "--arch", "resnet18", "--epochs", "1", "--size", "32")
    run_dir = exports / "toy" / "resnet18-frozen"
    plots = [run_dir / p for p in ("loss.png", "accuracy.png", "confusion_matrix.png", "top_losses.png")]
    for p in plots:
        p.unlink()
    (run_dir / "export.pkl").unlink()  # no learner needed
    written = report.render_run(run_dir)
    assert all(p in written and p.is_file() for p in plots)
    worst = pd.read_csv(run_dir / "top_losses.csv")
    assert list(worst.columns) == ["path", "actual", "predicted", "probability", "loss"]
    assert worst.loss.is_monotonic_decreasing and len(worst) == 4


def test_a_failed_run_leaves_no_folder_that_looks_finished(tiny_task, runner, monkeypatch):
    def broken(run_dir):
        raise RuntimeError("disk full")
    monkeypatch.setattr(report, "render_run", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        train.run(train.RunConfig("toy", "resnet18", epochs=1, size=32, pretrained=False, onnx=False, workers=0,
                                  data_dir=tiny_task, exports_dir=tiny_task.parent / "exports"))
    assert list((tiny_task.parent / "exports" / "toy").iterdir()) == []


def test_a_symlink_loop_in_a_task_folder_counts_each_photo_once(tiny_task, runner):
    red = tiny_task / "toy" / "train" / "red"
    (red / "again").symlink_to(red, target_is_directory=True)  # red/again/again/... forever
    images = data.scan_task(tiny_task / "toy")
    assert images.counts.loc["red", "train"] == 4 and len(images.files) == 12


def test_unreadable_image_is_skipped_and_the_run_goes_on(tiny_task, runner):
    (tiny_task / "toy" / "train" / "red" / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    result, exports = run_cli(runner, tiny_task, "toy", "--arch", "resnet18", "--epochs", "1", "--size", "32")
    assert result.exit_code == 0, result.output
    assert "broken.jpg" in result.output
    metrics = json.loads((exports / "toy" / "resnet18-frozen" / "metrics.json").read_text())
    assert metrics["n_train"] == 8 and metrics["skipped_images"][0].endswith("broken.jpg")


@pytest.mark.parametrize("args, message", [
    (["toy", "--arch", "resnet19"], "unknown arch 'resnet19'"),
    (["nosuchtask", "--arch", "resnet18"], "task folder"),
    (["toy", "--arch", "alexnet", "--size", "32"], "at least 63"),
])
def test_bad_input_is_one_line_and_exit_code_2(tiny_task, runner, args, message):
    result, _ = run_cli(runner, tiny_task, *args)
    assert result.exit_code == 2 and message in " ".join(result.output.split())
    assert "Traceback" not in result.output


def test_unknown_arch_fails_before_any_data_is_read(tmp_path, runner):
    result = runner.invoke(app, ["run", "rooms", "--arch", "resnet19", "--data-dir", str(tmp_path / "none")])
    assert result.exit_code == 2 and "task folder" not in result.output
    assert result.output.startswith("error: unknown arch 'resnet19'") and len(result.output.splitlines()) == 1
    assert "inception_v3" in result.output and "did you mean resnet18" in result.output


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_a_gpu_is_a_clear_error(tiny_task, runner):
    result, _ = run_cli(runner, tiny_task, "toy", "--arch", "resnet18", "--device", "cuda")
    assert result.exit_code == 2 and "sees no CUDA GPU" in result.output


def test_missing_weights_exit_2_with_one_line_before_data_loads(tmp_path, runner, offline):
    result = runner.invoke(app, ["run", "toy", "--arch", "resnet18", "--data-dir", str(tmp_path / "none")])
    assert result.exit_code == 2
    assert result.output.startswith("error: pretrained weights for resnet18 not found")
    assert "resnet18-f37072fd.pth" in result.output and len(result.output.strip().splitlines()) == 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_run_on_cuda(tiny_task, runner):
    result, exports = run_cli(runner, tiny_task, "toy", "--arch", "resnet18", "--epochs", "1", "--size", "32",
                              "--device", "cuda")
    assert result.exit_code == 0, result.output
    assert "device: cuda" in result.output


def test_houses_end_to_end(houses, runner):
    """The real listing photos, as `replicate data houses` imported them: one short unfrozen run of the
    study's smallest backbone."""
    result, exports = run_cli(runner, houses, "rooms", "--arch", "resnet18", "--epochs", "1", "--size", "64",
                              "--unfreeze")
    assert result.exit_code == 0, result.output
    metrics = json.loads((exports / "rooms" / "resnet18-unfrozen" / "metrics.json").read_text())
    assert metrics["n_train"] == 1284 and metrics["n_valid"] == 321
    assert metrics["best_valid_accuracy"] > 0.4  # 3 balanced classes: chance is 1/3
    assert data.scan_task(houses / "rooms").counts.values.sum() == 1605
