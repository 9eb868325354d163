"""--cache-features: a frozen run trains its new layer on body outputs computed once.

python -m pytest tests/test_features.py
"""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
from conftest import TINY_RUN, folders_args
from fastai.callback.core import Callback
from fastai.data.core import DataLoaders
from fastai.data.load import DataLoader
from fastai.learner import Learner
from test_train import run_cli
from torch import nn

from replicate.cli import app
from replicate.config import RunConfig
from replicate.training import compare, features


@pytest.mark.parametrize(
    "arch, size", [("resnet18", 32), ("inception_v3", 299)]
)  # inception: (main, aux) outputs
def test_cached_run_exports_a_whole_network_that_scores_what_training_recorded(
    tiny_task, runner, arch, size
):
    result, exports = run_cli(
        runner,
        tiny_task,
        "toy",
        "--arch",
        arch,
        "--size",
        str(size),
        "--epochs",
        "3",
        "--bs",
        "4",
        "--cache-features",
        "2",
    )
    assert result.exit_code == 0, result.output
    run_dir = exports / "toy" / f"{arch}-frozen-cached2"
    assert json.loads((run_dir / "config.json").read_text())["cache_features"] == 2
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert (
        metrics["feature_cache_seconds"] > 0
        and metrics["train_seconds"] > metrics["feature_cache_seconds"]
    )
    assert len(pd.read_csv(run_dir / "history.csv")) == 3
    # valid_predictions.csv comes from the exported network run on the photos (body + trained head):
    # its accuracy must be the one the head reached on the cached validation outputs.
    preds = pd.read_csv(run_dir / "valid_predictions.csv")
    assert (preds.actual == preds.predicted).mean() == pytest.approx(
        metrics["best_valid_accuracy"], abs=1e-6
    )


def test_each_epoch_reads_the_next_view():
    views = features.CachedViews([torch.zeros(6, 2), torch.ones(6, 2)], [torch.zeros(6).long()] * 2)
    seen = []

    class Record(Callback):
        def after_batch(self):
            if self.training:
                seen.append((self.epoch, float(self.xb[0].mean())))

    dls = DataLoaders(DataLoader(views, bs=3, shuffle=True), DataLoader(views, bs=3))
    learn = Learner(
        dls,
        nn.Linear(2, 2),
        loss_func=nn.CrossEntropyLoss(),
        cbs=[features.NextView(views), Record()],
    )
    with learn.no_bar(), learn.no_logging():
        learn.fit(3, 1e-3)
    assert {e: v for e, v in seen} == {0: 0.0, 1: 1.0, 2: 0.0}


@pytest.mark.parametrize(
    "args, message",
    [
        (["--unfreeze"], "needs a frozen run of the paper recipe"),
        (["--recipe", "fastai"], "needs a frozen run of the paper recipe"),
        (["--cache-features", "-1"], "give a number of views"),
    ],
)
def test_cache_features_where_it_does_not_apply_is_one_line_exit_2(
    tiny_task, runner, args, message
):
    result, exports = run_cli(
        runner,
        tiny_task,
        "toy",
        "--arch",
        "resnet18",
        "--size",
        "32",
        "--epochs",
        "1",
        "--cache-features",
        "2",
        *args,
    )
    assert (
        result.exit_code == 2
        and message in result.output
        and len(result.output.strip().splitlines()) == 1
    )
    assert not (exports / "toy").exists()


def test_compare_caches_only_its_frozen_cells():
    base = RunConfig("rooms", "resnet18", cache_features=3)
    cells = {
        c.run_name: c.cache_features
        for c in compare.grid(base, ["resnet18"], ["frozen", "unfrozen"], 1)
    }
    assert cells == {"resnet18-frozen-cached3": 3, "resnet18-unfrozen": 0}


def test_a_run_without_the_key_counts_as_uncached(tmp_path):
    cfg = RunConfig("toy", "resnet18", size=32, pretrained=False, exports_dir=tmp_path)
    cfg.run_dir.mkdir(parents=True)
    config = {k: v for k, v in {**cfg.to_dict(), "lr": 1e-3}.items() if k != "cache_features"}
    (cfg.run_dir / "config.json").write_text(json.dumps(config))
    (cfg.run_dir / "metrics.json").write_text("{}")
    assert compare.is_finished(cfg)  # folders made before --cache-features existed are reused


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_mixed_precision_on_a_cpu_is_a_clear_error(tiny_task, runner):
    result, exports = run_cli(
        runner, tiny_task, "toy", "--arch", "resnet18", "--size", "32", "--precision", "bf16"
    )
    assert result.exit_code == 2 and "--precision bf16 needs a CUDA GPU" in result.output
    assert not (exports / "toy").exists()


def test_runs_train_in_channels_last_layout(tiny_task, runner):
    result, exports = run_cli(
        runner, tiny_task, "toy", "--arch", "resnet18", "--size", "32", "--epochs", "1"
    )
    assert result.exit_code == 0, result.output
    # the learner as trained and pickled (fastai's load_learner(cpu=True) turns it contiguous again)
    learn = torch.load(exports / "toy" / "resnet18-frozen" / "export.pkl", weights_only=False)
    conv = learn.model[0][0].weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.parametrize(
    "args, message",
    [
        (["--precision", "bf16"], "needs a CUDA GPU"),
        (["--cache-features", "-1"], "give a number of views"),
    ],
)
def test_compare_refuses_bad_options_before_the_first_cell(tiny_task, runner, args, message):
    result = runner.invoke(
        app,
        [
            "compare",
            "toy",
            "--archs",
            "resnet18",
            *TINY_RUN,
            *folders_args(tiny_task, tiny_task.parent / "exports"),
            *args,
        ],
    )
    assert (
        result.exit_code == 2
        and message in result.output
        and len(result.output.strip().splitlines()) == 1
    )
    assert not (tiny_task.parent / "exports").exists()
