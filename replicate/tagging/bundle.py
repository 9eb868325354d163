"""`replicate bundle`: runs that share a body -> one ONNX file, the body once and an output per
attribute: a site's whole tagger in one file.

    replicate bundle exports/rooms/RUN exports/exterior/RUN exports/kitchen/RUN --out exports/tagger

Runs trained frozen with the body in eval mode (--freeze-bn) on the same pretrained weights have
bit-identical bodies (their config's "body", models.body_record). The bundle is built from the
runs' own files, without retraining: the first run's model.onnx (the body, which also outputs its
features, and that run's head) and every other run's head.onnx, joined on the features with
onnx.compose. The folder holds:

- bundle.onnx: the input of model.onnx (float32 N x 3 x H x W), one output per attribute (its
  class probabilities, named by the attribute as `predict` names its columns); metadata (key
  "replicate"): the preprocessing, the body key, and per attribute its output, task, classes,
  search filter (threshold), listing rule and source run with its checksums;
- bundle.json: the same, the SHA-256 of the bundle's files (`predict` checks them) and, with
  --quantize int8, bundle.int8.onnx (the body quantized once) with its accuracy per attribute;
- tag.py and photos.py: a script that tags photos with ONNX Runtime, numpy and Pillow alone.
"""

from __future__ import annotations

import json
import random
import shutil
import time
from pathlib import Path

from .. import photos, runs
from ..config import CALIBRATION_PHOTOS
from ..engine import filters, model_set, onnx_models
from ..errors import ReplicateError

TEMPLATES = Path(__file__).parents[1] / "templates"
SCRIPT = "tag.py"
ANY_PHOTO = "a listing has it when any of its photos passes the filter"


def build(
    models: list[Path],
    out: Path,
    listing_pattern: str | None = None,
    quantize: bool = False,
    calibration: int = CALIBRATION_PHOTOS,
    force: bool = False,
    log=print,
) -> Path:
    """Write the bundle folder `out` from the run folders `models` (see the module docstring);
    `listing_pattern`: measure each filter's listing rule on its run's valid listings. Returns
    `out`. Written in a staging folder beside it and renamed into place when complete."""
    out = Path(out)
    if listing_pattern:
        filters.check_pattern(listing_pattern)
    _check_out(out, force)
    loaded = _sources(models)
    meta = _metadata(loaded, listing_pattern)
    # PyTorch loads with `export` (seconds): only once every check above has passed
    from ..training import export

    runs.sweep(out.parent, log, name=out.name)  # this bundle's, left by a process that is gone
    # a hidden folder beside `out`, locked while it is written, renamed into place (as run folders)
    staging = runs.Staging(out)
    try:
        start = time.perf_counter()
        proto = merge(loaded)
        export.set_metadata(proto, meta)
        export.save_model(proto, staging.path / runs.BUNDLE)
        shutil.copy(TEMPLATES / "tag_bundle.py", staging.path / SCRIPT)
        shutil.copy(photos.__file__, staging.path / "photos.py")
        manifest = {**meta, "seconds": round(time.perf_counter() - start, 1)}
        _write_manifest(staging.path, manifest)
        if quantize:
            manifest["int8"] = quantize_bundle(staging.path, loaded, meta, calibration, log)
            _write_manifest(staging.path, manifest)
        staging.publish()
    except BaseException:
        staging.discard()
        raise
    sizes = sum(m.path.stat().st_size + m.path.with_name(runs.HEAD).stat().st_size for m in loaded)
    mb = (out / runs.BUNDLE).stat().st_size / 1e6
    log(
        f"{out / runs.BUNDLE}: {len(loaded)} attribute(s) ({', '.join(m.name for m in loaded)}) on "
        f"one {meta['attributes'][0]['arch']} body, {mb:.1f} MB (the runs' model.onnx and "
        f"head.onnx: {sizes / 1e6:.1f} MB)"
    )
    log(f"tag with: replicate predict {out} PHOTOS, or python {out / SCRIPT} PHOTOS > tags.csv")
    return out


def _check_out(out: Path, force: bool) -> None:
    if out.exists() and not runs.is_bundle(out) and (not out.is_dir() or any(out.iterdir())):
        raise ReplicateError(f"--out {out} exists and is not a bundle folder: give a new folder")
    if runs.is_bundle(out) and not force:
        raise ReplicateError(f"--out {out} holds a bundle already: --force replaces it")
    out.parent.mkdir(parents=True, exist_ok=True)


def _sources(models: list[Path]) -> list[onnx_models.OnnxModel]:
    """The runs' models, named as `predict` names them, checked to share one body."""
    for path in models:
        if runs.is_bundle(path):
            raise ReplicateError(
                f"{path} is a bundle already: name the run folders it was made from"
            )
        runs.open_run(path)
    loaded = model_set.load(list(models), "onnx", "cpu")
    for m in loaded:
        if m.body is None:
            raise ReplicateError(
                f"{m.path.parent} has no body to share: bundle takes runs trained frozen with "
                "--freeze-bn on pretrained weights (`replicate export RUN` adds head.onnx to such "
                "a run made before bodies were recorded)"
            )
    first = loaded[0]
    for m in loaded[1:]:
        if (m.body, m.prep) != (first.body, first.prep):
            raise ReplicateError(
                f"{m.path.parent} ({m.meta['arch']}, {m.prep.size} px) does not share the body of "
                f"{first.path.parent} ({first.meta['arch']}, {first.prep.size} px): a bundle holds "
                "runs of one arch, weights and input size, trained frozen with --freeze-bn"
            )
    return loaded


def _metadata(loaded: list[onnx_models.OnnxModel], pattern: str | None) -> dict:
    """bundle.onnx's metadata: the common preprocessing and body, then each attribute."""
    found = filters.of_models(loaded)
    attributes = []
    for m in loaded:
        run = runs.run_of(m.path)
        spec = found.get(m.name)
        rule = None
        if spec:
            rule = {"rule": ANY_PHOTO, **(filters.listing_rule(spec, pattern) if pattern else {})}
            rule["pattern"] = pattern
        attributes.append({
            "name": m.name, "output": m.name, "task": run.task, "arch": run.config["arch"],
            "classes": m.classes,
            "filter": spec and {k: v for k, v in spec.items() if k not in ("curve", "run_dir", "recorded")},
            "listing_rule": rule,
            "source": {"run": str(run.path.resolve()), "checksums": {
                k: v for k, v in run.metrics.get("checksums", {}).items() if k in (runs.ONNX, runs.HEAD)
            }},
        })  # fmt: skip
    return loaded[0].prep.to_meta(
        output="one output per attribute, named by it: its class probabilities",
        body=loaded[0].body,
        attributes=attributes,
    )


def merge(loaded: list[onnx_models.OnnxModel]):
    """One ModelProto: the first model (body + head, with the body's features as an output) and
    each other model's head.onnx on those features; one output per model, named by it."""
    import onnx
    from onnx import compose

    def load(path: Path):  # its metadata goes: the bundle's own is written over the merged graph
        proto = onnx.load(path)
        del proto.metadata_props[:]
        return proto

    # Every tensor of model i is renamed "i/...": no name of one graph can meet another's, nor an
    # attribute's output name.
    merged = compose.add_prefix(load(loaded[0].path), "0/", rename_inputs=False)
    keep = ["0/probabilities", "0/features"]
    for i, m in enumerate(loaded[1:], 1):
        head = compose.add_prefix(load(m.path.with_name(runs.HEAD)), f"{i}/")
        keep.append(f"{i}/probabilities")
        merged = compose.merge_models(
            merged, head, io_map=[("0/features", f"{i}/features")], outputs=keep
        )
    graph = merged.graph
    renames = {f"{i}/probabilities": m.name for i, m in enumerate(loaded)}
    for node in graph.node:
        node.output[:] = [renames.get(name, name) for name in node.output]
    outputs = [o for o in graph.output if o.name in renames]
    for o in outputs:
        o.name = renames[o.name]
    del graph.output[:]
    graph.output.extend(sorted(outputs, key=lambda o: list(renames.values()).index(o.name)))
    # merge_models lists an opset once per graph merged; ONNX Runtime's quantizer wants each once
    opsets = {(o.domain, o.version): o for o in merged.opset_import}
    del merged.opset_import[:]
    merged.opset_import.extend(opsets.values())
    merged.producer_name = "replicate"
    onnx.checker.check_model(merged)
    return merged


def quantize_bundle(
    folder: Path, loaded: list[onnx_models.OnnxModel], meta: dict, calibration: int, log
) -> dict:
    """bundle.int8.onnx beside bundle.onnx: the body quantized once for all the heads, calibrated
    on up to `calibration` training photos of the attributes' tasks (seeded sample); each
    attribute's validation accuracy in fp32 and int8 on its own task's photos. Returns the record
    bundle.json keeps as "int8"."""
    from ..training import export  # PyTorch: loaded by `build` already

    fp32 = onnx_models.load(folder / runs.BUNDLE, name="fp32")
    task_dirs = {m.name: runs.run_of(m.path).task_dir for m in loaded}
    train = sorted({f for d in set(task_dirs.values()) for f in export.split_files(d, "train")})
    if not train:
        raise ReplicateError("no training photos in the runs' task folders to calibrate int8 on")
    sample = random.Random(0).sample(train, min(calibration, len(train)))
    start = time.perf_counter()
    log(f"int8: calibrating on {len(sample)} training photos")
    batches = [fp32[0].normalise(b) for b in export.decoded_batches(sample, fp32[0].prep)]
    out = folder / runs.BUNDLE_INT8
    # the body key stays with fp32: these weights are quantized with this bundle's calibration
    int8_meta = {k: v for k, v in meta.items() if k != "body"}
    export.quantize_onnx(folder / runs.BUNDLE, out, batches, fp32[0].input_name, int8_meta)
    seconds = time.perf_counter() - start
    int8 = onnx_models.load(out, name="int8")
    accuracy = {}  # each attribute on its own task's valid photos, fp32 and int8 in one pass
    for task_dir in dict.fromkeys(task_dirs.values()):
        mine = [i for i, m in enumerate(loaded) if task_dirs[m.name] == task_dir]
        chosen = [fp32[i] for i in mine] + [int8[i] for i in mine]
        accuracy.update(export.valid_accuracies(chosen, task_dir))
    result = {
        "calibration_photos": len(sample),
        "seconds": round(seconds, 1),
        "fp32_mb": round((folder / runs.BUNDLE).stat().st_size / 1e6, 1),
        "mb": round(out.stat().st_size / 1e6, 1),
        "attributes": {
            m.name: {
                "fp32_valid_accuracy": accuracy[f"fp32_{m.name}"],
                "valid_accuracy": accuracy[f"int8_{m.name}"],
            }
            for m in loaded
        },
    }
    for name, a in result["attributes"].items():
        log(
            f"int8 {name}: valid accuracy {a['valid_accuracy']:.2%} "
            f"(fp32 {a['fp32_valid_accuracy']:.2%})"
        )
    log(f"int8: {out.name} ({result['mb']} MB, fp32 {result['fp32_mb']} MB), {seconds:.0f}s")
    return result


def _write_manifest(folder: Path, manifest: dict) -> None:
    files = [folder / runs.BUNDLE, folder / runs.BUNDLE_INT8, folder / SCRIPT, folder / "photos.py"]
    manifest["checksums"] = runs.checksums(files)
    (folder / runs.MANIFEST).write_text(json.dumps(manifest, indent=2))
