"""One photo pipeline: training's validation input and `predict`'s are the same pixels.

python -m pytest tests/test_photos.py
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import HOUSES_ZIP, ROOMS, make_task, requires_houses, synthetic_photo
from PIL import Image

from replicate import photos
from replicate.cli import app
from replicate.config import RunConfig
from replicate.training import train


def test_the_crop_box_is_the_centre_share_of_the_short_side():
    """An independent expectation: on a 71 x 40 image whose pixels hold their own coordinates, the
    box is computed by hand and nearest-neighbour resampling picks source pixel floor((i + 0.5) * scale)."""
    x, y = np.meshgrid(np.arange(71), np.arange(40))
    image = Image.fromarray(np.stack([x, y, np.zeros_like(x)], axis=-1).astype(np.uint8))
    for crop_pct, left, top, side in (
        (1.0, 15, 0, 40),
        (0.875, 18, 2, 35),
    ):  # int(1.25 * 0.875 * 32) = 35
        out = np.asarray(photos.valid_crop(image, 32, crop_pct, "nearest"))
        src = np.floor((np.arange(32) + 0.5) * side / 32).astype(int)
        assert out.shape == (32, 32, 3)
        assert (out[0, :, 0] == left + src).all() and (out[:, 0, 1] == top + src).all()


@pytest.fixture(scope="module")
def big(tmp_path_factory) -> Path:
    """JPEGs 4x and 8x a 224 px model's crop, one stored turned with EXIF orientation 6, and a PNG."""
    folder = tmp_path_factory.mktemp("big")
    synthetic_photo(1, (2000, 1500)).save(folder / "four.jpg", quality=90)
    synthetic_photo(2, (2400, 1800)).save(folder / "eight.jpg", quality=90)
    exif = Image.Exif()
    exif[0x0112] = 6
    synthetic_photo(3, (1500, 2000)).transpose(Image.Transpose.ROTATE_90).save(
        folder / "phone.jpg", quality=90, exif=exif
    )
    synthetic_photo(4, (2000, 1500)).save(folder / "big.png")
    return folder


def test_draft_mode_is_decided_by_the_photo_and_the_models_crop(big):
    assert photos.largest_crop(224, 1.0) == 225 and photos.largest_crop(224, 0.875) == 257
    assert photos.open_photo(big / "four.jpg").size == (2000, 1500)
    assert photos.open_photo(big / "four.jpg", 225).size == (
        1000,
        750,
    )  # 1/2 scale: still >= 2 x 225
    assert photos.open_photo(big / "eight.jpg", 225).size == (600, 450)  # 1/4 scale
    assert photos.open_photo(big / "four.jpg", 400).size == (2000, 1500)  # 1500 < 4 x 400: in full
    assert photos.open_photo(big / "big.png", 225).size == (2000, 1500)  # not a JPEG: in full
    assert photos.open_photo(big / "phone.jpg", 225).size == (
        750,
        1000,
    )  # decoded small, then turned upright


def test_models_of_different_sizes_each_get_the_decode_their_validation_saw(big):
    geometries = [(224, 1.0, "bilinear"), (64, 1.0, "bilinear")]
    together, error = photos.decode(big / "eight.jpg", geometries)
    assert error == ""
    for g in geometries:
        alone = np.asarray(
            photos.valid_crop(photos.open_photo(big / "eight.jpg", photos.largest_crop(*g[:2])), *g)
        )
        assert (together[g] == alone).all()
    # The 64 px model's photo was decoded at 1/8 scale, the 224 px model's at 1/4: not one shared decode.
    assert not (
        together[geometries[1]]
        == np.asarray(photos.valid_crop(photos.open_photo(big / "eight.jpg", 225), *geometries[1]))
    ).all()


@pytest.fixture(scope="module")
def rooms(tmp_path_factory) -> Path:
    data = tmp_path_factory.mktemp("pipeline") / "data"
    make_task(data / "rooms", n_train=4, n_valid=2, classes=ROOMS)
    return data


def trained(rooms: Path, size: int) -> Path:
    cfg = RunConfig(
        "rooms",
        "resnet18",
        epochs=2,
        lr=0.05,
        size=size,
        pretrained=False,
        workers=0,
        audit=False,
        data_dir=rooms,
        exports_dir=rooms.parent / "exports",
    )
    return train.run(cfg, log=lambda *a: None)


def both_engines(
    runner, run_dir: Path, folder: Path, tmp_path: Path
) -> tuple[pd.DataFrame, pd.DataFrame]:
    tables = []
    for engine in ("onnx", "fastai"):
        out = tmp_path / f"{engine}.csv"
        result = runner.invoke(
            app, ["predict", str(run_dir), str(folder), "--out", str(out), "--engine", engine]
        )
        assert result.exit_code == 0, result.output
        tables.append(pd.read_csv(out).set_index("path"))
    return tables[0], tables[1]


def assert_same(onnx: pd.DataFrame, fastai: pd.DataFrame, n: int) -> None:
    probs = [c for c in onnx.columns if "_p_" in c]
    assert len(onnx) == len(fastai) == n and list(onnx.index) == list(fastai.index)
    assert (onnx.rooms_predicted == fastai.rooms_predicted).all()
    assert np.abs(onnx[probs].to_numpy() - fastai[probs].to_numpy()).max() < 1e-4


def test_large_photos_get_the_validation_pipelines_probabilities_at_224(
    rooms, big, runner, tmp_path
):
    """2000 x 1500 and 2400 x 1800 JPEGs at 224 px: the ONNX engine (decode + crop here) and fastai's
    own test_dl pipeline (what validation ran) give the same classes and probabilities."""
    onnx, fastai = both_engines(runner, trained(rooms, 224), big, tmp_path)
    assert_same(onnx, fastai, 4)


@requires_houses
def test_houses_originals_get_the_validation_pipelines_probabilities_at_64(rooms, runner, tmp_path):
    """36 Houses originals (400 x 266: 4x a 64 px crop, so decoded at half scale by both engines)."""
    folder = tmp_path / "originals"
    folder.mkdir()
    with zipfile.ZipFile(HOUSES_ZIP) as zf:
        for house in range(1, 10):
            for room in ("bathroom", "bedroom", "kitchen", "frontal"):
                (folder / f"{house}_{room}.jpg").write_bytes(
                    zf.read(f"Houses-dataset-master/Houses Dataset/{house}_{room}.jpg")
                )
    onnx, fastai = both_engines(runner, trained(rooms, 64), folder, tmp_path)
    assert_same(onnx, fastai, 36)
