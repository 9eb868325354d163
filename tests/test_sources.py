"""Photos in, task folders out: the Houses import (from a zip, a folder or a download) and
`prepare` on a user's own photos.

    python -m pytest tests/test_sources.py
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pytest
from conftest import make_houses_zip, make_image
from PIL import Image

from replicate.cli import app
from replicate.data import sources
from replicate.errors import ReplicateError


def house_ids(folder: Path) -> set[int]:
    return {int(re.match(r"(\d+)_", p.name)[1]) for p in folder.rglob("*.jpg")}


def tree(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha1(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_houses_split_by_house_into_both_tasks(tmp_path, runner):
    src = make_houses_zip(tmp_path / "houses.zip", n_houses=10)
    result = runner.invoke(
        app, ["data", "houses", "--source", str(src), "--data-dir", str(tmp_path / "data")]
    )
    assert result.exit_code == 0, result.output
    rooms, exterior = tmp_path / "data" / "rooms", tmp_path / "data" / "exterior"
    for room in ("bathroom", "bedroom", "kitchen"):
        assert len(list(rooms.glob(f"*/{room}/*.jpg"))) == 10
    assert len(list(exterior.glob("*/frontal/*.jpg"))) == 10
    assert len(list(exterior.glob("*/indoor/*.jpg"))) == 30
    for task in (rooms, exterior):
        train, valid = house_ids(task / "train"), house_ids(task / "valid")
        assert train.isdisjoint(valid) and len(valid) == 2 and train | valid == set(range(1, 11))
    assert house_ids(rooms / "valid") == house_ids(exterior / "valid")


def test_houses_is_deterministic_and_rerun_changes_nothing(tmp_path):
    src = make_houses_zip(tmp_path / "houses.zip", n_houses=20)
    sources.import_houses(str(src), tmp_path / "a")
    sources.import_houses(str(src), tmp_path / "b")
    assert tree(tmp_path / "a" / "rooms") == tree(tmp_path / "b" / "rooms")
    before = tree(tmp_path / "a")
    sources.import_houses(str(src), tmp_path / "a")
    assert tree(tmp_path / "a") == before
    assert sources.split_houses(list(range(100)), 0.2, 1) != sources.split_houses(
        list(range(100)), 0.2, 2
    )


def test_houses_refuses_to_overwrite_different_data_and_force_keeps_a_backup(tmp_path, runner):
    src = make_houses_zip(tmp_path / "houses.zip")
    data_dir = tmp_path / "data"
    sources.import_houses(str(src), data_dir)
    mine = make_image(data_dir / "rooms" / "train" / "kitchen" / "my_own.jpg")
    result = runner.invoke(
        app, ["data", "houses", "--source", str(src), "--data-dir", str(data_dir)]
    )
    assert result.exit_code == 2 and "already exists" in result.output and mine.is_file()
    result = runner.invoke(
        app, ["data", "houses", "--source", str(src), "--data-dir", str(data_dir), "--force"]
    )
    assert result.exit_code == 0, result.output
    backups = list(data_dir.glob("rooms.bak-*"))
    assert len(backups) == 1 and (backups[0] / "train" / "kitchen" / "my_own.jpg").is_file()
    assert not (data_dir / "rooms" / "train" / "kitchen" / "my_own.jpg").exists()


def test_houses_from_an_extracted_folder(tmp_path):
    import zipfile

    src = make_houses_zip(tmp_path / "houses.zip")
    zipfile.ZipFile(src).extractall(tmp_path / "extracted")
    sources.import_houses(str(tmp_path / "extracted"), tmp_path / "d1")
    sources.import_houses(str(src), tmp_path / "d2")
    assert tree(tmp_path / "d1") == tree(tmp_path / "d2")


def test_houses_member_names_cannot_write_outside_the_destination(tmp_path):
    src = make_houses_zip(
        tmp_path / "houses.zip", extra={"../../escape/99_kitchen.txt": b"x", "/etc/evil.jpg": b"x"}
    )
    sources.import_houses(str(src), tmp_path / "inside" / "data")
    assert not (tmp_path / "escape").exists()
    written = [p for p in tmp_path.rglob("*") if p.is_file() and p != src]
    assert all((tmp_path / "inside" / "data") in p.parents for p in written)


@pytest.mark.parametrize(
    "content", [b"", b"PK\x03\x04 this is not really a zip", b"<html>404</html>"]
)
def test_a_broken_zip_is_a_clear_error_with_nothing_written(tmp_path, runner, content):
    bad = tmp_path / "broken.zip"
    bad.write_bytes(content)
    result = runner.invoke(
        app, ["data", "houses", "--source", str(bad), "--data-dir", str(tmp_path / "data")]
    )
    assert result.exit_code == 2 and "error:" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "data").exists() or not any((tmp_path / "data").iterdir())


def test_a_corrupt_member_leaves_no_half_written_task(tmp_path):
    src = make_houses_zip(tmp_path / "houses.zip", n_houses=5)
    raw = bytearray(src.read_bytes())
    at = (
        raw.index(b"JFIF") + 200
    )  # inside the first JPEG's compressed bytes: its CRC no longer matches
    raw[at : at + 20] = b"\x00" * 20
    src.write_bytes(bytes(raw))
    with pytest.raises(ReplicateError, match="not a readable zip"):
        sources.import_houses(str(src), tmp_path / "data")
    assert not (tmp_path / "data").exists() or not any((tmp_path / "data").iterdir())


def test_a_log_gets_a_few_plain_progress_lines_and_no_bar_frames(tmp_path, runner):
    """Not on a terminal (a file, a pipe, CliRunner): the archive read is a start, tenths and an
    end line, never a bar's carriage returns."""
    src = make_houses_zip(tmp_path / "houses.zip", n_houses=10)
    result = runner.invoke(
        app, ["data", "houses", "--source", str(src), "--data-dir", str(tmp_path / "data")]
    )
    assert result.exit_code == 0, result.output
    assert "\r" not in result.output
    lines = [line for line in result.output.splitlines() if line.startswith("reading houses.zip")]
    assert lines[0] == "reading houses.zip: 40 photos" and lines[-1].startswith(
        "reading houses.zip: done, 40 photos in "
    )
    assert len(lines) <= 11


# --- prepare ------------------------------------------------------------------------------------


def test_prepare_cleans_resizes_splits_and_never_touches_sources(tmp_path, runner):
    src = tmp_path / "scraped"
    for i in range(10):
        make_image(src / "balcony" / f"b{i}.jpg", (200, 10, 10), size=(640, 480), seed=i)
        make_image(
            src / "indoor" / f"i{i}.png", (10, 10, 200), size=(800, 600), seed=50 + i, fmt="PNG"
        )
    make_image(src / "balcony" / "tiny.jpg", size=(60, 40))
    (src / "balcony" / "notes.jpg").write_text("not an image")
    (src / "indoor" / "empty.jpg").write_bytes(b"")
    truncated = (src / "balcony" / "b0.jpg").read_bytes()[:300]
    (src / "indoor" / "truncated.jpg").write_bytes(truncated)
    before = tree(src)

    result = runner.invoke(
        app,
        [
            "prepare",
            str(src),
            "balcony",
            "--data-dir",
            str(tmp_path / "data"),
            "--width",
            "320",
            "--min-size",
            "100",
        ],
    )
    assert result.exit_code == 0, result.output
    assert tree(src) == before
    task = tmp_path / "data" / "balcony"
    for cls in ("balcony", "indoor"):
        assert len(list((task / "train" / cls).glob("*.jpg"))) == 8
        assert len(list((task / "valid" / cls).glob("*.jpg"))) == 2
    with Image.open(next((task / "train" / "indoor").glob("*.jpg"))) as im:
        assert im.size == (320, 240) and im.format == "JPEG"
    import pandas as pd

    report = pd.read_csv(task / "prepare_report.csv")
    rejected = report[report.status == "rejected"].set_index("source")["reason"]
    assert set(Path(p).name for p in rejected.index) == {
        "tiny.jpg",
        "notes.jpg",
        "empty.jpg",
        "truncated.jpg",
    }
    assert rejected[str(src / "balcony" / "tiny.jpg")].startswith("too small")
    assert rejected[str(src / "balcony" / "notes.jpg")].startswith("cannot decode")
    assert re.search(r"balcony\s+10\s+2\s+8\s+2", result.output)  # kept rejected train valid
    assert re.search(r"indoor\s+10\s+2\s+8\s+2", result.output)
    assert "\r" not in result.output and f"cleaning {src}: done, 24 photos" in result.output


def test_prepare_keeps_both_files_when_names_clash(tmp_path):
    src = tmp_path / "scraped"
    make_image(src / "a" / "x.jpg", seed=1)
    make_image(src / "a" / "x.png", seed=2, fmt="PNG")
    make_image(src / "b" / "y.jpg", seed=3)
    task, summary = sources.prepare_task(src, "t", tmp_path / "data", valid_pct=0, width=0)
    assert sorted(p.name for p in (task / "train" / "a").iterdir()) == ["x-1.jpg", "x.jpg"]


def test_prepare_errors(tmp_path, runner):
    result = runner.invoke(
        app, ["prepare", str(tmp_path / "nope"), "t", "--data-dir", str(tmp_path / "data")]
    )
    assert result.exit_code == 2 and "does not exist" in result.output
    (tmp_path / "flat").mkdir()
    make_image(tmp_path / "flat" / "a.jpg")
    result = runner.invoke(
        app, ["prepare", str(tmp_path / "flat"), "t", "--data-dir", str(tmp_path / "data")]
    )
    assert result.exit_code == 2 and "no class folders" in result.output
    (tmp_path / "src" / "good").mkdir(parents=True)
    make_image(tmp_path / "src" / "good" / "a.jpg")
    (tmp_path / "src" / "bad").mkdir()
    (tmp_path / "src" / "bad" / "a.jpg").write_text("nope")
    result = runner.invoke(
        app, ["prepare", str(tmp_path / "src"), "t", "--data-dir", str(tmp_path / "data")]
    )
    assert result.exit_code == 2 and "bad" in result.output


# --- the archive's download ---------------------------------------------------------------------


@pytest.fixture
def http_server(tmp_path):
    """A loopback HTTP server over tmp_path/www, standing in for GitHub's archive download."""
    import functools
    import http.server
    import threading

    root = tmp_path / "www"
    root.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_houses_downloads_the_archive_once_and_imports_it(tmp_path, http_server):
    root, url = http_server
    make_houses_zip(root / "master.zip", n_houses=10)
    tasks = sources.import_houses(f"{url}/master.zip", tmp_path / "data")
    assert (tmp_path / "data" / ".downloads" / "Houses-dataset-master.zip").is_file()
    assert len(list(tasks["rooms"].rglob("*.jpg"))) == 30
    (root / "master.zip").unlink()  # the second run uses the kept download
    sources.import_houses(f"{url}/master.zip", tmp_path / "data")


def test_a_failed_download_is_one_clear_error_with_nothing_left(tmp_path, runner, http_server):
    root, url = http_server
    result = runner.invoke(
        app, ["data", "houses", "--source", f"{url}/missing.zip", "--data-dir", str(tmp_path / "d")]
    )
    assert (
        result.exit_code == 2
        and "could not download" in result.output
        and "--source FILE" in result.output
    )
    assert not list((tmp_path / "d").rglob("*.zip")) and not list(
        (tmp_path / "d").rglob("*.partial")
    )
