"""model.onnx, `replicate export`, int8, and `predict`'s ONNX engine against the fastai learner.

python -m pytest tests/test_export.py
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import TINY_RUN, folders_args, odd_photos
from PIL import Image

from replicate import photos as photos_
from replicate.cli import app
from replicate.engine import fastai_models, model_set, onnx_models
from replicate.tagging import predict


def quiet(*args):
    pass


@pytest.fixture
def rooms(rooms_run) -> Path:
    """The shared three-class task's data folder (conftest.rooms_run)."""
    return rooms_run[0] / "data"


@pytest.fixture
def run_dir(rooms_run) -> Path:
    return rooms_run[1]


def probability_columns(table: pd.DataFrame) -> list[str]:
    return [c for c in table.columns if "_p_" in c or c.startswith("p_")]


# --- ONNX Runtime == the fastai learner --------------------------------------------------------------


def test_the_pil_crop_is_fastais_validation_crop_pixel_for_pixel(run_dir, rooms):
    from replicate.training.dataloaders import RESAMPLING, ValidCrop

    learn = fastai_models.load_model(run_dir).learn
    Image.new("RGB", (71, 40)).save(
        rooms.parent / "odd-shape.png"
    )  # a crop that does not divide evenly
    files = [*sorted((rooms / "rooms" / "valid").rglob("*.jpg")), rooms.parent / "odd-shape.png"]
    fs = learn.dls.valid.after_item.fs
    k = next(i for i, t in enumerate(fs) if isinstance(t, ValidCrop))
    mean, std = (
        np.array(v).reshape(1, 3, 1, 1)
        for v in (
            learn.dls.after_batch.normalize.mean.flatten().tolist(),
            learn.dls.after_batch.normalize.std.flatten().tolist(),
        )
    )
    for crop_pct, interpolation in ((1.0, "bilinear"), (0.875, "bicubic")):
        fs[k] = ValidCrop(
            32, crop_pct, resamples=(RESAMPLING[interpolation], RESAMPLING["nearest"])
        )
        fastai_input = learn.dls.test_dl(files, bs=len(files)).one_batch()[0].cpu().numpy()
        ours = np.stack(
            [
                onnx_models.decode(f, [(32, crop_pct, interpolation)])[0][
                    (32, crop_pct, interpolation)
                ]
                for f in files
            ]
        ).transpose(0, 3, 1, 2)
        assert fastai_input.shape == ours.shape == (len(files), 3, 32, 32)
        # the same pixels: (x / 255 - mean) / std differs by float rounding only
        assert np.abs((ours / 255 - mean) / std - fastai_input).max() < 1e-5


# --- predict's default engine --------------------------------------------------------------------


def test_predict_tags_from_a_fresh_run_folder_without_any_pickle(run_dir, rooms, runner, tmp_path):
    photos = rooms / "rooms" / "valid"
    fastai_out, onnx_out = tmp_path / "fastai.csv", tmp_path / "onnx.csv"
    result = runner.invoke(
        app, ["predict", str(run_dir), str(photos), "--out", str(fastai_out), "--engine", "fastai"]
    )
    assert result.exit_code == 0, result.output
    no_pickle = tmp_path / "run-without-pickle"
    shutil.copytree(run_dir, no_pickle)
    (no_pickle / "export.pkl").unlink()
    result = runner.invoke(app, ["predict", str(no_pickle), str(photos), "--out", str(onnx_out)])
    assert result.exit_code == 0, result.output
    assert "onnx on cpu" in result.output
    a, b = pd.read_csv(fastai_out), pd.read_csv(onnx_out)
    assert list(a.columns) == list(b.columns)
    assert (a.path == b.path).all() and (a.rooms_predicted == b.rooms_predicted).all()
    assert (
        np.abs(a[probability_columns(a)].to_numpy() - b[probability_columns(b)].to_numpy()).max()
        < 1e-4
    )


def test_the_onnx_engine_needs_neither_pytorch_nor_fastai(run_dir, rooms, tmp_path):
    code = (
        "import sys\nfrom replicate import cli\n"
        f"sys.argv = ['replicate', 'predict', {str(run_dir)!r}, {str(rooms / 'rooms' / 'valid')!r}, "
        f"'--out', {str(tmp_path / 't.csv')!r}, '--device', 'cpu']\n"
        "try:\n    cli.app()\nexcept SystemExit as e:\n    assert e.code == 0, e.code\n"
        "print(sorted(m for m in ('torch', 'fastai') if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"
    assert len(pd.read_csv(tmp_path / "t.csv")) == 6


@pytest.mark.parametrize("damage", ["garbage", "truncated", "no metadata"])
def test_a_corrupt_model_onnx_is_one_line_and_exit_2(run_dir, rooms, runner, tmp_path, damage):
    broken = tmp_path / "run"
    shutil.copytree(run_dir, broken)
    path = broken / "model.onnx"
    if damage == "garbage":
        path.write_text("not a model")
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[:5000])
    else:
        import onnx

        proto = onnx.load(str(path))
        del proto.metadata_props[:]
        onnx.save_model(proto, str(path))
    result = runner.invoke(
        app,
        ["predict", str(broken), str(rooms / "rooms" / "valid"), "--out", str(tmp_path / "t.csv")],
    )
    assert result.exit_code == 2
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and str(path) in errors[0]
    assert ("replicate export" in errors[0]) and "Traceback" not in result.output


@pytest.mark.parametrize("engine, name", [("onnx", "model.onnx"), ("fastai", "export.pkl")])
def test_predict_warns_when_the_model_file_changed(run_dir, rooms, runner, tmp_path, engine, name):
    copy = tmp_path / "copied-run"
    shutil.copytree(run_dir, copy)
    metrics = json.loads((copy / "metrics.json").read_text())
    metrics["checksums"][name] = "0" * 64
    (copy / "metrics.json").write_text(json.dumps(metrics))
    photo = next((rooms / "rooms" / "valid").rglob("*.jpg"))
    result = runner.invoke(
        app,
        ["predict", str(copy), str(photo), "--out", str(tmp_path / "t.csv"), "--engine", engine],
    )
    assert result.exit_code == 0 and f"{copy / name} does not match the SHA-256" in result.output


def upright_and_rotated(folder: Path) -> tuple[Path, Path]:
    """A landscape photo, and the same pixels stored as a phone does: turned, with EXIF orientation 6
    ("rotate 90 degrees clockwise to view"). Lossless, so both must give the same input."""
    rng = np.random.default_rng(3)
    pixels = np.zeros((40, 64, 3), np.uint8)
    pixels[:, :32] = (200, 60, 40)
    pixels[:, 32:] = (30, 90, 200)
    upright = Image.fromarray(
        np.clip(pixels + rng.normal(0, 20, pixels.shape), 0, 255).astype(np.uint8)
    )
    upright.save(folder / "upright.png")
    stored = upright.transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.save(folder / "phone.png", exif=exif)
    return folder / "upright.png", folder / "phone.png"


def test_odd_files_give_todays_rows_and_phone_photos_stand_upright(run_dir, runner, tmp_path):
    photos = odd_photos(tmp_path / "photos")
    upright, phone = upright_and_rotated(photos)
    tables = {}
    for engine in ("fastai", "onnx"):
        out = tmp_path / f"{engine}.json"
        result = runner.invoke(
            app,
            [
                "predict",
                str(run_dir),
                str(photos),
                "--out",
                str(out),
                "--format",
                "json",
                "--engine",
                engine,
                "--bs",
                "3",
            ],
        )
        assert result.exit_code == 0, result.output
        for bad in ("zero.jpg", "text.jpg", "truncated.jpg"):
            assert f"unreadable: {photos / bad}" in result.output
        tables[engine] = pd.DataFrame(json.loads(out.read_text())).set_index("path")
    fastai, onnx = tables["fastai"], tables["onnx"]
    assert list(onnx.index) == list(fastai.index) and list(onnx.columns) == list(fastai.columns)
    assert ((onnx.error != "") == (fastai.error != "")).all()
    assert set(Path(p).name for p in onnx.index[onnx.error != ""]) == {
        "zero.jpg",
        "text.jpg",
        "truncated.jpg",
    }
    assert (
        onnx.error.str.split(":").str[0] == fastai.error.str.split(":").str[0]
    ).all()  # the same exception
    probs = probability_columns(onnx)
    # Both engines decode through replicate.photos: the huge JPEG at the same reduced scale, the
    # phone photo turned upright, so every readable photo gets the same probabilities.
    same = [
        str(photos / n)
        for n in (
            "good.jpg",
            "gray.png",
            "cmyk.jpg",
            "alpha.png",
            "sixteen.png",
            "upright.png",
            "huge.jpg",
            "phone.png",
        )
    ]
    assert (
        np.abs(
            onnx.loc[same, probs].to_numpy(float) - fastai.loc[same, probs].to_numpy(float)
        ).max()
        < 1e-4
    )
    assert (onnx.loc[same, "rooms_predicted"] == fastai.loc[same, "rooms_predicted"]).all()
    # The phone photo is turned upright: exactly the upright photo's input.
    assert (
        np.abs(
            onnx.loc[str(phone), probs].to_numpy(float)
            - onnx.loc[str(upright), probs].to_numpy(float)
        ).max()
        < 1e-6
    )
    rotated = photos_.decode(phone, [(32, 1.0, "bilinear")])[0][(32, 1.0, "bilinear")]
    straight = photos_.decode(upright, [(32, 1.0, "bilinear")])[0][(32, 1.0, "bilinear")]
    assert (rotated == straight).all()


def test_each_photo_is_decoded_once_for_all_models(run_dir, rooms, tmp_path, monkeypatch):
    other = tmp_path / "other"
    shutil.copytree(run_dir, other)
    models = model_set.load([run_dir, other], "onnx", "cpu")
    assert [m.name for m in models] == [f"rooms_{run_dir.name}", "rooms_other"]
    shutil.copy(
        other / "model.onnx", other / "model.int8.onnx"
    )  # a stand-in: only the name matters here
    both = model_set.load([other / "model.onnx", other / "model.int8.onnx", run_dir], "onnx", "cpu")
    assert [m.name for m in both] == [
        "rooms_other_model",
        "rooms_other_model.int8",
        f"rooms_{run_dir.name}",
    ]
    calls = []
    real = onnx_models.decode
    monkeypatch.setattr(
        onnx_models, "decode", lambda path, geometries: calls.append(path) or real(path, geometries)
    )
    files = sorted((rooms / "rooms" / "valid").rglob("*.jpg"))
    table = onnx_models.tag_onnx(models, files, bs=4, workers=0, progress=False)
    assert sorted(calls) == files
    assert (table[f"rooms_{run_dir.name}_predicted"] == table["rooms_other_predicted"]).all()


def test_decoding_threads_give_the_same_table_as_one_thread(run_dir, rooms):
    models = [onnx_models.load_onnx(run_dir)]
    files = sorted((rooms / "rooms").rglob("*.jpg"))
    alone = onnx_models.tag_onnx(models, files, bs=5, workers=0, progress=False)
    pooled = onnx_models.tag_onnx(models, files, bs=5, workers=2, progress=False)
    pd.testing.assert_frame_equal(alone, pooled)


def test_a_run_whose_pickle_fails_still_completes_with_model_onnx(
    rooms, runner, tmp_path, monkeypatch
):
    from fastai.learner import Learner

    def unpicklable(self, fname="export.pkl", **kwargs):
        (self.path / fname).write_bytes(b"half a pickle")
        raise TypeError("cannot pickle '_thread.RLock' object")

    monkeypatch.setattr(Learner, "export", unpicklable)
    result = runner.invoke(
        app,
        [
            "run",
            "rooms",
            "--arch",
            "resnet18",
            *TINY_RUN,
            *folders_args(rooms, tmp_path),
            "--onnx",
        ],
    )
    assert result.exit_code == 0, result.output
    assert (
        "warning: export.pkl could not be written (TypeError: cannot pickle '_thread.RLock' object)"
        in result.output
    )
    run = tmp_path / "rooms" / "resnet18-frozen"
    assert not (run / "export.pkl").exists() and (run / "model.onnx").is_file()
    metrics = json.loads((run / "metrics.json").read_text())
    assert set(metrics["checksums"]) == {"model.onnx"} and metrics["export_pkl_error"].startswith(
        "TypeError"
    )
    result = runner.invoke(
        app, ["predict", str(run), str(rooms / "rooms" / "valid"), "--out", str(tmp_path / "t.csv")]
    )
    assert result.exit_code == 0 and "warning" not in result.output, result.output


# --- export and int8 -----------------------------------------------------------------------------


def test_export_writes_model_onnx_for_an_older_run_folder(run_dir, rooms, runner, tmp_path):
    old = tmp_path / "old-run"
    shutil.copytree(run_dir, old)
    (old / "model.onnx").unlink()
    metrics = json.loads((old / "metrics.json").read_text())
    del metrics["checksums"]  # run folders from before model.onnx
    (old / "metrics.json").write_text(json.dumps(metrics))
    result = runner.invoke(
        app, ["predict", str(old), str(rooms / "rooms" / "valid"), "--out", str(tmp_path / "t.csv")]
    )
    assert result.exit_code == 2 and f"replicate export {old}" in result.output
    result = runner.invoke(app, ["export", str(old)])
    assert result.exit_code == 0, result.output
    assert json.loads((old / "metrics.json").read_text())["checksums"]["model.onnx"]
    a = onnx_models.tag_onnx(
        [onnx_models.load_onnx(old)], sorted((rooms / "rooms" / "valid").rglob("*.jpg")), workers=0
    )
    b = onnx_models.tag_onnx(
        [onnx_models.load_onnx(run_dir)],
        sorted((rooms / "rooms" / "valid").rglob("*.jpg")),
        workers=0,
    )
    assert (
        np.abs(a[probability_columns(a)].to_numpy() - b[probability_columns(b)].to_numpy()).max()
        < 1e-6
    )


def with_old_module_paths(pkl: Path) -> int:
    """`pkl` (an export.pkl: torch's zip with the pickle in data.pkl) rewritten as it was written
    before the stages moved into sub-packages: every moved module named by its old path in the
    pickle's GLOBAL opcodes (protocol 2, fastai's). Returns how many names were rewritten."""
    import zipfile

    with zipfile.ZipFile(pkl) as z:
        entries = [(info, z.read(info)) for info in z.infolist()]
    count = 0
    with zipfile.ZipFile(pkl, "w", zipfile.ZIP_STORED) as z:
        for info, data in entries:
            if info.filename.endswith("/data.pkl"):
                for old, new in fastai_models.MOVED.items():
                    global_op = b"c" + new.encode() + b"\n"
                    count += data.count(global_op)
                    data = data.replace(global_op, b"c" + old.encode() + b"\n")
            z.writestr(info, data)
    return count


def test_an_export_pkl_from_before_the_sub_packages_still_loads(run_dir, rooms, runner, tmp_path):
    """A run folder trained before the move: its export.pkl names `replicate.data.ValidCrop`,
    `replicate.models.Backbone`, ...; `replicate export` (and the fastai engine) still read it."""
    old = tmp_path / "old-run"
    shutil.copytree(run_dir, old)
    assert with_old_module_paths(old / "export.pkl") >= 2  # the transforms' and the model's
    (old / "model.onnx").unlink()
    metrics = json.loads((old / "metrics.json").read_text())
    del metrics["checksums"]  # as a run folder of that time, and the pickle changed
    (old / "metrics.json").write_text(json.dumps(metrics))
    result = runner.invoke(app, ["export", str(old)])
    assert result.exit_code == 0, result.output
    photos = sorted((rooms / "rooms" / "valid").rglob("*.jpg"))
    a = onnx_models.tag_onnx([onnx_models.load_onnx(old)], photos, workers=0)
    b = fastai_models.tag([fastai_models.load_model(old)], photos)
    assert (
        np.abs(a[probability_columns(a)].to_numpy() - b[probability_columns(b)].to_numpy()).max()
        < 1e-4
    )


def test_quantize_int8_writes_a_calibrated_model_and_reports_its_accuracy(
    run_dir, rooms, runner, tmp_path
):
    run = tmp_path / "exports" / "rooms" / run_dir.name
    shutil.copytree(run_dir, run)
    result = runner.invoke(app, ["export", str(run), "--quantize", "int8", "--calibration", "8"])
    assert result.exit_code == 0, result.output
    metrics = json.loads((run / "metrics.json").read_text())
    int8 = metrics["int8"]
    assert int8["calibration_photos"] == 8 and int8["mb"] < int8["fp32_mb"] / 3  # int8 weights
    # The fp32 ONNX model's accuracy on the validation photos is the run's own (the best epoch's).
    assert int8["fp32_valid_accuracy"] == pytest.approx(metrics["best_valid_accuracy"])
    model = onnx_models.load_onnx(run / "model.int8.onnx")
    assert model.meta["quantized"].startswith("int8") and model.classes == metrics["classes"]
    ops = {n.op_type for n in __import__("onnx").load(str(run / "model.int8.onnx")).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    assert metrics["checksums"]["model.int8.onnx"] and model.warning == ""
    # predict takes the int8 file; the report shows its accuracy beside fp32.
    result = runner.invoke(
        app,
        [
            "predict",
            str(run / "model.int8.onnx"),
            str(rooms / "rooms" / "valid"),
            "--out",
            str(tmp_path / "t.csv"),
        ],
    )
    assert result.exit_code == 0, result.output
    tags = pd.read_csv(tmp_path / "t.csv")  # the recorded int8 accuracy is what the file scores
    prefix = tags.columns[tags.columns.str.endswith("_predicted")][0]
    actual = tags.path.map(lambda p: Path(p).parent.name)
    assert (tags[prefix] == actual).mean() == pytest.approx(int8["valid_accuracy"])
    result = runner.invoke(app, ["report", "rooms", "--exports-dir", str(tmp_path / "exports")])
    assert result.exit_code == 0, result.output
    table = pd.read_csv(tmp_path / "exports" / "rooms" / "compare" / "table.csv")
    assert table.int8_acc.iloc[0] == pytest.approx(round(100 * int8["valid_accuracy"], 2))
    assert table.int8_fp32_acc.iloc[0] == pytest.approx(round(100 * int8["fp32_valid_accuracy"], 2))


def test_device_cuda_without_a_gpu_is_one_line_and_exit_2(run_dir, rooms, runner, tmp_path):
    result = runner.invoke(
        app,
        [
            "predict",
            str(run_dir),
            str(rooms / "rooms" / "valid"),
            "--device",
            "cuda",
            "--out",
            str(tmp_path / "t.csv"),
        ],
    )
    assert (
        result.exit_code == 2
        and "error: --device cuda, but torch" in result.output
        and "sees no CUDA GPU" in result.output
    )
    assert not (tmp_path / "t.csv").exists()


def test_on_a_gpu_machine_the_engine_follows_what_is_installed(run_dir, tmp_path, monkeypatch):
    """A GPU machine, stood in for: ONNX Runtime's CUDA provider where onnxruntime-gpu is installed,
    else PyTorch (the fastai engine, which needs export.pkl), else ONNX Runtime on the CPU."""
    import onnxruntime as ort
    import torch

    from replicate import runtime

    monkeypatch.setattr(runtime, "gpu_present", lambda: True)
    monkeypatch.setattr(
        runtime, "resolve_device", lambda name: torch.device("cuda", 0)
    )  # PyTorch sees a GPU
    monkeypatch.setattr(
        ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"]
    )
    assert predict.plan("onnx", "auto", [run_dir]) == ("onnx", "cuda", "")
    assert onnx_models.providers("cuda", 1)[0] == ("CUDAExecutionProvider", {"device_id": 1})
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    engine, device, note = predict.plan("onnx", "auto", [run_dir])
    assert (
        (engine, device) == ("fastai", "cuda")
        and "onnxruntime-gpu" in note
        and "export.pkl" in note
    )
    no_pickle = tmp_path / "run"
    shutil.copytree(run_dir, no_pickle)
    (no_pickle / "export.pkl").unlink()
    engine, device, note = predict.plan("onnx", "cuda", [no_pickle])
    assert (engine, device) == ("onnx", "cpu") and "running on the CPU" in note
    assert predict.plan("onnx", "cpu", [run_dir]) == ("onnx", "cpu", "")


@pytest.mark.gpu
@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA GPU")
def test_predict_on_the_gpu_gives_the_cpu_classes(run_dir, rooms, runner, tmp_path):
    photos = rooms / "rooms" / "valid"
    for device in ("cuda", "cpu"):
        result = runner.invoke(
            app,
            [
                "predict",
                str(run_dir),
                str(photos),
                "--out",
                str(tmp_path / f"{device}.csv"),
                "--device",
                device,
            ],
        )
        assert result.exit_code == 0, result.output
        assert f"on {device}" in result.output
    gpu, cpu = pd.read_csv(tmp_path / "cuda.csv"), pd.read_csv(tmp_path / "cpu.csv")
    assert (gpu.rooms_predicted == cpu.rooms_predicted).all()
    assert (
        np.abs(
            gpu[probability_columns(gpu)].to_numpy() - cpu[probability_columns(cpu)].to_numpy()
        ).max()
        < 1e-3
    )
