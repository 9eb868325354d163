"""Task folders on disk: their layout, their photos. No fastai or PyTorch here, so the commands that
only read folders (`audit`, `clean`) start in a second.

    python -c "from replicate.folders import task_files; print(task_files('data/rooms')[1])"

A task is `TASK/{train,valid}/<class>/*.jpg`; folders starting with `_` or `.` are not classes
(`_removed`, `_cleaning`, `_audit` are replicate's own).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pandas as pd

from .errors import ReplicateError
from .photos import image_files

SPLITS = ("train", "valid")
LAYOUT = "TASK/train/<class>/*.jpg and TASK/valid/<class>/*.jpg"


def sha256_file(path: Path) -> str:
    """SHA-256 of a file, read in blocks (exports and weights are hundreds of MB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def sha256_or_empty(path: Path) -> str:
    """A photo's SHA-256; '' when it cannot be read (its row's error says why)."""
    try:
        return sha256_file(path)
    except OSError:
        return ""


def class_dirs(split_dir: Path) -> set[str]:
    return {d.name for d in split_dir.iterdir() if d.is_dir() and not d.name.startswith((".", "_"))}


def task_files(task_dir: Path) -> tuple[dict[tuple[str, str], list[Path]], list[str]]:
    """({(split, class): image files}, classes) of a task folder, its layout checked; a ReplicateError
    saying what to fix when it is wrong. The images are not decoded here."""
    task_dir = Path(task_dir)
    if not task_dir.is_dir():
        raise ReplicateError(
            f"task folder {task_dir} not found: expected {LAYOUT} under {task_dir.parent} "
            f"(run `replicate data houses` or `replicate prepare SOURCE_DIR {task_dir.name}`)"
        )
    for split in SPLITS:
        if not (task_dir / split).is_dir():
            raise ReplicateError(f"{task_dir / split} is missing: expected {LAYOUT}")
    train, valid = (class_dirs(task_dir / s) for s in SPLITS)
    if not train and not valid:
        raise ReplicateError(f"{task_dir} has no class folders: expected {LAYOUT}")
    if train != valid:
        raise ReplicateError(
            f"train and valid have different classes in {task_dir}: "
            f"only in train: {sorted(train - valid) or 'none'}, only in valid: {sorted(valid - train) or 'none'}"
        )
    classes = sorted(train)
    files = {(s, c): image_files(task_dir / s / c) for s in SPLITS for c in classes}
    empty = [f"{s}/{c}" for (s, c), fs in files.items() if not fs]
    if empty:
        raise ReplicateError(
            f"no images (.jpg, .png, ...) in {task_dir} for: {', '.join(empty)}; "
            f"every class needs photos in both train and valid"
        )
    return files, classes


def image_counts(task_dir: Path) -> pd.DataFrame:
    """Images per class (rows) and split (columns), from the file names alone (no decoding)."""
    return (
        pd.DataFrame(
            {
                s: {c: len(image_files(task_dir / s / c)) for c in sorted(class_dirs(task_dir / s))}
                for s in SPLITS
            }
        )
        .fillna(0)
        .astype(int)
    )


def find_images(paths: list[Path]) -> list[Path]:
    """Image files among `paths`, folders searched recursively; other files named directly are kept
    (they get an error row) so nothing the user named silently disappears."""
    found = []
    for p in paths:
        if p.is_dir():
            found += image_files(p)
        elif p.exists():
            found.append(p)
        else:
            raise ReplicateError(f"{p} does not exist")
    return list(dict.fromkeys(found))
