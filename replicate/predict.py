"""Trained models -> tags: tag new photos in bulk, and score a task's own images.

    replicate predict exports/rooms/resnet18-unfrozen photos/ --out tags.csv

Two engines. `onnx` (the default) runs a run folder's `model.onnx` with ONNX Runtime: no pickle is
loaded, so it is safe for files from elsewhere, and it needs neither fastai nor PyTorch. Each photo
is decoded by `photos.decode` (the decoding training used: EXIF orientation, draft-mode rule and
validation crop, as each model's metadata records them), by parallel worker threads; inference
runs in batches. `fastai` loads `export.pkl` (a pickle: it runs code, so only files the
user trusts) and runs fastai's own `test_dl` pipeline: the path `interpret` uses too.

Both check the file against the SHA-256 recorded in metrics.json when it was written, and turn
files that do not decode into rows with an error instead of stopping.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from fastprogress.fastprogress import progress_bar
from PIL import Image

from . import report, runtime
from .errors import ReplicateError
from .folders import image_files, sha256_file
from .photos import Preprocess, decode

if TYPE_CHECKING:  # fastai and torch load only for the fastai engine (seconds, and a pickle)
    import torch
    from fastai.learner import Learner

META_KEY = "replicate"  # model.onnx's metadata entry: JSON written by export.write_onnx


@dataclass
class Model:
    """A loaded export.pkl (the fastai engine) and where it came from."""

    name: str  # column prefix, e.g. "rooms"
    learn: Learner
    path: Path  # the export.pkl
    warning: str = ""  # checksum problems, said to the user


# --- the checksum recorded at writing time ------------------------------------------------------


def checksum_warning(path: Path) -> str:
    """'' when `path` matches the SHA-256 that metrics.json beside it recorded, else what is wrong."""
    metrics = path.parent / "metrics.json"
    if not metrics.is_file():
        return f"{path} has no metrics.json beside it: no checksum to verify it against"
    recorded = json.loads(metrics.read_text())
    expected = recorded.get("checksums", {}).get(path.name)
    if expected is None and path.name == "export.pkl":
        expected = recorded.get("export_sha256")  # run folders from before "checksums"
    if expected is None:
        return f"{metrics} records no checksum for {path.name}: nothing to verify it against"
    if expected != sha256_file(path):
        return f"{path} does not match the SHA-256 recorded in {metrics} when it was written: it was changed"
    return ""


# --- the onnx engine ------------------------------------------------------------------------------


@dataclass
class OnnxModel:
    """A model.onnx in an ONNX Runtime session, with what its metadata says."""

    name: str
    session: object  # onnxruntime.InferenceSession
    meta: dict
    path: Path
    warning: str = ""
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

    def probabilities(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: self.normalise(batch)})[0]


def onnx_path(model: Path) -> Path:
    """The model.onnx of a run folder, or the .onnx file itself."""
    path = model / "model.onnx" if model.is_dir() else model
    if not path.is_file():
        hint = (
            f": write it with `replicate export {model}`, or use --engine fastai"
            if (model / "export.pkl").is_file()
            else ""
        )
        raise ReplicateError(
            f"{model} is neither a run folder with model.onnx nor an .onnx file{hint}"
        )
    return path


def providers(device: str = "cpu", index: int = 0) -> list:
    """ONNX Runtime execution providers for `device`: CUDA's where installed (onnxruntime-gpu)."""
    if device == "cuda":
        return [("CUDAExecutionProvider", {"device_id": index}), "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def load_onnx(
    model: Path,
    name: str | None = None,
    device: str = "cpu",
    index: int = 0,
    threads: int | None = None,
) -> OnnxModel:
    """An ONNX Runtime session for a run folder's model.onnx (or an .onnx file), its metadata read
    and its checksum checked. A file that is not a readable ONNX model is a ReplicateError."""
    import onnxruntime as ort

    path = onnx_path(Path(model))
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: the CLI says what matters in one line
    if threads:
        options.intra_op_num_threads = threads
    try:
        session = ort.InferenceSession(str(path), options, providers=providers(device, index))
    except Exception as e:  # a truncated or corrupt file: onnxruntime's InvalidProtobuf, Fail, ...
        raise ReplicateError(
            f"cannot load {path}: not a readable ONNX model "
            f"({str(e).splitlines()[0][:200]}): export it again with `replicate export`"
        ) from None
    raw = session.get_modelmeta().custom_metadata_map.get(META_KEY)
    try:
        meta = json.loads(raw)
        Preprocess.from_meta(meta), list(meta["classes"])
    except (TypeError, ValueError, KeyError):
        raise ReplicateError(
            f"{path} has no replicate metadata (classes, size, crop, normalisation): "
            "write it with `replicate export RUN_DIR`"
        ) from None
    default = meta.get("task") or path.parent.name
    warning = checksum_warning(path)
    if device == "cuda" and "CUDAExecutionProvider" not in session.get_providers():
        warning = "; ".join(
            filter(
                None,
                [warning, "ONNX Runtime could not start its CUDA provider: running on the CPU"],
            )
        )
    return OnnxModel(name or default, session, meta, path, warning)


def decoded(files: list[Path], geometries: list, workers: int, ahead: int = 128):
    """`decode` of each file, in order, by `workers` threads (0: in this thread), at most `ahead`
    photos ahead of the consumer so memory stays bounded however many files there are.

    Threads, not processes: Pillow releases the GIL while it decodes and resizes, so threads decode
    in parallel with each other and with ONNX Runtime, without a process start-up or copying
    pixels between processes. On the 2-core machine here a pool of 2 processes halved the photos/s
    (they fight ONNX Runtime's threads for the cores), while threads kept the inference rate."""
    if workers <= 0:
        yield from (decode(f, geometries) for f in files)
        return
    with ThreadPoolExecutor(workers) as pool:
        pending: deque = deque()
        for f in files:
            pending.append(pool.submit(decode, f, geometries))
            if len(pending) >= ahead:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def tag_onnx(
    models: list[OnnxModel],
    files: list[Path],
    bs: int = 64,
    workers: int | None = None,
    progress: bool = True,
) -> pd.DataFrame:
    """One row per file: path, error, and per model <name>_predicted, <name>_p_<class>. Each photo
    is decoded once (by `workers` threads; None: one per core) for all the models."""
    workers = runtime.workers(workers)
    geometries = list(dict.fromkeys(m.prep.geometry for m in models))
    errors = [""] * len(files)
    probs = {
        m.name: np.full((len(files), len(m.classes)), np.nan, dtype=np.float32) for m in models
    }
    pending: list[tuple[int, dict]] = []

    def flush():
        if pending:
            rows = [i for i, _ in pending]
            for m in models:
                probs[m.name][rows] = m.probabilities(
                    np.stack([d[m.prep.geometry] for _, d in pending])
                )
            pending.clear()

    photos = decoded(files, geometries, workers, ahead=2 * bs)
    for i, (arrays, error) in enumerate(
        progress_bar(photos, total=len(files), leave=False) if progress else photos
    ):
        if error:
            errors[i] = error
            continue
        pending.append((i, arrays))
        if len(pending) == bs:
            flush()
    flush()
    table = pd.DataFrame({"path": [str(f) for f in files], "error": errors})
    for m in models:
        p = probs[m.name]
        ok = ~np.isnan(p).any(axis=1)
        table[f"{m.name}_predicted"] = pd.Series(
            [m.classes[k] for k in p[ok].argmax(axis=1)], index=np.flatnonzero(ok), dtype=object
        )
        for k, c in enumerate(m.classes):
            table[f"{m.name}_p_{c}"] = p[:, k]
    return table


# --- the fastai engine ----------------------------------------------------------------------------


def export_path(model: Path) -> Path:
    """The export.pkl of a run folder, or the file itself."""
    path = model / "export.pkl" if model.is_dir() else model
    if not path.is_file():
        raise ReplicateError(f"{model} is neither a run folder with export.pkl nor an export file")
    return path


def load_model(model: Path, device: torch.device | None = None, name: str | None = None) -> Model:
    """Load an export (trusted code: it is unpickled) and check its recorded SHA-256."""
    from fastai.learner import load_learner

    path = export_path(Path(model))
    warning = checksum_warning(path)
    with warnings.catch_warnings():
        warnings.simplefilter(
            "ignore"
        )  # fastai's pickle warning: the CLI says it in --help instead
        try:
            learn = load_learner(path, cpu=device is None or device.type == "cpu")
        except Exception as e:  # a truncated file, another fastai's pickle, a missing class...
            raise ReplicateError(
                f"cannot load {path}: {type(e).__name__}: {e}".splitlines()[0]
            ) from None
    if device is not None:
        learn.dls.to(device)
        learn.model.to(device)
    config = path.parent / "config.json"
    default = json.loads(config.read_text())["task"] if config.is_file() else path.parent.name
    return Model(name or default, learn, path, warning)


def split_items(items: list[Path]) -> tuple[list[Path], list[Path]]:
    """(models, photos): the leading run folders (with model.onnx or export.pkl) and model files
    (.onnx, .pkl), then the images and folders to tag."""
    n = 0
    while n < len(items) and (
        items[n].suffix in (".onnx", ".pkl")
        or (
            items[n].is_dir()
            and any((items[n] / f).is_file() for f in ("model.onnx", "export.pkl"))
        )
    ):
        n += 1
    if n == 0 or n == len(items):
        raise ReplicateError(
            "give one or more models (run folders, model.onnx or export.pkl) and then images or folders"
        )
    return items[:n], items[n:]


def plan(engine: str, device: str, model_paths: list[Path]) -> tuple[str, str, str]:
    """(engine, device, note) to run: `--device cuda` (or auto on a GPU machine) runs ONNX Runtime's
    CUDA provider where onnxruntime-gpu is installed, else PyTorch (the fastai engine: export.pkl)."""
    import onnxruntime as ort

    if device == "cpu" or (device == "auto" and not runtime.gpu_present()):
        return engine, "cpu", ""
    if engine == "onnx" and "CUDAExecutionProvider" in ort.get_available_providers():
        return "onnx", "cuda", ""
    if (
        runtime.resolve_device(device).type != "cuda"
    ):  # PyTorch decides: no CUDA with --device cuda is its error
        return engine, "cpu", ""
    if engine == "onnx":
        if not all(_has_pickle(p) for p in model_paths):
            note = "ONNX Runtime here has no CUDA provider (pip install onnxruntime-gpu): running on the CPU"
            return "onnx", "cpu", note
        return (
            "fastai",
            "cuda",
            (
                "ONNX Runtime here has no CUDA provider (pip install onnxruntime-gpu): "
                "running export.pkl with PyTorch on the GPU (a pickle: trusted files only)"
            ),
        )
    return "fastai", "cuda", ""


def _has_pickle(model: Path) -> bool:
    return model.suffix == ".pkl" or (model.is_dir() and (model / "export.pkl").is_file())


def load_models(paths: list[Path], engine: str, device: str) -> list:
    """The models, loaded for `engine` on `device`, their column names made unique: the task, else
    task_<run folder>, else task_<run folder>_<file> (model.onnx beside model.int8.onnx)."""
    index = int(os.environ.get("LOCAL_RANK", 0))
    if engine == "onnx":
        models = [load_onnx(p, device=device, index=index) for p in paths]
    else:
        import torch

        dev = torch.device("cuda", index) if device == "cuda" else torch.device("cpu")
        models = [load_model(_pickle_of(p), dev) for p in paths]
    tasks = [m.name for m in models]
    for detail in (
        lambda p: p.name if p.is_dir() else p.parent.name,  # the run folder
        lambda p: p.name if p.is_dir() else f"{p.parent.name}_{p.stem}",
    ):  # and the file
        names = [m.name for m in models]
        for m, task, path in zip(models, tasks, paths):
            if names.count(m.name) > 1:
                m.name = f"{task}_{detail(path)}"
    return models


def _pickle_of(model: Path) -> Path:
    """The export.pkl for the fastai engine, also when a model.onnx was named."""
    return model.parent / "export.pkl" if model.suffix == ".onnx" else model


def tag_any(
    models: list, files: list[Path], bs: int = 64, workers: int | None = None
) -> pd.DataFrame:
    """`tag_onnx` or `tag` (fastai), by the kind of models; under `accelerate launch` or `torchrun`
    each process tags its share of `files` (accelerate's split_between_processes) and the main
    process returns the whole table, each file once, in order (the others return None)."""
    mine, state = files, None
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from accelerate import PartialState

        state = PartialState()
        with state.split_between_processes(files) as share:
            mine = list(share)
    if models and isinstance(models[0], OnnxModel):
        table = tag_onnx(models, mine, bs, workers, progress=state is None or state.is_main_process)
    else:
        with runtime.alone():  # each process predicts its own share: no gathering in get_preds
            table = tag(models, mine, bs)
    if state is None:
        return table
    from accelerate.utils import gather_object

    rows = gather_object(table.to_dict("records"))
    if not state.is_main_process:
        return None
    order = {str(f): i for i, f in enumerate(files)}
    whole = pd.DataFrame(rows)
    return whole.iloc[whole.path.map(order).argsort()].reset_index(drop=True)


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


def readable(files: list[Path]) -> tuple[list[Path], dict[Path, str]]:
    """(files that decode, {file: error} for those that don't), checked before batching so one
    bad file cannot stop a batch."""
    good, bad = [], {}
    for f in progress_bar(files, leave=False):
        try:
            with Image.open(f) as im:
                im.draft(im.mode, (64, 64))  # JPEG: decode at reduced scale, still reads every byte
                im.load()
            good.append(f)
        except Exception as e:  # PIL raises many types for files that are not images
            bad[f] = f"{type(e).__name__}: {e}"
    return good, bad


def score(
    learn: Learner, files: list[Path], bs: int = 64, with_labels: bool = False
) -> pd.DataFrame:
    """Probabilities for `files` (validation transforms, batches of `bs`): path, predicted,
    probability, p_<class>...; with labels (taken from the folders, as in training): actual, loss."""
    vocab = list(learn.dls.vocab)
    dl = learn.dls.test_dl(files, with_labels=with_labels, bs=bs)
    if with_labels:
        probs, targs, losses = learn.get_preds(dl=dl, with_loss=True)
    else:
        probs, _ = learn.get_preds(dl=dl)
    pred = probs.argmax(dim=1)
    frame = pd.DataFrame({"path": [str(f) for f in files]})
    if with_labels:
        frame["actual"] = [vocab[i] for i in targs.tolist()]
    frame["predicted"] = [vocab[i] for i in pred.tolist()]
    frame["probability"] = probs.max(dim=1).values.numpy()
    if with_labels:
        frame["loss"] = losses.numpy()
    for i, c in enumerate(vocab):
        frame[f"p_{c}"] = probs[:, i].numpy()
    return frame


def tag(models: list[Model], files: list[Path], bs: int = 64) -> pd.DataFrame:
    """The fastai engine: one row per file: path, error, and per model <name>_predicted, <name>_p_<class>."""
    good, bad = readable(files)
    table = pd.DataFrame(
        {"path": [str(f) for f in files], "error": [bad.get(f, "") for f in files]}
    )
    for model in models:
        if not good:
            for col in [f"{model.name}_predicted"] + [
                f"{model.name}_p_{c}" for c in model.learn.dls.vocab
            ]:
                table[col] = np.nan
            continue
        scored = score(model.learn, good, bs).drop(columns="probability")
        scored.columns = ["path"] + [f"{model.name}_{c}" for c in scored.columns[1:]]
        table = table.merge(scored, on="path", how="left")
    return table


def listing_ids(paths: pd.Series, pattern: str) -> pd.Series:
    """The listing id of each path: `pattern`'s first group, searched in the file name (or in the
    path, if the pattern has a /); None where it does not match."""
    regex = re.compile(pattern)
    if regex.groups < 1:
        raise ReplicateError(
            f"--listing-pattern {pattern!r} needs a group that captures the listing id, e.g. '^(\\d+)_'"
        )

    def listing_id(path: str) -> str | None:
        p = Path(path)
        m = regex.search(p.as_posix() if "/" in pattern else p.name)
        return m[1] if m else None

    return paths.map(listing_id)


def listings(
    table: pd.DataFrame,
    pattern: str,
    threshold: float = 0.5,
    filters: dict[str, dict] | None = None,
) -> pd.DataFrame:
    """Per listing: for each model and class, the highest probability over the listing's photos,
    and whether any photo shows it above `threshold` ("has a balcony" is a property of the listing);
    for each search filter (`search_filters`), whether any photo passes it."""
    ids = listing_ids(table.path, pattern)
    if ids.isna().all():
        raise ReplicateError(f"--listing-pattern {pattern!r} matched none of the file names")
    probs = table.filter(regex=r"_p_").assign(listing=ids).dropna(subset=["listing"])
    best = probs.groupby("listing").max()
    out = pd.concat(
        [probs.groupby("listing").size().rename("photos"), best.add_prefix("max_")], axis=1
    )
    for col in best.columns:
        out[f"has_{col.replace('_p_', '_')}"] = best[col] >= threshold
    for name, found in (filters or {}).items():
        column = f"{name}_{found['column']}"
        out[column] = table[column].groupby(ids).any().reindex(out.index, fill_value=False)
    return out.reset_index()


# --- a yes/no task's search filter ------------------------------------------------------------


def search_filters(models: list) -> dict[str, dict]:
    """{model name: its run's filter.json} for the models of two-class runs whose filter found a
    threshold (`replicate run` writes it: report.write_filter)."""
    found = {}
    for m in models:
        run_dir = m.path if m.path.is_dir() else m.path.parent
        spec = report.read_filter(run_dir)
        if spec and spec["threshold"] is not None:
            found[m.name] = {**spec, "run_dir": str(run_dir)}
    return found


def apply_filters(table: pd.DataFrame, filters: dict[str, dict]) -> pd.DataFrame:
    """`table` with <model>_has_<attribute> per photo: its p_<positive> at or above the run's threshold."""
    for name, found in filters.items():
        table[f"{name}_{found['column']}"] = (
            table[f"{name}_p_{found['positive']}"].fillna(-1.0) >= found["threshold"]
        )
    return table


def listing_rule(found: dict, pattern: str) -> dict:
    """How the per-listing rule (a listing has the attribute when any of its photos passes the
    filter) does on the run's own validation photos, grouped into listings by `pattern`."""
    preds = pd.read_csv(Path(found["run_dir"]) / "valid_predictions.csv")
    ids = listing_ids(preds.path, pattern)
    preds = preds.assign(listing=ids).dropna(subset=["listing"])
    truth = (preds.actual == found["positive"]).groupby(preds.listing).any()
    shown = (preds[f"p_{found['positive']}"] >= found["threshold"]).groupby(preds.listing).any()
    hits = int((truth & shown).sum())
    return {
        "column": found["column"],
        "positive": found["positive"],
        "threshold": found["threshold"],
        "target_precision": found["target_precision"],
        "photo_precision": found["precision"],
        "photo_recall": found["recall"],
        "valid_listings": int(len(truth)),
        "valid_listings_with": int(truth.sum()),
        "listing_precision": hits / max(int(shown.sum()), 1) if shown.any() else None,
        "listing_recall": hits / int(truth.sum()) if truth.any() else None,
    }


def write_listing_rules(filters: dict[str, dict], pattern: str, path: Path) -> dict[str, dict]:
    """`listing_rule` of every search filter, written to `path` (JSON); returns them."""
    rules = {name: listing_rule(found, pattern) for name, found in filters.items()}
    path.write_text(json.dumps(rules, indent=2))
    return rules


def task_dir_of(run_dir: Path) -> Path:
    """The task folder a run trained on, from its config.json."""
    config = json.loads((Path(run_dir) / "config.json").read_text())
    return Path(config.get("task_dir") or Path(config["data_dir"]) / config["task"])


def interpret(run_dir: Path, splits: list[str], bs: int = 64) -> dict[str, pd.DataFrame]:
    """Score the task's own images with the run's export, without augmentation; {split: predictions}.

    Written to predictions_<split>.csv in the run folder. The training split matters most
    for label cleaning: a wrong label there teaches the model the mistake.
    """
    from . import data

    run_dir = Path(run_dir)
    if not (run_dir / "config.json").is_file():
        raise ReplicateError(
            f"{run_dir} is not a run folder (no config.json): e.g. exports/rooms/resnet18-frozen"
        )
    model = load_model(run_dir)
    if model.warning:
        warnings.warn(model.warning, stacklevel=2)
    images = data.scan_task(task_dir_of(run_dir))
    vocab = set(model.learn.dls.vocab)
    if set(images.classes) - vocab:
        raise ReplicateError(
            f"the task now has classes the model never saw: {sorted(set(images.classes) - vocab)}"
        )
    out = {}
    for split in splits:
        files = [
            f.resolve() for f in images.files if f.parent.parent.name == split
        ]  # usable from any folder
        out[split] = score(model.learn, files, bs, with_labels=True)
        out[split].to_csv(run_dir / f"predictions_{split}.csv", index=False)
    return out
