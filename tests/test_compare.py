"""`replicate compare` and `replicate report`: the grid, resuming, failures, tables, figures, the page.

python -m pytest tests/test_compare.py
"""

from __future__ import annotations

import base64
import json
import re
import shutil

import pandas as pd
import pytest
from conftest import ROOMS, TINY_RUN, compare_cli, folders_args, make_task
from PIL import Image

from replicate.audit import checks
from replicate.cli import app
from replicate.config import RunConfig
from replicate.report import compare_report
from replicate.training import compare, train


@pytest.fixture
def rooms(tmp_path):
    """A tiny task named like the study's, so the table carries the study's numbers."""
    make_task(tmp_path / "data" / "rooms", classes=ROOMS)
    return tmp_path


def png_ok(data: bytes) -> bool:
    return data.startswith(b"\x89PNG\r\n\x1a\n")


def test_compare_runs_the_grid_writes_everything_and_reuses_it(grid, grid_copy, runner):
    root, output = grid
    assert "[cell 1/4] resnet18-frozen" in output and "[cell 4/4] alexnet-unfrozen" in output
    assert (
        "alexnet (torchvision) frozen (paper recipe), 63px" in output
    )  # --size 32 raised to AlexNet's minimum
    assert "4 trained, 0 reused, 0 failed" in output
    out = root / "exports" / "rooms" / "compare"
    for name in (
        "table.csv",
        "table.md",
        "loss_frozen.png",
        "accuracy_frozen.png",
        "loss_unfrozen.png",
        "accuracy_unfrozen.png",
        "tradeoff.png",
        "report.html",
    ):
        assert (out / name).is_file(), name
    table = pd.read_csv(out / "table.csv")
    assert list(zip(table.arch, table["mode"])) == [
        ("resnet18", "frozen"),
        ("alexnet", "frozen"),
        ("resnet18", "unfrozen"),
        ("alexnet", "unfrozen"),
    ]
    row = table.set_index(["arch", "mode"]).loc[("resnet18", "unfrozen")]
    assert row.paper_acc == 96.35 and row.paper_s == 256  # the study's rooms table 4.6
    metrics = json.loads(
        (root / "exports" / "rooms" / "resnet18-unfrozen" / "metrics.json").read_text()
    )
    assert row.max_valid_acc == pytest.approx(100 * metrics["best_valid_accuracy"], abs=0.01)
    assert row.diff_acc == pytest.approx(row.max_valid_acc - 96.35, abs=0.01)
    assert (table.ci95_low <= table.max_valid_acc).all() and (
        table.max_valid_acc <= table.ci95_high
    ).all()
    assert list(table.epochs) == [1] * 4 and list(table["size"]) == [32, 63, 32, 63]
    assert "resnet18" in output and "max_valid_acc" in output  # the table, printed

    stamps = {
        p: p.stat().st_mtime_ns for p in (grid_copy / "exports" / "rooms").glob("*/export.pkl")
    }
    assert len(stamps) == 4
    again = compare_cli(runner, grid_copy)
    assert again.exit_code == 0 and "0 trained, 4 reused, 0 failed" in again.output
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps

    out = grid_copy / "exports" / "rooms" / "compare"
    before = (out / "table.csv").read_text()
    for f in out.iterdir():
        f.unlink()
    rebuilt = runner.invoke(app, ["report", "rooms", "--exports-dir", str(grid_copy / "exports")])
    assert rebuilt.exit_code == 0, rebuilt.output
    assert (out / "table.csv").read_text() == before and (out / "report.html").is_file()
    every = runner.invoke(app, ["report", "all", "--exports-dir", str(grid_copy / "exports")])
    assert every.exit_code == 0 and "rooms:" in every.output


def test_report_page_shows_the_table_and_every_image(grid):
    page_path = grid[0] / "exports" / "rooms" / "compare" / "report.html"
    page = page_path.read_text()
    assert page.count("<tr class=best>") == 1 and "<th>paper_acc</th>" in page and "96.35" in page
    table = pd.read_csv(page_path.parent / "table.csv")
    top = table[table.max_valid_acc == table.max_valid_acc.max()]
    assert any(f"Best cell: <b>{r.arch} {r.mode}</b>" in page for r in top.itertuples())
    sources = re.findall(r'<img alt="[^"]*" (?:class=\w+ )?src="([^"]+)"', page)
    embedded = [s for s in sources if s.startswith("data:image/png;base64,")]
    beside = [s for s in sources if not s.startswith("data:")]
    assert len(embedded) == 5  # loss and accuracy per mode, and the trade-off plot
    assert all(png_ok(base64.b64decode(s.split(",", 1)[1])) for s in embedded)
    assert len(beside) == 8  # confusion matrix and top losses per cell
    for rel in beside:
        with Image.open(page_path.parent / rel) as im:
            assert im.format == "PNG"


def test_an_interrupted_compare_resumes_and_retrains_only_the_broken_cell(grid_copy, monkeypatch):
    shutil.rmtree(grid_copy / "exports" / "rooms" / "alexnet-frozen")
    base = RunConfig(
        "rooms",
        "resnet18",
        epochs=1,
        size=32,
        pretrained=False,
        workers=0,
        data_dir=grid_copy / "data",
        exports_dir=grid_copy / "exports",
    )
    cfgs = compare.grid(base, ["resnet18", "alexnet"], ["frozen"], seeds=1)
    real_run, calls = train.run, []

    def killed_in_second_cell(cfg, log=print, images=None, audited=None, checked=None):
        calls.append(cfg.run_name)
        if cfg.arch == "alexnet":
            raise KeyboardInterrupt  # Ctrl-C in the middle of the cell
        return real_run(cfg, log, images, audited, checked)

    monkeypatch.setattr(train, "run", killed_in_second_cell)
    with pytest.raises(KeyboardInterrupt):
        compare.run_grid(cfgs, log=lambda *a: None)
    assert calls == ["alexnet-frozen"]  # resnet18-frozen was finished: reused, not run
    assert not (grid_copy / "exports" / "rooms" / "alexnet-frozen").exists()
    assert not list(
        (grid_copy / "exports" / "rooms").glob(".alexnet-frozen*")
    )  # no staging folder left
    monkeypatch.setattr(train, "run", real_run)
    cells = compare.run_grid(cfgs, log=lambda *a: None)
    assert [c.status for c in cells] == ["reused", "trained"]
    assert compare.is_finished(cfgs[1])


def test_a_changed_configuration_is_not_reused(grid):
    base = RunConfig(
        "rooms",
        "resnet18",
        epochs=1,
        size=32,
        pretrained=False,
        workers=0,
        data_dir=grid[0] / "data",
        exports_dir=grid[0] / "exports",
    )
    assert compare.is_finished(base)  # what the grid's command line made
    assert not compare.is_finished(RunConfig(**{**base.__dict__, "epochs": 2}))
    assert not compare.is_finished(RunConfig(**{**base.__dict__, "size": 48}))
    assert not compare.is_finished(RunConfig(**{**base.__dict__, "freeze_bn": True}))
    assert compare.is_finished(
        RunConfig(**{**base.__dict__, "workers": 2, "onnx": True})
    )  # same result


def test_a_failing_cell_is_recorded_and_the_grid_goes_on(grid_copy, runner, monkeypatch):
    runs = grid_copy / "exports" / "rooms"
    for name in ("resnet18-unfrozen", "alexnet-frozen"):  # cells 2 and 3 of 4
        shutil.rmtree(runs / name)
    real_run = train.run

    def out_of_memory_in_cell_2(cfg, log=print, images=None, audited=None, checked=None):
        if cfg.arch == "resnet18" and cfg.unfreeze:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_run(cfg, log, images, audited, checked)

    monkeypatch.setattr(train, "run", out_of_memory_in_cell_2)
    result = compare_cli(runner, grid_copy)
    assert result.exit_code == 1
    assert "1 trained, 2 reused, 1 failed" in result.output
    assert "failed: resnet18-unfrozen: RuntimeError: CUDA out of memory" in result.output
    # cell 2 failed; cell 3 was trained after it
    assert result.output.index("cell failed: RuntimeError") < result.output.index(
        "[cell 3/4] alexnet-frozen"
    )
    assert (runs / "alexnet-frozen" / "metrics.json").is_file()
    out = runs / "compare"
    assert json.loads((out / "failures.json").read_text())[0]["cell"] == "resnet18-unfrozen"
    assert "CUDA out of memory" in (out / "report.html").read_text()
    assert len(pd.read_csv(out / "table.csv")) == 3


def test_seeds_repeat_each_cell_and_report_the_spread(grid_copy, runner):
    result = compare_cli(runner, grid_copy, "--seeds", "2", "--modes", "frozen")
    assert result.exit_code == 0, result.output
    assert "2 trained, 2 reused, 0 failed" in result.output
    names = sorted(p.name for p in (grid_copy / "exports" / "rooms").iterdir())
    assert names == [
        "alexnet-frozen",
        "alexnet-frozen-seed43",
        "alexnet-unfrozen",
        "compare",
        "resnet18-frozen",
        "resnet18-frozen-seed43",
        "resnet18-unfrozen",
    ]
    table = pd.read_csv(grid_copy / "exports" / "rooms" / "compare" / "table.csv")
    frozen = table["mode"] == "frozen"
    assert (table[frozen].seeds == 2).all() and table[frozen].acc_std.notna().all()
    assert (table[~frozen].seeds == 1).all()  # the unfrozen cells, one seed each


@pytest.mark.parametrize(
    "arch, size",
    [
        ("resnet18", 32),
        ("alexnet", 64),
        ("vgg11_bn", 32),
        ("densenet121", 32),
        ("inception_v3", 75),
    ],
)
def test_fastai_recipe_runs_for_every_arch_in_both_modes(tiny_task, runner, arch, size):
    exports = tiny_task.parent / "exports"
    for mode in ([], ["--unfreeze"]):
        options = ["--recipe", "fastai", "--epochs", "2", "--size", str(size), "--lr", "1e-3"]
        options += ["--no-pretrained", "--workers", "0", *folders_args(tiny_task, exports)]
        result = runner.invoke(app, ["run", "toy", "--arch", arch, *options, *mode])
        assert result.exit_code == 0, result.output
    for name in (f"{arch}-frozen-fastai", f"{arch}-unfrozen-fastai"):
        history = pd.read_csv(exports / "toy" / name / "history.csv")
        assert list(history.epoch) == [1, 2]  # fine_tune's frozen epoch counts in the total


def test_fastai_recipe_sits_beside_paper_runs_in_one_table(grid_copy, runner):
    result = compare_cli(runner, grid_copy, "--modes", "frozen", "--recipe", "fastai")
    assert result.exit_code == 0, result.output
    assert "2 trained, 0 reused" in result.output  # the paper cells are not the fastai recipe's
    assert (
        "(the fastai recipe's rate from random init)" in result.output
    )  # --no-pretrained: not lr_find
    config = json.loads(
        (grid_copy / "exports" / "rooms" / "resnet18-frozen-fastai" / "config.json").read_text()
    )
    assert config["recipe"] == "fastai" and config["lr"] == 3e-3
    table = pd.read_csv(grid_copy / "exports" / "rooms" / "compare-fastai" / "table.csv")
    assert sorted(set(table.recipe)) == ["fastai", "paper"]
    assert sorted(zip(table.arch, table["mode"], table.recipe)) == sorted(
        (a, m, r)
        for a in ("resnet18", "alexnet")
        for m, r in (("frozen", "paper"), ("unfrozen", "paper"), ("frozen", "fastai"))
    )


def test_wilson_interval_matches_known_values():
    low, high = compare_report.wilson_interval(50, 100)
    assert (round(low, 3), round(high, 3)) == (0.404, 0.596)
    low, high = compare_report.wilson_interval(100, 100)
    assert high == pytest.approx(1.0) and round(low, 3) == 0.963


def test_compare_errors(rooms, runner):
    result = compare_cli(runner, rooms, "--archs", "resnet18,resnet19")
    assert (
        result.exit_code == 2
        and "unknown arch 'resnet19'" in result.output
        and "[cell" not in result.output
    )
    result = compare_cli(runner, rooms, "--modes", "frozen,thawed")
    assert result.exit_code == 2 and "unknown mode 'thawed'" in result.output
    result = runner.invoke(app, ["report", "kitchens", "--exports-dir", str(rooms / "exports")])
    assert result.exit_code == 2 and "no finished paper runs" in result.output


def test_compare_checks_the_images_once_for_all_cells(grid_copy, runner, monkeypatch):
    from replicate.training import dataloaders

    shutil.rmtree(grid_copy / "exports" / "rooms" / "alexnet-frozen")
    real_scan, calls = dataloaders.scan_task, []
    monkeypatch.setattr(
        dataloaders, "scan_task", lambda task_dir: calls.append(task_dir) or real_scan(task_dir)
    )
    audits = []
    real_audit = checks.audit_task
    monkeypatch.setattr(
        checks, "audit_task", lambda *a, **k: audits.append(a[0]) or real_audit(*a, **k)
    )
    result = compare_cli(
        runner, grid_copy, "--modes", "frozen", "--archs", "resnet18,alexnet,densenet121"
    )
    assert result.exit_code == 0, result.output
    assert (
        "2 trained, 1 reused" in result.output and len(calls) == 1 and len(audits) == 1
    )  # audited once too
    metrics = [
        json.loads(
            (grid_copy / "exports" / "rooms" / f"{arch}-frozen" / "metrics.json").read_text()
        )
        for arch in ("alexnet", "densenet121")
    ]
    assert all(m["audit"]["photos"] == 18 for m in metrics)  # both trained cells record it


def test_compare_puts_study_and_timm_backbones_in_one_table_and_page(grid_copy, runner):
    rooms = grid_copy
    for name in ("alexnet-frozen", "alexnet-unfrozen", "resnet18-unfrozen"):
        shutil.rmtree(rooms / "exports" / "rooms" / name)
    result = compare_cli(
        runner, rooms, "--archs", "resnet18,convnext_atto,vit_tiny_patch16_224", "--modes", "frozen"
    )
    assert result.exit_code == 0, result.output
    assert "2 trained, 1 reused" in result.output
    out = rooms / "exports" / "rooms" / "compare"
    table = pd.read_csv(out / "table.csv").set_index("arch")
    assert list(table.index) == [
        "resnet18",
        "convnext_atto",
        "vit_tiny_patch16_224",
    ]  # the study's first
    assert (
        table.loc["resnet18", "paper_acc"] == 93.75
    )  # the study's numbers stay beside its five...
    assert (
        table.loc[["convnext_atto", "vit_tiny_patch16_224"], "paper_acc"].isna().all()
    )  # ...and only there
    page = (out / "report.html").read_text()
    assert all(f">{arch}<" in page or f"{arch} " in page for arch in table.index)
    for arch in table.index:
        assert (rooms / "exports" / "rooms" / f"{arch}-frozen" / "export.pkl").is_file()


def test_compare_quantizes_reused_cells_without_retraining(grid_copy, runner):
    run = grid_copy / "exports" / "rooms" / "resnet18-frozen"
    stamp = (run / "export.pkl").stat().st_mtime_ns
    result = compare_cli(
        runner, grid_copy, "--archs", "resnet18", "--modes", "frozen", "--quantize", "int8"
    )
    assert result.exit_code == 0, result.output
    assert (
        "0 trained, 1 reused, 0 failed" in result.output
        and (run / "export.pkl").stat().st_mtime_ns == stamp
    )
    assert (run / "model.int8.onnx").is_file()
    table = pd.read_csv(grid_copy / "exports" / "rooms" / "compare" / "table.csv").set_index(
        ["arch", "mode"]
    )
    int8 = json.loads((run / "metrics.json").read_text())["int8"]
    assert table.loc[("resnet18", "frozen"), "int8_acc"] == pytest.approx(
        round(100 * int8["valid_accuracy"], 2)
    )
    assert pd.isna(table.loc[("alexnet", "frozen"), "int8_acc"])  # not asked for: blank


def test_compare_force_retrains_and_all_runs_every_task(grid_copy, runner):
    run = grid_copy / "exports" / "rooms" / "resnet18-frozen"
    stamp = (run / "export.pkl").stat().st_mtime_ns
    forced = compare_cli(runner, grid_copy, "--archs", "resnet18", "--modes", "frozen", "--force")
    assert forced.exit_code == 0, forced.output
    assert (
        "1 trained, 0 reused" in forced.output and (run / "export.pkl").stat().st_mtime_ns != stamp
    )

    make_task(grid_copy / "data" / "toy")  # a second task
    every = runner.invoke(
        app,
        [
            "compare",
            "all",
            "--archs",
            "resnet18",
            "--modes",
            "frozen",
            *TINY_RUN,
            *folders_args(grid_copy / "data", grid_copy / "exports"),
        ],
    )
    assert every.exit_code == 0, every.output
    assert (
        "0 trained, 1 reused" in every.output and "1 trained, 0 reused" in every.output
    )  # rooms, then toy
    for task in ("rooms", "toy"):
        assert (grid_copy / "exports" / task / "compare" / "report.html").is_file()
