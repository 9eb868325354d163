"""Photos on disk -> task folders: the public Houses Dataset, or a user's own scraped photos.

    replicate data houses --source ../shared/datasets/houses-dataset-400.zip
    replicate prepare ~/scraped balcony --min-size 200

A task is a folder `data/TASK/{train,valid}/<class>/*.jpg` (`data` turns one into DataLoaders).
Two ways in: `import_houses` builds the `rooms`, `exterior` and `kitchen` tasks from the Houses Dataset,
`prepare_task` cleans and splits a user's own scraped photos the way the study did.
Both build the task in a hidden staging folder and rename it into place when complete,
so an interrupted import never leaves a half-written task behind.
"""

from __future__ import annotations

import hashlib
import io
import random
import re
import shutil
import tempfile
import time
import warnings
import zipfile
import zlib
from collections import Counter
from pathlib import Path

import pandas as pd
from PIL import Image

from .. import photos, runtime
from ..audit.checks import link_owners
from ..errors import ReplicateError
from ..folders import SPLITS, image_counts, image_files

HOUSES_URL = "https://github.com/emanhamed/Houses-dataset/archive/refs/heads/master.zip"
ROOMS = ("bathroom", "bedroom", "kitchen")
HOUSE_PHOTO = re.compile(r"(?:^|/)(\d+)_(bathroom|bedroom|kitchen|frontal)\.jpg$")


# --- the Houses Dataset ----------------------------------------------------------------------


def _houses_photos(source: Path) -> dict[tuple[int, str], bytes | Path]:
    """{(house, room): JPEG bytes or file} from the archive zip or an extracted folder.

    Only members whose names match `<house>_<room>.jpg` are read, and output paths are built
    from (house, room) alone, so no member name can write outside the destination.
    """
    if source.is_dir():
        return {
            (int(m[1]), m[2]): p
            for p in sorted(source.rglob("*.jpg"))
            if (m := HOUSE_PHOTO.search(p.as_posix()))
        }
    try:
        with zipfile.ZipFile(source) as zf:
            members = [(m, i) for i in zf.infolist() if (m := HOUSE_PHOTO.search(i.filename))]
            return {
                (int(m[1]), m[2]): zf.read(i)
                for m, i in runtime.progress(members, what=f"reading {source.name}", unit="photos")
            }
    except (zipfile.BadZipFile, OSError, EOFError, zlib.error) as e:
        raise ReplicateError(
            f"{source} is not a readable zip archive ({e}): download it again"
        ) from None


def _download(url: str, dest: Path) -> Path:
    """Download `url` to `dest` (a progress bar on a terminal), keeping it for the next run."""
    if dest.is_file():
        return dest
    from fastdownload import download_url  # fastai's own downloader

    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = dest.with_suffix(".partial")
    try:
        download_url(url, partial, show_progress=runtime.on_terminal())
    except Exception as e:  # network errors come in many types; all mean the same here
        partial.unlink(missing_ok=True)
        raise ReplicateError(
            f"could not download {url} ({e}): download it by hand and pass --source FILE"
        ) from None
    partial.rename(dest)
    return dest


def split_houses(
    houses: list[int], valid_pct: float, seed: int, groups: dict[int, int] | None = None
) -> set[int]:
    """The houses of the validation split: a seeded shuffle, so the same seed gives the same split.

    `groups` {house: group}: houses of one group (listings that share a photo) go to the same
    split, all with the first of them in the shuffled order, into valid only while they fit the
    target count. Unlinked houses fall exactly as in the plain shuffle of earlier versions."""
    order = sorted(houses)
    random.Random(seed).shuffle(order)
    members: dict[int, list[int]] = {}
    for house in order:
        members.setdefault(groups[house] if groups else house, []).append(house)
    target, valid, placed = round(len(order) * valid_pct), set(), set()
    for house in order:
        if house in placed:
            continue
        unit = members[groups[house] if groups else house]
        placed.update(unit)
        if len(valid) + len(unit) <= target:
            valid.update(unit)
    return valid


def import_houses(
    source: str | None, data_dir: Path, valid_pct: float = 0.2, seed: int = 42, force: bool = False
) -> dict[str, Path]:
    """Write the `rooms`, `exterior` and `kitchen` tasks from the Houses Dataset; returns {task:
    folder}.

    Split by house: every photo of a house lands in the same split, so no house leaks
    from train to valid. `exterior` is frontal vs the three indoor photos of each house; `kitchen`
    is a yes/no search filter ("is it a kitchen?"): its kitchen photo against the other three.
    """
    source = source or HOUSES_URL
    if re.match(r"https?://", source):
        path = _download(source, data_dir / ".downloads" / "Houses-dataset-master.zip")
    else:
        path = Path(source)
        if not path.exists():
            raise ReplicateError(
                f"--source {source} does not exist: give the Houses zip, its extracted folder or a URL"
            )
    photos = _houses_photos(path)
    by_house: dict[int, set[str]] = {}
    for house, room in photos:
        by_house.setdefault(house, set()).add(room)
    complete = [h for h, rooms in by_house.items() if len(rooms) == 4]
    if not complete:
        raise ReplicateError(f"no Houses Dataset photos (<house>_<room>.jpg) found in {source}")
    if len(complete) < len(by_house):
        warnings.warn(
            f"skipped {len(by_house) - len(complete)} houses without all four photos", stacklevel=2
        )
    # Listings published twice share photos: keep such houses in one split, or validation leaks.
    keys = [(h, room) for h in complete for room in (*ROOMS, "frontal")]
    links = link_owners([h for h, _ in keys], [photos[k] for k in keys])
    valid = split_houses(complete, valid_pct, seed, links)
    files = {"rooms": {}, "exterior": {}, "kitchen": {}}
    for house in complete:
        split = "valid" if house in valid else "train"
        for room in (*ROOMS, "frontal"):
            name, data = f"{house}_{room}.jpg", photos[house, room]
            if room != "frontal":
                files["rooms"][f"{split}/{room}/{name}"] = data
            exterior = "frontal" if room == "frontal" else "indoor"
            files["exterior"][f"{split}/{exterior}/{name}"] = data
            files["kitchen"][f"{split}/{'yes' if room == 'kitchen' else 'no'}/{name}"] = data
    return {task: write_task(data_dir / task, content, force) for task, content in files.items()}


# --- writing a task folder safely --------------------------------------------------------------


def _digest(data: bytes | Path) -> str:
    return hashlib.sha1(data if isinstance(data, bytes) else data.read_bytes()).hexdigest()


def _manifest(task_dir: Path) -> dict[str, str]:
    """{relative path: sha1} of the images in a task's train and valid folders."""
    return {
        p.relative_to(task_dir).as_posix(): _digest(p)
        for split in SPLITS
        if (task_dir / split).is_dir()
        for p in image_files(task_dir / split)
    }


def write_task(
    task_dir: Path,
    files: dict[str, bytes | Path],
    force: bool = False,
    extra: dict[str, str] | None = None,
) -> Path:
    """Write {relative path: bytes or source file} as a task folder; returns the folder.

    Identical existing content is left alone. Different existing content is never replaced
    silently: without `force` it is an error; with it, the old folder is moved aside
    (`TASK.bak-<time>`), not deleted. `extra` files (reports) are written beside the images.
    """
    if task_dir.exists():
        wanted = {rel: _digest(data) for rel, data in files.items()}
        if _manifest(task_dir) == wanted:
            return task_dir
        if not force:
            raise ReplicateError(
                f"{task_dir} already exists with different photos: move it away, "
                f"or pass --force to keep it as {task_dir.name}.bak-<time> and write anew"
            )
    task_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{task_dir.name}.partial-", dir=task_dir.parent))
    staging.chmod(0o755)  # mkdtemp makes it private; a task folder should not be
    try:
        for rel, data in files.items():
            out = staging / rel
            out.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(data, bytes):
                out.write_bytes(data)
            else:
                shutil.copyfile(data, out)
        for name, text in (extra or {}).items():
            (staging / name).write_text(text)
        if task_dir.exists():
            task_dir.rename(
                task_dir.with_name(f"{task_dir.name}.bak-{time.strftime('%Y%m%d-%H%M%S')}")
            )
        staging.rename(task_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return task_dir


# --- the study's cleaning step for a user's own photos -------------------------------------------


def _clean_image(path: Path, width: int, min_size: int) -> tuple[Image.Image | None, str]:
    """(resized RGB image, "") or (None, reason it was rejected)."""
    try:
        im = photos.open_photo(path)
    except Exception as e:  # PIL raises many types for undecodable files
        return None, f"cannot decode: {e}"
    w, h = im.size
    if min(w, h) < min_size:
        return None, f"too small: {w}x{h} < {min_size}px"
    if width and w != width:
        im = im.resize((width, max(1, round(h * width / w))), Image.Resampling.LANCZOS)
    return im, ""


def prepare_task(
    source_dir: Path,
    task: str,
    data_dir: Path,
    valid_pct: float = 0.2,
    width: int = 500,
    min_size: int = 0,
    seed: int = 42,
    force: bool = False,
) -> tuple[Path, pd.DataFrame]:
    """Clean `source_dir/<class>/*` into `data_dir/task/{train,valid}/<class>/`.

    Drops files that do not decode and images smaller than `min_size` on their short side,
    resizes to `width` px (0 keeps sizes), splits each class with a seeded shuffle that keeps
    near-duplicate photos on one side (`split_photos`). Source files are only read. Returns
    (task folder, per-class summary); every file's fate is listed in `prepare_report.csv` in the
    task folder.
    """
    if not source_dir.is_dir():
        raise ReplicateError(f"{source_dir} is not a folder: expected SOURCE_DIR/<class>/*.jpg")
    classes = sorted(d for d in source_dir.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise ReplicateError(
            f"{source_dir} has no class folders: expected SOURCE_DIR/<class>/*.jpg"
        )
    rows, files = [], {}
    candidates = [
        (c.name, p)
        for c in classes
        for p in sorted(c.rglob("*"))
        if p.is_file() and not p.name.startswith(".")
    ]
    kept: dict[str, list[tuple[Path, bytes]]] = {c.name: [] for c in classes}
    for label, path in runtime.progress(candidates, what=f"cleaning {source_dir}", unit="photos"):
        im, reason = _clean_image(path, width, min_size)
        if im is None:
            rows.append(
                dict(
                    source=str(path),
                    label=label,
                    status="rejected",
                    reason=reason,
                    split="",
                    file="",
                )
            )
        else:
            buf = io.BytesIO()
            im.save(buf, "JPEG", quality=95)
            kept[label].append((path, buf.getvalue()))
    items = [(label, path, jpeg) for label, its in kept.items() for path, jpeg in its]
    valid = split_photos(
        [label for label, _, _ in items], [jpeg for _, _, jpeg in items], valid_pct, seed
    )
    used: dict[str, set[str]] = {label: set() for label in kept}
    for k, (label, path, jpeg) in enumerate(items):
        split, stem, n = "valid" if k in valid else "train", path.stem, 1
        while stem.lower() in used[label]:  # a.png and a.jpg both become a*.jpg: keep both
            stem, n = f"{path.stem}-{n}", n + 1
        used[label].add(stem.lower())
        rel = f"{split}/{label}/{stem}.jpg"
        files[rel] = jpeg
        rows.append(
            dict(source=str(path), label=label, status="kept", reason="", split=split, file=rel)
        )
    report = pd.DataFrame(rows, columns=["source", "label", "status", "reason", "split", "file"])
    if not files:
        raise ReplicateError(f"no usable images in {source_dir}: every file was rejected")
    empty = [label for label, items in kept.items() if not items]
    if empty:
        raise ReplicateError(f"no usable images for class(es) {', '.join(empty)} in {source_dir}")
    task_dir = write_task(
        data_dir / task, files, force, extra={"prepare_report.csv": report.to_csv(index=False)}
    )
    return task_dir, summarize(report)


def split_photos(labels: list[str], photos: list[bytes], valid_pct: float, seed: int) -> set[int]:
    """Indices of the validation photos: about `valid_pct` of each class by a seeded shuffle, with
    near-duplicates (`replicate audit`'s definition) always on the same side, whatever their labels,
    so that no copy of a training photo is validated on."""
    groups = link_owners(list(range(len(photos))), photos)
    units: dict[int, list[int]] = {}
    for k in range(len(photos)):
        units.setdefault(groups[k], []).append(k)
    order = sorted(units)
    random.Random(seed).shuffle(order)
    target = {c: round(n * valid_pct) for c, n in Counter(labels).items()}
    taken, valid = Counter(), set()
    for unit in order:
        need = Counter(labels[k] for k in units[unit])
        if all(taken[c] + n <= target[c] for c, n in need.items()):
            valid.update(units[unit])
            taken.update(need)
    return valid


def summarize(report: pd.DataFrame) -> pd.DataFrame:
    """Per class: kept, rejected, train, valid."""
    counts = lambda col, val: report[report[col] == val].groupby("label").size()  # noqa: E731
    table = pd.DataFrame(
        {
            "kept": counts("status", "kept"),
            "rejected": counts("status", "rejected"),
            "train": counts("split", "train"),
            "valid": counts("split", "valid"),
        }
    )
    return table.fillna(0).astype(int).rename_axis("class")


def houses(
    source: str | None, data_dir: Path, valid_pct: float, seed: int, force: bool, log=print
) -> dict[str, Path]:
    """`replicate data houses`: import the Houses Dataset (`import_houses`) and say what each task
    folder holds; returns {task: folder}."""
    written = import_houses(source, data_dir, valid_pct, seed, force)
    for task, folder in written.items():
        counts = image_counts(folder)  # just written from a checked archive: no need to decode
        log(f"{task}: {folder}\n{counts.to_string()}\n")
    return written


def prepare(source_dir: Path, task: str, data_dir: Path, log=print, **options) -> Path:
    """`replicate prepare`: `prepare_task` with `options` (valid_pct, width, min_size, seed, force),
    its per-class table said; returns the task folder."""
    folder, table = prepare_task(source_dir, task, data_dir, **options)
    log(table.to_string())
    log(f"\n{task}: {folder}  (rejected files and reasons: {folder / 'prepare_report.csv'})")
    return folder
