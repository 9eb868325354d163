"""File -> pixels, one way for training, validation and serving.

Training's fastai pipeline (`data.OpenImage`), the ONNX engine (`decode`) and `prepare` all open
photos here, so a model sees the same pixels when it is served as when it was validated:

- EXIF orientation applied (phone photos are stored rotated), then RGB;
- a JPEG whose short side is at least 4x the largest crop taken from it is decoded at a reduced
  scale (libjpeg's draft mode), still at least 2x that crop: the decision depends only on the
  photo and the model's input geometry, so training and serving make the same one;
- the validation crop (`valid_crop`): the centre `crop_pct` of the short side, resized to `size`.

`Preprocess` is the record of the whole photo -> input recipe that model.onnx carries;
`image_files` says which files under a folder are photos, for tasks and tagging alike.
Only PIL and numpy: the ONNX engine imports this without fastai or PyTorch.
"""

from __future__ import annotations

import mimetypes
import os
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps

RESAMPLING = {
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "nearest": Image.Resampling.NEAREST,
    "lanczos": Image.Resampling.LANCZOS,
}
# The extensions fastai's get_image_files takes: every type mimetypes calls an image. Read the
# system's types first (/etc/mime.types): mimetypes does so lazily, on its first lookup, so without
# init() this set would depend on whether some other import had looked a type up already.
mimetypes.init()
IMAGE_EXTENSIONS = {ext for ext, kind in mimetypes.types_map.items() if kind.startswith("image/")}
DRAFT_FACTOR = 4  # decode at reduced scale when the short side is at least this many times the crop


@dataclass(frozen=True)
class Preprocess:
    """Photo -> model input: aspect-preserving resize and centre crop of `crop_pct` of the short side
    to `size` px with `interpolation`, then (pixel / 255 - mean) / std. Recorded in model.onnx."""

    size: int
    crop_pct: float
    interpolation: str
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def geometry(self) -> tuple[int, float, str]:
        """What decoding must produce (models sharing it share the decoded crop)."""
        return self.size, self.crop_pct, self.interpolation

    def to_meta(self, **more) -> dict:
        return {
            "format": 1,
            "size": self.size,
            "crop_pct": self.crop_pct,
            "interpolation": self.interpolation,
            "mean": list(self.mean),
            "std": list(self.std),
            "input": "float32 N x 3 x size x size, RGB, (pixel / 255 - mean) / std",
            "output": "class probabilities",
            **more,
        }

    @classmethod
    def from_meta(cls, meta: dict) -> Preprocess:
        return cls(
            int(meta["size"]),
            float(meta["crop_pct"]),
            str(meta["interpolation"]),
            tuple(meta["mean"]),
            tuple(meta["std"]),
        )


def largest_crop(size: int, crop_pct: float) -> int:
    """The biggest square (px of the decoded photo) the validation crop resizes to `size`, bounded:
    a crop of `crop_pct` of the short side is `size` px when the short side is size / crop_pct."""
    return int(size / crop_pct) + 1


def open_photo(path: Path | BinaryIO, largest: int | None = None) -> Image.Image:
    """The photo (a file, or a file object such as bytes in memory) as RGB, turned upright by its
    EXIF orientation.

    `largest`: the model's `largest_crop`; a JPEG whose short side is at least DRAFT_FACTOR x that
    is decoded at a reduced scale that stays at least 2x it (much faster on huge photos; training
    and serving both decode this way, so both see the same pixels)."""
    with Image.open(path) as im:
        if largest and im.format == "JPEG" and min(im.size) >= DRAFT_FACTOR * largest:
            im.draft(im.mode, (2 * largest, 2 * largest))
        im.load()
        upright = ImageOps.exif_transpose(im)
        return upright.convert("RGB")


def valid_crop(im: Image.Image, size: int, crop_pct: float, resample: str | int) -> Image.Image:
    """The validation crop, for training (`data.ValidCrop`) and prediction alike: the centre
    `crop_pct` of the short side's square, resized to `size` with `resample` (a PIL filter or its
    name)."""
    w, h = im.size
    # as fastai-era runs computed it, bit for bit
    crop = max(1, int(min(w / size, h / size) * crop_pct * size))
    left, top = (w - crop) // 2, (h - crop) // 2
    return im.crop((left, top, left + crop, top + crop)).resize(
        (size, size), RESAMPLING.get(resample, resample)
    )


def decode(path: Path, geometries: list[tuple[int, float, str]]) -> tuple[dict | None, str]:
    """({geometry: uint8 array H x W x 3}, '') for a photo, or (None, the error) when it does not decode.

    Each model's crop is taken from the decode its own validation saw: one decode for models with
    the same largest crop (the usual case: the file is opened once), else one per distinct draft
    decision, read from the header. Runs in the ONNX engine's decoding threads."""
    try:
        by_largest: dict[int, list] = {}
        for g in geometries:
            by_largest.setdefault(largest_crop(g[0], g[1]), []).append(g)
        if len(by_largest) > 1:  # models of different sizes: decode alike where the draft rule does
            with Image.open(path) as im:  # the header only: format and size
                fmt, short = im.format, min(im.size)
            by_decode: dict[int | None, list] = {}
            for largest, group in by_largest.items():
                drafted = fmt == "JPEG" and short >= DRAFT_FACTOR * largest
                by_decode.setdefault(largest if drafted else None, []).extend(group)
            by_largest = by_decode
        out = {}
        for largest, group in by_largest.items():
            im = open_photo(path, largest)
            out.update({g: np.asarray(valid_crop(im, *g)) for g in group})
        return out, ""
    except Exception as e:  # PIL raises many types for files that are not images
        return None, f"{type(e).__name__}: {e}"


def image_files(folder: Path) -> list[Path]:
    """Image files under `folder`, recursively and sorted, by the extensions fastai's
    `get_image_files` knows, skipping hidden names.

    Written out rather than `get_image_files` because that walk follows symlinks with no memory
    of where it has been: a link to a folder above it loops until paths grow too long, and the
    same photos count dozens of times. Here every real folder is read once."""
    seen, found = set(), []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found += [
            Path(dirpath) / f
            for f in sorted(filenames)
            if not f.startswith(".") and os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS
        ]
    return found
