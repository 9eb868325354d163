"""The ONNX engine: a run's model.onnx -> class probabilities, with ONNX Runtime and no PyTorch.

    python -c "from replicate.engine import onnx_models as o; print(o.load_onnx('exports/rooms/RUN').classes)"

No pickle is loaded, so it is safe for files from elsewhere, and it needs neither fastai nor
PyTorch. Each photo is decoded by `photos.decode` (the decoding training used: EXIF orientation,
draft-mode rule and validation crop, as each model's metadata records them), by parallel worker
threads, once for all the models; inference runs in batches. A model file is checked against the
SHA-256 its run folder recorded when it was written (runs.checksum_warning), and files that do not
decode become rows with an error instead of stopping. A bundle (`replicate bundle`: several heads
on one body in one file) loads as one model per attribute, all run by one session run per batch.
"""

from __future__ import annotations

import json
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from .. import runs, runtime
from ..errors import ReplicateError
from ..folders import sha256_or_empty
from ..photos import Preprocess, decode

META_KEY = "replicate"  # model.onnx's metadata entry: JSON written by export.write_onnx


@dataclass
class OnnxModel:
    """A model.onnx in an ONNX Runtime session, with what its metadata says."""

    name: str
    session: object  # onnxruntime.InferenceSession
    meta: dict
    path: Path
    warning: str = ""
    # Its head alone (runs.HEAD) where its body is the pretrained network untouched; the models
    # with the same `body` key run one body pass for all their heads (`tag_onnx`).
    head: object | None = None
    # A bundle's attribute: its output in the bundle's session, shared by all the bundle's
    # attributes (`bundle`: the file), which one run of the session gives at once.
    output: str = "probabilities"
    bundle: str | None = None
    prep: Preprocess = field(init=False)

    def __post_init__(self):
        self.prep = Preprocess.from_meta(self.meta)
        self.classes = list(self.meta["classes"])
        self.input_name = self.session.get_inputs()[0].name
        self._mean = np.array(self.prep.mean, dtype=np.float32).reshape(1, 3, 1, 1) * 255
        self._scale = 1 / (np.array(self.prep.std, dtype=np.float32).reshape(1, 3, 1, 1) * 255)

    def normalise(self, batch: np.ndarray) -> np.ndarray:
        """uint8 N x H x W x 3 -> the model's float32 N x 3 x H x W input."""
        x = batch.transpose(0, 3, 1, 2).astype(np.float32)
        return np.ascontiguousarray((x - self._mean) * self._scale)

    @property
    def body(self) -> str | None:
        """The key of its body (models.body_record) when another model can share it, else None."""
        return self.meta.get("body") if self.head is not None else None

    def probabilities(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run(["probabilities"], {self.input_name: self.normalise(batch)})[0]

    def with_features(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(probabilities, the body's output) of a batch: one body pass for every head on it."""
        probs, features = self.session.run(
            ["probabilities", "features"], {self.input_name: self.normalise(batch)}
        )
        return probs, features

    def head_probabilities(self, features: np.ndarray) -> np.ndarray:
        """Its head alone on the body's output (`with_features` of a model sharing its body)."""
        return self.head.run(None, {"features": features})[0]


def onnx_path(model: Path) -> Path:
    """The model.onnx of a run folder, the bundle.onnx of a bundle folder, or the .onnx file."""
    path = model / runs.ONNX if model.is_dir() else model
    if model.is_dir() and not path.is_file() and (model / runs.BUNDLE).is_file():
        path = model / runs.BUNDLE
    if not path.is_file():
        hint = (
            f": write it with `replicate export {model}`, or use --engine fastai"
            if (model / runs.PICKLE).is_file()
            else ""
        )
        raise ReplicateError(
            f"{model} is neither a run folder with model.onnx nor an .onnx file{hint}"
        )
    return path


def providers(device: str = "cpu", gpu: int = 0) -> list:
    """ONNX Runtime execution providers for `device`: CUDA's where installed (onnxruntime-gpu)."""
    if device == "cuda":
        return [("CUDAExecutionProvider", {"device_id": gpu}), "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def load(
    model: Path,
    name: str | None = None,
    device: str = "cpu",
    gpu: int = 0,
    threads: int = 0,
) -> list[OnnxModel]:
    """ONNX Runtime sessions for a run folder's model.onnx, an .onnx file, or a bundle (its folder
    or file: one OnnxModel per attribute, on one session), the metadata read and the checksums
    checked. `name`: the model's name, a prefix to a bundle's attribute names; `gpu`: the CUDA device's number; `threads`: the
    session's threads (0: one per core). A file that is not a readable ONNX model with replicate's
    metadata is a ReplicateError."""
    path = onnx_path(Path(model))
    session = _session(path, device, gpu, threads)
    raw = session.get_modelmeta().custom_metadata_map.get(META_KEY)
    try:
        meta = json.loads(raw)
        Preprocess.from_meta(meta)
        for attribute in meta.get("attributes") or [meta]:
            list(attribute["classes"])
        for attribute in meta.get("attributes", []):  # a bundle: each attribute's output
            str(attribute["output"])
    except (TypeError, ValueError, KeyError):
        raise ReplicateError(
            f"{path} has no replicate metadata (classes, size, crop, normalisation): "
            "write it with `replicate export RUN_DIR`"
        ) from None
    warnings = [runs.checksum_warning(path)]
    if device == "cuda" and "CUDAExecutionProvider" not in session.get_providers():
        warnings.append("ONNX Runtime could not start its CUDA provider: running on the CPU")
    if "attributes" in meta:  # a bundle: every attribute from one run of its session
        common = {k: v for k, v in meta.items() if k != "attributes"}
        warning = "; ".join(w for w in warnings if w)
        return [
            OnnxModel(
                f"{name}_{a['name']}" if name else a["name"],
                session,
                {**common, **a},
                path,
                warning,
                output=a["output"],
                bundle=str(path),
            )
            for a in meta["attributes"]
        ]
    head = None
    if meta.get("body") and (path.parent / runs.HEAD).is_file():  # else: tagged alone, as before
        # One thread: a head is a pooling and two small layers (about 50 us a batch), and a pool of
        # threads per head spins after each run, taking the cores from the body's next batch
        # (six heads on one body: 1.18x one attribute's time with pools, 1.08x without).
        head = _session(path.parent / runs.HEAD, device, gpu, threads=1)
        warnings.append(runs.checksum_warning(path.parent / runs.HEAD))
    warning = "; ".join(w for w in warnings if w)
    return [
        OnnxModel(name or meta.get("task") or path.parent.name, session, meta, path, warning, head)
    ]


def load_onnx(
    model: Path,
    name: str | None = None,
    device: str = "cpu",
    gpu: int = 0,
) -> OnnxModel:
    """`load` of one model: a run folder's model.onnx or an .onnx file, not a bundle of several."""
    models = load(model, name, device, gpu)
    if len(models) > 1:
        raise ReplicateError(
            f"{models[0].path} is a bundle of {len(models)} attributes: name it where several "
            "models are taken (predict), or give one run folder"
        )
    return models[0]


def _session(path: Path, device: str, gpu: int, threads: int = 0):
    """An ONNX Runtime session for `path` (`threads`: its intra-op threads; 0: one per core); a
    file that is not a readable ONNX model is a ReplicateError."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: the CLI says what matters in one line
    options.intra_op_num_threads = threads
    # No spinning: ONNX Runtime's threads otherwise busy-wait after each batch, taking the cores
    # from the threads that decode the next photos. Measured with `replicate predict` (lite0 at
    # 224 px, the 5,885 Houses task photos, 2 cores, alternated): 188.6-190.7 photos/s spinning,
    # 198.3-204.2 not.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        return ort.InferenceSession(str(path), options, providers=providers(device, gpu))
    except Exception as e:  # a truncated or corrupt file: onnxruntime's InvalidProtobuf, Fail, ...
        raise ReplicateError(
            f"cannot load {path}: not a readable ONNX model "
            f"({str(e).splitlines()[0][:200]}): write it again (`replicate export`, or "
            "`replicate bundle` for a bundle)"
        ) from None


def sharing(models: list[OnnxModel]) -> list[list[OnnxModel]]:
    """The models in groups that share one body pass: a bundle's attributes; models with the same
    body key and input geometry (the same tensors fed the same pixels); every other model alone.
    In the order given."""
    groups: dict = {}
    for i, m in enumerate(models):
        key = ("bundle", m.bundle) if m.bundle else (m.body, m.prep) if m.body else i
        groups.setdefault(key, []).append(m)
    return list(groups.values())


def features_name(body: str) -> str:
    """The name of a body's features, as a photo's tags and the index's rows carry them."""
    return f"features_{body[:16]}"


def group_probabilities(
    group: list[OnnxModel], batch: np.ndarray
) -> tuple[list[np.ndarray], np.ndarray | None]:
    """Each model's probabilities for a uint8 batch, one body pass for a `sharing` group, and the
    body's features where it is one others can share (else None): a bundle's outputs from one
    session run; on a shared body the first model whole (with the body's features) and the
    others' heads on those; a model alone as it is."""
    first = group[0]
    if first.bundle:
        outputs = [m.output for m in group]
        return first.session.run(outputs, {first.input_name: first.normalise(batch)}), None
    if first.body is None:
        return [first.probabilities(batch)], None
    probs, features = first.with_features(batch)
    return [probs, *(m.head_probabilities(features) for m in group[1:])], features


def decoded(files: list[Path], geometries: list, workers: int, ahead: int = 128, hashed=False):
    """`decode` of each file, in order, by `workers` threads (0: in this thread), at most `ahead`
    photos ahead of the consumer so memory stays bounded however many files there are; `hashed`:
    each with the file's SHA-256 too ((arrays, error, sha256); '' when it cannot be read), in the
    same threads (hashlib releases the GIL as Pillow does).

    Threads, not processes: Pillow releases the GIL while it decodes and resizes, so threads decode
    in parallel with each other and with ONNX Runtime, without a process start-up or copying
    pixels between processes. On the 2-core machine here a pool of 2 processes halved the photos/s
    (they fight ONNX Runtime's threads for the cores), while threads kept the inference rate."""
    work = _decode_and_hash if hashed else decode
    if workers <= 0:
        yield from (work(f, geometries) for f in files)
        return
    with ThreadPoolExecutor(workers) as pool:
        pending: deque = deque()
        for f in files:
            pending.append(pool.submit(work, f, geometries))
            if len(pending) >= ahead:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def _decode_and_hash(path: Path, geometries: list) -> tuple[dict | None, str, str]:
    return (*decode(path, geometries), sha256_or_empty(Path(path)))


def batch_probabilities(groups: list[list[OnnxModel]], photos: list[dict]) -> list[dict]:
    """Each photo's probabilities per model ({name: classes}) for decoded photos ({geometry:
    array}, `decode`'s): one body pass per `sharing` group; and under `features_name(body)` the
    features of each body others can share (what the index stores)."""
    out = [{} for _ in photos]
    for group in groups:
        pixels = np.stack([p[group[0].prep.geometry] for p in photos])
        probs, features = group_probabilities(group, pixels)
        for m, each in zip(group, probs):
            for row, p in zip(out, each):
                row[m.name] = p
        if features is not None:
            for row, f in zip(out, features):
                row[features_name(group[0].body)] = f
    return out


def tagged(groups: list[list[OnnxModel]], photos, bs: int = 64):
    """(probabilities or None, item) for each item of `photos` (tuples whose first element is a
    photo's decoded arrays, None where it did not decode), in order, inferred in batches of `bs`
    photos that decoded: an item comes out once its batch has run."""
    held: list = []

    def run():
        ok = [item[0] for item in held if item[0] is not None]
        probs = iter(batch_probabilities(groups, ok) if ok else ())
        done = [(None if item[0] is None else next(probs), item) for item in held]
        held.clear()
        return done

    ready = 0
    for item in photos:
        held.append(item)
        ready += item[0] is not None
        if ready == bs:
            yield from run()
            ready = 0
    yield from run()


def tag_onnx(
    models: list[OnnxModel],
    files: list[Path],
    bs: int = 64,
    workers: int | None = None,
    progress: bool = True,
) -> pd.DataFrame:
    """One row per file: path, error, and per model <name>_predicted, <name>_p_<class>. Each photo
    is decoded once (by `workers` threads; None: one per core) for all the models, and models that
    share a body (`sharing`) run it once: the first runs whole, the others' heads on its output."""
    geometries = list(dict.fromkeys(m.prep.geometry for m in models))
    errors = [""] * len(files)
    probs = {
        m.name: np.full((len(files), len(m.classes)), np.nan, dtype=np.float32) for m in models
    }
    photos = decoded(files, geometries, runtime.workers(workers), ahead=2 * bs)
    results = tagged(sharing(models), photos, bs)
    if progress:  # counted as tagged, not as decoded: decoding runs ahead of the models
        results = runtime.progress(results, len(files), "tagging", unit="photos")
    for i, (p, (_, error)) in enumerate(results):
        errors[i] = error
        for name, values in (p or {}).items():
            if name in probs:  # not a body's features
                probs[name][i] = values
    return probability_table(models, [str(f) for f in files], errors, probs)


def probability_table(
    models: list[OnnxModel], paths: list[str], errors: list[str], probs: dict[str, np.ndarray]
) -> pd.DataFrame:
    """`tag_onnx`'s table from each model's probabilities (`probs`: name -> N x classes, NaN for
    the photos that did not decode): path, error, <name>_predicted, <name>_p_<class>."""
    table = pd.DataFrame({"path": paths, "error": errors})
    for m in models:
        p = probs[m.name]
        ok = ~np.isnan(p).any(axis=1)
        table[f"{m.name}_predicted"] = pd.Series(
            [m.classes[k] for k in p[ok].argmax(axis=1)], index=np.flatnonzero(ok), dtype=object
        )
        for k, c in enumerate(m.classes):
            table[f"{m.name}_p_{c}"] = p[:, k]
    return table
