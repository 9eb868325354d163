"""Learner -> model.onnx: one pickle-free file that alone tags photos; and its int8 twin.

    replicate export exports/rooms/resnet18-unfrozen --quantize int8

Every run writes `model.onnx` beside `export.pkl` (`train` calls `write_onnx`); `replicate export`
writes it for run folders made before, from their export.pkl. The file holds the network followed
by a softmax: input float32 N x 3 x H x W (RGB, (pixel / 255 - mean) / std), output the class
probabilities. Its metadata (key "replicate", JSON) holds the rest: the classes, the input size,
the validation crop, the resampling and the normalisation, so `predict` needs nothing else.

`quantize_run` writes `model.int8.onnx` with ONNX Runtime's static quantization (QDQ, int8 weights
per channel, uint8 activations), calibrated on the run's training photos, and records its
validation accuracy beside the fp32 model's in the run's metrics.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import io
import json
import logging
import random
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .. import photos, runs
from ..config import CALIBRATION_PHOTOS
from ..engine import fastai_models, onnx_models
from ..errors import ReplicateError
from ..folders import task_files
from ..models import archs, learner
from .dataloaders import ValidCrop

OPSET = 18  # the torch.export-based exporter's lowest; onnxruntime >= 1.14 runs it


def preprocess_of(learn, recorded: dict | None = None) -> photos.Preprocess:
    """How the learner turns a photo into input, read from its own validation transforms (the truth
    of what fastai does, also for exports made before the run config recorded it). The normalisation
    is taken from the config's "preprocess" where it is recorded: the learner keeps it in float32."""
    from fastai.data.transforms import Normalize

    crop = next((t for t in learn.dls.after_item.fs if isinstance(t, ValidCrop)), None)
    norm = next((t for t in learn.dls.after_batch.fs if isinstance(t, Normalize)), None)
    if crop is None or norm is None:
        raise ReplicateError(
            "this export has no validation crop or normalisation that replicate knows: "
            "retrain it with this version"
        )
    names = {v: k for k, v in photos.RESAMPLING.items()}
    mean, std = tuple(norm.mean.flatten().tolist()), tuple(norm.std.flatten().tolist())
    if recorded and np.allclose(recorded["mean"], mean) and np.allclose(recorded["std"], std):
        mean, std = tuple(recorded["mean"]), tuple(recorded["std"])
    return photos.Preprocess(
        size=int(crop.size[0]),
        crop_pct=float(crop.crop_pct),
        interpolation=names[crop.resamples[0]],
        mean=mean,
        std=std,
    )


def write_onnx(learn, path: Path, config: dict) -> Path:
    """`learn`'s network + softmax as ONNX at `path` (a batch of any size), with the metadata that
    makes the file enough to tag photos; `config`: the run's config (runs.Run.config). A run whose
    body is shared (config "body", models.body_record) also gets a second output, "features" (the
    body's), and its head alone as runs.HEAD beside it. Returns `path`."""
    prep = preprocess_of(learn, config.get("preprocess"))
    model = copy.deepcopy(getattr(learn.model, "module", learn.model)).float().cpu()  # unwrap DDP
    body = config.get("body")
    example = torch.randn(2, 3, prep.size, prep.size)
    if body:  # the shared body's graph (exported once per process) with this run's head on it
        model_proto = _with_head(_body_graph(model[0].eval(), body["key"], example), model[1])
    else:
        net = nn.Sequential(model, nn.Softmax(dim=1)).eval()
        model_proto = _export(net, example, "input", ["probabilities"])
    meta = prep.to_meta(classes=[str(c) for c in learn.dls.vocab], task=config["task"])
    meta.update(arch=config["arch"], **({"body": body["key"]} if body else {}))
    set_metadata(model_proto, meta)
    save_model(model_proto, path)
    if body:  # the head: the graph from the features to the probabilities, cut out of the file
        # (onnx's Extractor), not exported a second time: the same head, without the export's seconds
        from onnx.utils import Extractor

        head_proto = Extractor(model_proto).extract_model(["features"], ["probabilities"])
        set_metadata(head_proto, {**meta, "input": "float32 N x features: the body's output"})
        save_model(head_proto, path.with_name(runs.HEAD))
    return path


# A shared body's ONNX graph by its key (the same tensors fed the same pixels: models.body_record),
# exported once per process: the runs of a compare or a session on one body export only their
# heads (a lite0 body's export takes about 6 s on 2 cores, a head's a fraction of it).
_BODIES: dict[str, bytes] = {}


def _body_graph(body: nn.Module, key: str, example: torch.Tensor):
    """The body's graph (input -> features) for the body `key`, exported on first use."""
    import onnx

    if key not in _BODIES:
        _BODIES[key] = _export(body, example, "input", ["features"]).SerializeToString()
    return onnx.load_from_string(_BODIES[key])


def _with_head(body_proto, head: nn.Module):
    """The whole model's graph: `head` + softmax exported on the body's features and joined to
    `body_proto` (onnx.compose), its outputs the probabilities and the features."""
    import onnx
    from onnx import compose

    features = body_proto.graph.output[0]
    width = features.type.tensor_type.shape.dim[1].dim_value
    net = nn.Sequential(head, nn.Softmax(dim=1)).eval()
    head_proto = _export(net, torch.randn(2, width), "features", ["probabilities"])
    # the head's inner names prefixed: the exporter names both graphs' values alike (val_0, ...)
    head_proto = compose.add_prefix(head_proto, "head/", rename_inputs=False, rename_outputs=False)
    merged = compose.merge_models(
        body_proto, head_proto, io_map=[("features", "features")],
        outputs=["probabilities", "features"],
    )  # fmt: skip
    # merge_models lists an opset once per graph merged; ONNX Runtime's quantizer wants each once
    opsets = {(o.domain, o.version): o for o in merged.opset_import}
    del merged.opset_import[:]
    merged.opset_import.extend(opsets.values())
    onnx.checker.check_model(merged)
    return merged


def _export(net: nn.Module, example: torch.Tensor, input_name: str, outputs: list[str]):
    """`net` as an ONNX ModelProto, its first dimension (the batch) free."""
    batch = torch.export.Dim("batch", min=1, max=4096)
    # The exporter prints its progress on stdout and warns about things a user cannot act on.
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            net,
            (example,),
            dynamo=True,
            opset_version=OPSET,
            external_data=False,
            input_names=[input_name],
            output_names=outputs,
            dynamic_shapes=({0: batch},),
        )
    return program.model_proto


def save_model(model_proto, path: Path) -> None:
    """Written beside and renamed, so a reader never sees half a file."""
    import onnx

    tmp = path.with_name(f".{path.name}.partial")
    onnx.save_model(model_proto, tmp)
    tmp.replace(path)


def set_metadata(model_proto, meta: dict) -> None:
    del model_proto.metadata_props[:]
    entry = model_proto.metadata_props.add()
    entry.key, entry.value = onnx_models.META_KEY, json.dumps(meta)
    model_proto.producer_name = "replicate"


def export_run(run_dir: Path) -> Path:
    """Write RUN_DIR/model.onnx from its export.pkl (a pickle: only for run folders you made or
    trust) and record its checksum in the run's metrics. Returns the model's path."""
    run = runs.open_run(run_dir)
    model = fastai_models.load_model(run.path)  # the checksum of export.pkl is checked here
    if model.warning:
        warnings.warn(model.warning, stacklevel=2)
    if "body" not in run.config:  # a run folder from before bodies were recorded
        run.write_config({**run.config, "body": _body_of(run.config)})
    path = write_onnx(model.learn, run.onnx, run.config)
    run.record_checksums([path, run.head])
    return path


def _body_of(config: dict) -> dict | None:
    """models.body_record for a run's recorded config (its weights resolved again, as it trained)."""
    from ..config import RunConfig

    fields = {f.name for f in dataclasses.fields(RunConfig)} - {"data_dir", "exports_dir"}
    cfg = RunConfig(**{k: v for k, v in config.items() if k in fields})
    if not (cfg.freeze_bn and not cfg.unfreeze and cfg.pretrained):
        return None  # a body that trained, or random weights: nothing to resolve
    return learner.body_record(cfg, archs.resolve(cfg))


def export_runs(run_dirs: list[Path], quantize: bool, calibration: int, log=print) -> None:
    """`replicate export`: model.onnx for each run folder that lacks one (or all, without
    --quantize), then with `quantize` model.int8.onnx too."""
    for run_dir in run_dirs:
        if not runs.open_run(run_dir).onnx.is_file() or not quantize:
            path = export_run(run_dir)
            log(f"{path} ({path.stat().st_size / 1e6:.1f} MB)")
        if quantize:
            quantize_run(run_dir, calibration, log=log)


# --- int8 --------------------------------------------------------------------------------------


class _Calibration:
    """ONNX Runtime's CalibrationDataReader protocol over preprocessed photos, a batch at a time."""

    def __init__(self, batches: list[np.ndarray], input_name: str):
        self.batches, self.input_name = iter(batches), input_name

    def get_next(self):
        batch = next(self.batches, None)
        return None if batch is None else {self.input_name: batch}


def quantize_run(run_dir: Path, n_photos: int = CALIBRATION_PHOTOS, log=print) -> dict:
    """Write RUN_DIR/model.int8.onnx from model.onnx, calibrated on up to `n_photos` of the run's
    training photos (seeded sample), and measure both models on the validation photos.

    Returns (and records in the run's metrics as "int8") the accuracies, the sizes and the seconds."""
    run = runs.open_run(run_dir)
    if not run.onnx.is_file() and run.pickle.is_file():
        log(
            f"{run.path} has no model.onnx (trained with --no-onnx): writing it from export.pkl first"
        )
        export_run(run.path)
    fp32 = onnx_models.load_onnx(run.onnx)
    task_dir = run.task_dir
    train = split_files(task_dir, "train")
    if not train:
        raise ReplicateError(
            f"no training photos in {task_dir}/train to calibrate the int8 model on"
        )
    sample = random.Random(0).sample(train, min(n_photos, len(train)))
    start = time.perf_counter()
    batches = [fp32.normalise(chunk) for chunk in decoded_batches(sample, fp32.prep)]
    out = run.int8
    # its body is quantized with this run's calibration: shared with no other run
    meta = {k: v for k, v in fp32.meta.items() if k != "body"}
    quantize_onnx(run.onnx, out, batches, fp32.input_name, meta)
    seconds = time.perf_counter() - start
    fp32.name = "fp32"
    accuracy = valid_accuracies([fp32, onnx_models.load_onnx(out, name="int8")], task_dir)
    result = {
        "calibration_photos": len(sample),
        "seconds": round(seconds, 1),
        "fp32_valid_accuracy": accuracy["fp32"],
        "valid_accuracy": accuracy["int8"],
        "fp32_mb": round(run.onnx.stat().st_size / 1e6, 1),
        "mb": round(out.stat().st_size / 1e6, 1),
    }
    run.record_checksums([out], {"int8": result})
    log(
        f"int8: {out} ({result['mb']} MB, fp32 {result['fp32_mb']} MB); valid accuracy "
        f"{result['valid_accuracy']:.2%} (fp32 {result['fp32_valid_accuracy']:.2%})"
    )
    return result


def quantize_onnx(
    src: Path, dst: Path, batches: list[np.ndarray], input_name: str, meta: dict
) -> None:
    """Write `dst`: `src` by ONNX Runtime's static quantization (QDQ, int8 weights per channel,
    uint8 activations), the activation ranges calibrated on `batches` (the model's float input);
    `meta`: its replicate metadata, to which "quantized" is added."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings(), _quiet_logging():
        warnings.simplefilter("ignore")
        prepared = Path(tmp) / "prepared.onnx"
        # ONNX shape inference and graph clean-up; ONNX Runtime's symbolic shape inference (for
        # transformers) fails on the Concat of fastai's head, and a CNN has no symbolic shapes to infer.
        quant_pre_process(str(src), str(prepared), skip_symbolic_shape=True)
        quantize_static(
            str(prepared),
            str(Path(tmp) / "int8.onnx"),
            _Calibration(batches, input_name),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
        )
        proto = onnx.load(str(Path(tmp) / "int8.onnx"))
        set_metadata(proto, {**meta, "quantized": "int8 (ONNX Runtime static, QDQ, per-channel)"})
        save_model(proto, dst)


@contextlib.contextmanager
def _quiet_logging():
    """The quantizer logs a warning for each BatchNorm1d of fastai's head (a 1-D weight cannot be
    quantized per channel; it is quantized per tensor): nothing a user can act on."""
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(logging.NOTSET)


def decoded_batches(files: list[Path], prep: photos.Preprocess, bs: int = 32):
    """uint8 batches (N, H, W, 3) of `files` as `prep` crops them; files that do not decode are left out."""
    decoded = [photos.decode(f, [prep.geometry]) for f in files]
    arrays = [d[prep.geometry] for d, error in decoded if not error]
    for i in range(0, len(arrays), bs):
        yield np.stack(arrays[i : i + bs])


def valid_accuracies(models: list[onnx_models.OnnxModel], task_dir: Path) -> dict[str, float]:
    """{model name: accuracy} on the task's validation photos (labels: their class folders), each
    photo decoded once for all the models."""
    table = onnx_models.tag_onnx(models, split_files(task_dir, "valid"), progress=False)
    ok = table.error == ""
    labels = table.path[ok].map(lambda p: Path(p).parent.name)
    return {m.name: float((table[f"{m.name}_predicted"][ok] == labels).mean()) for m in models}


def split_files(task_dir: Path, split: str) -> list[Path]:
    found, _ = task_files(task_dir)
    return [f for (s, _), files in sorted(found.items()) if s == split for f in files]
