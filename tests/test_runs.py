"""Run folders: staging under a lock, publishing, and the sweep of folders whose process is gone."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import make_task

from replicate import runs


def hold(folder: Path) -> subprocess.Popen:
    """Another process that stages a run folder under `folder` and keeps writing it (sleeps)."""
    code = (
        "import sys, time\nfrom replicate import runs\n"
        f"s = runs.Staging({str(folder / 'resnet18-frozen')!r})\n"
        "print(s.path, flush=True)\ntime.sleep(600)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    proc.staging = Path(proc.stdout.readline().strip())
    return proc


def test_the_sweep_keeps_a_live_writers_folder_and_removes_a_dead_ones(tmp_path):
    live = hold(tmp_path)
    try:
        said = []
        assert runs.sweep(tmp_path, said.append) == [] and live.staging.is_dir() and not said
        live.send_signal(signal.SIGKILL)
        live.wait(timeout=30)
        assert runs.sweep(tmp_path, said.append) == [live.staging]
        assert not live.staging.exists()
        assert len(said) == 1 and "removed 1 unfinished run folder" in said[0]
    finally:
        live.kill()


def test_an_unlocked_staging_folder_is_swept_only_once_it_is_old(tmp_path):
    legacy = tmp_path / ".resnet18-frozen.partial-abc"  # made by a version that did not lock
    legacy.mkdir()
    assert runs.sweep(tmp_path, print) == []
    old = time.time() - runs.UNLOCKED_GRACE_S - 5
    os.utime(legacy, (old, old))
    assert runs.sweep(tmp_path, print) == [legacy] and not legacy.exists()


def test_publish_moves_the_folder_into_place_and_leaves_no_lock(tmp_path):
    staging = runs.Staging(tmp_path / "resnet18-frozen")
    staging.run.write_config({"task": "toy", "arch": "resnet18", "unfreeze": False})
    published = staging.publish()
    staging.discard()
    assert published == tmp_path / "resnet18-frozen" and runs.is_run(published)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["resnet18-frozen"]
    assert not (published / runs.LOCK).exists() and runs.Run(published).mode == "frozen"


def test_a_run_killed_mid_training_leaves_nothing_once_run_again(tmp_path):
    """SIGKILL during training, then the same `replicate run`: exit 0, no .partial- folder left."""
    make_task(tmp_path / "data" / "toy")
    args = [sys.executable, "-m", "replicate", "run", "toy", "--arch", "resnet18"]
    args += ["--no-pretrained", "--epochs", "8", "--size", "32", "--workers", "0"]
    args += ["--data-dir", str(tmp_path / "data"), "--exports-dir", str(tmp_path / "exports")]
    task_exports = tmp_path / "exports" / "toy"
    first = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 240
        while not list(task_exports.glob(f".*{runs.PARTIAL}*/{runs.HISTORY}")):
            assert first.poll() is None, first.stdout.read()  # still training
            assert time.time() < deadline
            time.sleep(0.2)
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
    finally:
        first.kill()
    assert first.returncode == -signal.SIGKILL
    assert len(list(task_exports.glob(f".*{runs.PARTIAL}*"))) == 1  # what the kill left
    again = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "removed 1 unfinished run folder(s) left by a process that is gone" in again.stdout
    assert [p.name for p in task_exports.iterdir()] == ["resnet18-frozen"]
    assert runs.finished(task_exports / "resnet18-frozen") is not None
