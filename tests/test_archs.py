"""Every backbone end to end, on runs trained once for the session (conftest.zoo): the study's five
and convnext_atto in both modes, efficientnet_b0 and a ViT finetuned. The run folder, export.pkl in
a fresh process, and model.onnx against the learner.

    python -m pytest tests/test_archs.py
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import ZOO_SIZES
from PIL import Image

from replicate.config import RunConfig
from replicate.engine import onnx_models
from replicate.models import archs
from replicate.models.archs import ARCHS
from replicate.training import train

RUN_FILES = {
    "config.json",
    "history.csv",
    "metrics.json",
    "export.pkl",
    "loss.png",
    "accuracy.png",
    "confusion_matrix.png",
    "top_losses.png",
    "top_losses.csv",
    "valid_predictions.csv",
}
HISTORY = [
    "epoch",
    "train_loss",
    "train_accuracy",
    "valid_loss",
    "valid_accuracy",
    "seconds",
    "train_seconds",
]
TIMM = ["efficientnet_b0", "convnext_atto", "vit_tiny_patch16_224"]  # BatchNorm CNN, ConvNeXt, ViT


def assert_valid_png(path):
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size[0] > 100 and im.size[1] > 100


def quiet(*args):
    pass


@pytest.mark.parametrize("arch", [*ARCHS, "convnext_atto"])
@pytest.mark.parametrize("mode", ["frozen", "unfrozen"])
def test_run_leaves_a_complete_run_folder_for_every_arch(zoo, arch, mode):
    run_dir, output = zoo[arch, mode]
    unfreeze = mode == "unfrozen"
    assert RUN_FILES <= {p.name for p in run_dir.iterdir()}
    assert not [
        p.name for p in run_dir.parent.iterdir() if p.name.startswith(".")
    ]  # no staging folder left
    assert "device: cpu" in output and f"results: {run_dir}" in output

    history = pd.read_csv(run_dir / "history.csv")
    assert list(history.columns) == HISTORY and list(history.epoch) == [1, 2]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["best_valid_accuracy"] == history.valid_accuracy.max()
    assert metrics["last_valid_accuracy"] == history.valid_accuracy.iloc[-1]
    assert (
        metrics["n_train"] == 8
        and metrics["n_valid"] == 4
        and metrics["classes"] == ["blue", "red"]
    )
    # The exported weights are the best epoch's: its accuracy is what the predictions give.
    preds = pd.read_csv(run_dir / "valid_predictions.csv")
    assert (preds.actual == preds.predicted).mean() == pytest.approx(metrics["best_valid_accuracy"])
    config = json.loads((run_dir / "config.json").read_text())
    assert (
        config["arch"] == arch
        and config["unfreeze"] == unfreeze
        and config["size"] == ZOO_SIZES[arch]
    )
    assert (
        config["lr"] == 0.001
        and config["momentum"] == 0.9
        and config["bs"] == 32
        and config["recipe"] == "paper"
    )
    assert config["aux_logits"] == (arch == "inception_v3")
    assert {"torch", "fastai", "torchvision", "timm", "python"} <= set(config["environment"])
    spec = archs.get_arch(
        arch
    )  # the input its pretrained weights want: ImageNet's for the study's five
    assert config["preprocess"] == {
        "size": config["size"],
        "crop_pct": spec.crop_pct,
        "interpolation": spec.interpolation,
        "mean": list(spec.mean),
        "std": list(spec.std),
    }
    assert (
        config["arch_source"] == ("torchvision" if arch in ARCHS else "timm")
        and config["weights"] is None
    )
    # model.onnx where asked for (--onnx), not otherwise (REPLICATE_ONNX=0 in the tests), and checksummed
    assert (run_dir / "model.onnx").is_file() == unfreeze == config["onnx"]
    assert set(metrics["checksums"]) == (
        {"export.pkl", "model.onnx"} if unfreeze else {"export.pkl"}
    )
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
    done = subprocess.run(
        [sys.executable, "-c", script, work], capture_output=True, text=True, check=True
    )
    fresh = json.loads(done.stdout.strip().splitlines()[-1])
    for run, p, got in zip(runs, preds, fresh):
        assert [label for label, _ in got] == p.predicted.tolist(), run
        probs = torch.tensor([q for _, q in got])
        assert torch.allclose(
            probs, torch.tensor(p[["p_blue", "p_red"]].values, dtype=torch.float32), atol=1e-4
        ), run


@pytest.mark.parametrize("arch", [*ZOO_SIZES, "resnet18-fastai"])
def test_onnx_runtime_gives_the_learners_probabilities_on_the_validation_photos(
    zoo, tmp_path, arch
):
    """The study's five, ConvNeXt (timm: crop_pct 0.95, bicubic, LayerNorm), and fastai's own head
    (concat pooling, BatchNorm1d, dropout)."""
    if arch == "resnet18-fastai":
        data_dir = zoo["resnet18", "frozen"][0].parents[2] / "data"  # the zoo's task
        cfg = RunConfig(
            "toy",
            "resnet18",
            unfreeze=True,
            recipe="fastai",
            lr=1e-3,
            epochs=1,
            size=32,
            pretrained=False,
            workers=0,
            audit=False,
            data_dir=data_dir,
            exports_dir=tmp_path,
        )
        run = train.run(cfg, log=quiet)
    else:
        run = zoo[arch, "unfrozen"][0]
    learner = pd.read_csv(
        run / "valid_predictions.csv"
    )  # the learner's get_preds, fastai's own pipeline
    model = onnx_models.load_onnx(run)
    onnx = onnx_models.tag_onnx([model], [Path(p) for p in learner.path], workers=0, progress=False)
    config = json.loads((run / "config.json").read_text())
    classes = json.loads((run / "metrics.json").read_text())["classes"]
    ours = onnx[[f"{config['task']}_p_{c}" for c in classes]].to_numpy()
    theirs = learner[[f"p_{c}" for c in classes]].to_numpy()
    assert np.abs(ours - theirs).max() < 1e-4
    assert (onnx[f"{config['task']}_predicted"] == learner.predicted).all()
    # The file alone says how to get from a photo to its input: what the run recorded.
    assert (
        model.classes == classes
        and model.meta["task"] == config["task"]
        and model.meta["arch"] == config["arch"]
    )
    assert {k: model.meta[k] for k in config["preprocess"]} == config["preprocess"]
