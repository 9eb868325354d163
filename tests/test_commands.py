"""Commands and options end to end that the stage tests do not reach: `demo`, `run --quantize`,
`report RUN_DIR`, export.pkl on its retry, `predict`'s listing options, and `interpret` on a task
that grew a class. (`compare --quantize/--force/all` are in test_compare.py.)

    python -m pytest tests/test_commands.py
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
import typer
from conftest import ROOMS, TINY_RUN, folders_args, make_image, make_task

from replicate.cli import app
from replicate.config import RunConfig
from replicate.training import demo


def test_demo_says_what_it_trains_and_where_the_results_are(tiny_task, runner, monkeypatch):
    """The command's own work (demo_config's choices are tested in test_transfer.py): it says why,
    trains that configuration and prints the summary."""
    exports = tiny_task.parent / "exports"
    chosen = RunConfig(
        "toy",
        "resnet18",
        epochs=1,
        size=32,
        pretrained=False,
        workers=0,
        data_dir=tiny_task,
        exports_dir=exports,
    )
    seen = []
    monkeypatch.setattr(
        demo,
        "demo_config",
        lambda d, e: seen.append((d, e)) or (chosen, "the reason, in one line"),
    )
    result = runner.invoke(
        app, ["demo", "--data-dir", str(tiny_task), "--exports-dir", str(exports)]
    )
    assert result.exit_code == 0, result.output
    assert seen == [(tiny_task, exports)]
    assert result.output.startswith("the reason, in one line")
    assert (
        f"results: {chosen.run_dir}" in result.output
        and (chosen.run_dir / "metrics.json").is_file()
    )


def test_run_quantize_writes_model_onnx_first_and_records_int8(runner, tmp_path):
    make_task(tmp_path / "data" / "rooms", classes=ROOMS)
    result = runner.invoke(
        app,
        [
            "run",
            "rooms",
            "--arch",
            "resnet18",
            *TINY_RUN,
            "--no-onnx",
            "--quantize",
            "int8",
            *folders_args(tmp_path / "data", tmp_path / "exports"),
        ],
    )
    assert result.exit_code == 0, result.output
    run = tmp_path / "exports" / "rooms" / "resnet18-frozen"
    assert (
        "has no model.onnx (trained with --no-onnx): writing it from export.pkl first"
        in result.output
    )
    metrics = json.loads((run / "metrics.json").read_text())
    assert {"export.pkl", "model.onnx", "model.int8.onnx"} <= set(metrics["checksums"])
    assert metrics["int8"]["fp32_valid_accuracy"] == pytest.approx(metrics["best_valid_accuracy"])
    assert "int8: " in result.output


def test_report_on_a_run_folder_redraws_its_plots(rooms_run, runner, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(rooms_run[1], run, ignore=shutil.ignore_patterns("*.pkl", "*.onnx"))
    plots = ("loss.png", "accuracy.png", "confusion_matrix.png", "top_losses.png")
    for p in plots:
        (run / p).unlink()
    result = runner.invoke(app, ["report", str(run)])
    assert result.exit_code == 0, result.output
    assert all((run / p).is_file() and str(run / p) in result.output for p in plots)


def test_export_pkl_written_on_the_retry_is_a_complete_run(runner, tmp_path, monkeypatch):
    from fastai.learner import Learner, load_learner

    make_task(tmp_path / "data" / "toy")
    real, calls = Learner.export, []

    def fails_once(self, *args, **kwargs):
        calls.append(next(self.model.parameters()).device.type)
        if len(calls) == 1:
            raise TypeError("cannot pickle '_thread.RLock' object")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Learner, "export", fails_once)
    result = runner.invoke(
        app,
        [
            "run",
            "toy",
            "--arch",
            "resnet18",
            *TINY_RUN,
            *folders_args(tmp_path / "data", tmp_path / "exports"),
        ],
    )
    assert result.exit_code == 0, result.output
    run = tmp_path / "exports" / "toy" / "resnet18-frozen"
    assert calls == ["cpu", "cpu"] and "warning" not in result.output
    metrics = json.loads((run / "metrics.json").read_text())
    assert "export_pkl_error" not in metrics and set(metrics["checksums"]) == {"export.pkl"}
    learn = load_learner(run / "export.pkl", cpu=True)
    preds = pd.read_csv(run / "valid_predictions.csv")
    assert str(learn.predict(preds.path[0])[0]) == preds.predicted[0]


@pytest.fixture
def listing_photos(tmp_path) -> Path:
    photos = tmp_path / "listing-photos"
    for house in (1, 2):
        for room, colour in (("kitchen", (60, 180, 60)), ("bedroom", (200, 60, 40))):
            make_image(photos / f"{house}_{room}.jpg", colour, seed=house)
    return photos


def test_a_listing_has_what_its_readable_photos_answer(rooms_run, listing_photos, runner, tmp_path):
    """One answer per attribute in the listing table: a multi-class model has one column per class
    (a listing has a kitchen photo when any photo's answer is kitchen); unreadable photos are
    counted and named, not answered; a listing with none readable says so, its answers empty."""
    photos = tmp_path / "photos"
    shutil.copytree(listing_photos, photos)
    (photos / "2_broken.jpg").write_bytes(b"not a photo")
    (photos / "3_broken.jpg").write_bytes(b"not one either")
    out = tmp_path / "tags.csv"
    args = ["predict", str(rooms_run[1]), str(photos), "--out", str(out)]
    result = runner.invoke(app, [*args, "--listing-pattern", r"^(\d+)_"])
    assert result.exit_code == 0, result.output
    tags = pd.read_csv(out, keep_default_na=False)
    broken = tags.path.str.contains("broken")
    assert (tags.rooms_predicted[broken] == "").all() and (tags.error[broken] != "").all()
    listings = pd.read_csv(tmp_path / "tags_listings.csv").set_index("listing")
    assert listings.photos.to_dict() == {1: 2, 2: 2, 3: 0}
    assert listings.unreadable.to_dict() == {1: 0, 2: 1, 3: 1}
    assert listings.loc[2, "unreadable_photos"] == str(photos / "2_broken.jpg")
    assert listings.loc[3, "error"] == "none of its photos could be read"
    assert listings.loc[3, [f"rooms_has_{c}" for c in ROOMS]].isna().all()
    house = tags.path.map(lambda p: Path(p).name.split("_")[0]).astype(int)
    for c in ROOMS:
        shown = (tags.rooms_predicted == c).groupby(house).any()
        assert (listings.loc[[1, 2], f"rooms_has_{c}"] == shown.loc[[1, 2]]).all()
    assert not [c for c in listings.columns if c.startswith("has_")]  # one answer: no 0.5 argmax
    result = runner.invoke(app, [*args, "--listing-pattern", r"^(\d+)_", "--threshold", "0.5"])
    assert result.exit_code == 2 and "--threshold" in result.output  # retired: the answers rule


def test_interpret_refuses_a_task_that_grew_a_class(rooms_run, runner, tmp_path):
    source = rooms_run[1]
    run, task = tmp_path / "run", tmp_path / "data" / "rooms"
    shutil.copytree(source, run)
    config = json.loads((run / "config.json").read_text())
    shutil.copytree(config["task_dir"], task)
    (run / "config.json").write_text(json.dumps({**config, "task_dir": str(task)}))
    for split in ("train", "valid"):
        make_image(task / split / "garage" / "g.jpg", (40, 190, 60))
    result = runner.invoke(app, ["interpret", str(run)])
    assert result.exit_code == 2
    assert (
        result.output.strip() == "error: the task now has classes the model never saw: ['garage']"
    )


def commands(group, path: tuple = ()) -> list[list[str]]:
    """Every command of the app, sub-commands (`data houses`) included: taken from the app itself,
    so a new command is checked without being listed here."""
    found = []
    for name, command in sorted(group.commands.items()):
        found += (
            commands(command, (*path, name)) if hasattr(command, "commands") else [[*path, name]]
        )
    return found


COMMANDS = commands(typer.main.get_command(app))


def test_the_help_test_sees_every_command():
    names = {" ".join(c) for c in COMMANDS}
    assert {"data houses", "index", "serve", "bundle", "predict", "run"} <= names


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_help_reads_as_whole_paragraphs_at_80_columns(runner, command):
    """Each paragraph of a command's description is wrapped once, to the width: no line but a
    paragraph's last ends short (a docstring's own line breaks kept and wrapped again read
    "... so it is / safe for models"), no line is wider than 80, and the example is one line."""
    result = runner.invoke(app, [*command, "--help"], env={"COLUMNS": "80"}, terminal_width=80)
    assert result.exit_code == 0, result.output
    lines = [line.rstrip() for line in result.output.splitlines()]  # rich pads lines with spaces
    assert max(len(line) for line in lines) <= 80
    text = "\n".join(lines)
    description = text.split("\nArguments:")[0].split("\nOptions:")[0]
    for paragraph in description.split("\n\n")[1:]:  # after the usage line
        body = paragraph.splitlines()
        assert all(len(line) >= 60 for line in body[:-1]), paragraph
    examples = [line for line in lines if line.strip().startswith("Example:")]
    assert len(examples) == 1 and len(examples[0]) <= 80


def test_a_usage_error_is_one_error_line_and_exit_2(tmp_path):
    """The console script (cli.main), not CliRunner: click's usage errors (a path that must exist,
    a missing argument, an unknown command) read as a ReplicateError does."""
    import subprocess
    import sys

    for args, says in (
        (["review", str(tmp_path / "nope")], "does not exist"),
        (["run"], "Missing argument"),
        (["nosuch"], "No such command"),
    ):
        done = subprocess.run(
            [sys.executable, "-m", "replicate", *args], capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 2 and done.stdout == "", done.stderr
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and says in lines[0], lines


def test_run_and_compare_take_every_training_option_with_runconfigs_defaults():
    """`run` and `compare` list the shared training options one by one (Typer reads options from a
    signature); every RunConfig field is an option of both, with RunConfig's default, but the
    study's fixed momentum and auxiliary-loss weight and what a compare's cells set."""
    import dataclasses

    from replicate.config import RunConfig

    group = typer.main.get_command(app)
    fixed = {"momentum", "aux_loss_weight"}
    for name, own in (("run", set()), ("compare", {"task", "arch", "unfreeze"})):
        params = {p.name: p for p in group.commands[name].params}
        for field in dataclasses.fields(RunConfig):
            if field.name in fixed | own:
                continue
            assert field.name in params, (name, field.name)
            if field.name not in ("task", "arch"):
                shown = getattr(params[field.name].default, "value", params[field.name].default)
                assert shown == field.default, (name, field.name, shown, field.default)


def test_a_listing_pattern_is_refused_before_any_photo_is_tagged(
    rooms_run, listing_photos, tmp_path
):
    """A pattern that does not compile, captures nothing, or matches none of the names: one
    `error:` line and exit code 2 from the console script, and nothing tagged or written."""
    import subprocess
    import sys

    out = tmp_path / "tags.csv"
    for pattern, says in (
        (r"^(\d+_", "is not a regular expression"),
        (r"^\d+_", "needs a group that captures the listing id"),
        (r"^house(\d+)", "matched none of the file names"),
    ):
        for command in ("predict", "index"):
            where = ["--out", str(out if command == "predict" else tmp_path / "index")]
            args = [command, str(rooms_run[1]), str(listing_photos), *where]
            done = subprocess.run(
                [sys.executable, "-m", "replicate", *args, "--listing-pattern", pattern],
                capture_output=True, text=True, timeout=120,
            )  # fmt: skip
            lines = done.stderr.strip().splitlines()
            assert done.returncode == 2 and len(lines) == 1, (command, pattern, done.stderr)
            assert lines[0].startswith("error: --listing-pattern") and says in lines[0]
            assert "tagging" not in done.stdout + done.stderr
    assert not out.exists() and not (tmp_path / "index").exists()


def test_photos_in_no_listing_are_counted_and_listed(rooms_run, listing_photos, runner, tmp_path):
    stray = tmp_path / "photos"
    shutil.copytree(listing_photos, stray)
    shutil.copy(next(stray.glob("*.jpg")), stray / "no-listing.jpg")
    out = tmp_path / "tags.csv"
    args = ["predict", str(rooms_run[1]), str(stray), "--out", str(out)]
    result = runner.invoke(app, [*args, "--listing-pattern", r"^(\d+)_"])
    assert result.exit_code == 0, result.output
    unlisted = tmp_path / "tags_listings_unmatched.txt"
    assert "1 photo in no listing" in result.output and str(unlisted) in result.output
    assert unlisted.read_text().splitlines() == [str(stray / "no-listing.jpg")]


def test_counts_of_one_read_as_one(rooms_run, listing_photos, runner, tmp_path):
    one = tmp_path / "one"
    one.mkdir()
    shutil.copy(listing_photos / "1_kitchen.jpg", one)
    out = ["--out", str(tmp_path / "tags.csv"), "--listing-pattern", r"^(\d+)_"]
    result = runner.invoke(app, ["predict", str(rooms_run[1]), str(one), *out])
    assert result.exit_code == 0, result.output
    assert "1 image, 1 model(s), " in result.output and "\n1 listing; table" in result.output
    indexed = runner.invoke(
        app, ["index", str(rooms_run[1]), str(one), "--out", str(tmp_path / "i"), *out[2:]]
    )
    assert indexed.exit_code == 0, indexed.output
    assert "tagging 1 photo with" in indexed.output and "; 1 listing; 1 part, " in indexed.output
