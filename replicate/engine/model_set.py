"""The tagging engine: a job's models, loaded once, and photos -> `predict`'s table with them.

    python -c "from replicate.engine.model_set import ModelSet; print(ModelSet(['exports/tagger']).describe())"

Every command that tags stands on this one module: `predict`, `index` (here and in each Ray
actor), `serve` and the bundle's accuracies. A `ModelSet` loads run folders, bundles and model
files once (ONNX Runtime, or export.pkl with fastai), names their columns, groups the models that
share a body (`onnx_models.sharing`: one body pass for all their heads), reads each two-class run's
search filter (`filters.of_models`) and each model file's checksum, and computes its table's
column names once. `tag` tags files (`predict`); `infer` and `table` tag photos already decoded (the
server, the index).
"""

from __future__ import annotations

import copy
import io
import os
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from .. import runs, runtime
from ..errors import ReplicateError
from ..folders import sha256_file
from ..photos import decode
from . import filters, onnx_models


def split_items(items: list[Path]) -> tuple[list[Path], list[Path]]:
    """(models, photos): the leading run folders (with model.onnx or export.pkl), bundle folders
    and model files (.onnx, .pkl), then the images and folders to tag."""
    n = 0
    while n < len(items) and (
        items[n].suffix in (".onnx", ".pkl") or (items[n].is_dir() and runs.has_model(items[n]))
    ):
        n += 1
    if n == 0 or n == len(items):
        raise ReplicateError(
            "give one or more models (run folders, bundles, model.onnx or export.pkl) and then "
            "images or folders"
        )
    return items[:n], items[n:]


def load(paths: list[Path], engine: str = "onnx", device: str = "cpu", threads: int = 0) -> list:
    """The models, loaded for `engine` on `device` (a bundle: one model per attribute), their column
    names made unique: the task (a bundle's attribute name), else task_<run folder>, else
    task_<run folder>_<file> (model.onnx beside model.int8.onnx). `threads`: each ONNX Runtime
    session's (0: one per core)."""
    gpu = int(os.environ.get("LOCAL_RANK", 0))  # this process's GPU under accelerate or torchrun
    if engine == "onnx":
        loaded = [
            (m, p)
            for p in paths
            for m in onnx_models.load(p, device=device, gpu=gpu, threads=threads)
        ]
        models, paths = [m for m, _ in loaded], [p for _, p in loaded]
    else:
        import torch

        from . import fastai_models

        bundles = [p for p in paths if p.suffix != ".pkl" and runs.is_bundle(p)]
        if bundles:
            raise ReplicateError(
                f"{bundles[0]} is a bundle: it runs on ONNX Runtime only (--engine onnx)"
            )
        dev = torch.device("cuda", gpu) if device == "cuda" else torch.device("cpu")
        models = [fastai_models.load_model(_pickle_of(p), dev) for p in paths]
    tasks = [m.name for m in models]
    for detail in (
        lambda p: p.name if p.is_dir() else p.parent.name,  # the run folder
        lambda p: p.name if p.is_dir() else f"{p.parent.name}_{p.stem}",  # and the file
    ):
        names = [m.name for m in models]
        for m, task, path in zip(models, tasks, paths):
            if names.count(m.name) > 1:
                m.name = f"{task}_{detail(path)}"
    return models


def _pickle_of(model: Path) -> Path:
    """The export.pkl for the fastai engine, also when a model.onnx was named."""
    return model.parent / runs.PICKLE if model.suffix == ".onnx" else model


class ModelSet:
    """A job's models, loaded once: what they are (`models`, `filters`, `checksums`, `columns`)
    and how to tag with them (`tag` files; `infer` and `table` decoded photos)."""

    def __init__(
        self, paths: list[Path], engine: str = "onnx", device: str = "cpu", threads: int = 0
    ):
        """`engine`: onnx (ONNX Runtime) or fastai (export.pkl); `threads`: each ONNX Runtime
        session's (0: one per core)."""
        self.paths = [Path(p) for p in paths]
        self.engine, self.device = engine, device
        models = load(self.paths, engine, device, threads)
        # each file hashed once (a bundle's attributes share one)
        self._sha256 = {p: sha256_file(p) for p in dict.fromkeys(m.path for m in models)}
        self._set(models)

    def _set(self, models: list) -> None:
        """Everything derived from `models`: a subset recomputes it all, nothing by hand."""
        self.models = models
        self.checksums = {m.name: self._sha256[m.path] for m in models}
        self.warnings = [m.warning for m in models if m.warning]
        onnx = self.engine == "onnx"
        self.groups = onnx_models.sharing(models) if onnx else [[m] for m in models]
        self.geometries = list(dict.fromkeys(m.prep.geometry for m in models)) if onnx else []
        self.filters = filters.of_models(models)
        self.classes = {m.name: list(m.classes) for m in models}
        self.columns = self.column_names() if onnx else None

    def subset(self, names: list[str] | None) -> ModelSet:
        """The models `names` (None: all) of this set, sharing its loaded sessions (nothing is
        loaded or hashed again); their body passes regrouped among themselves."""
        if names is None:
            return self
        part = copy.copy(self)
        part._set([m for m in self.models if m.name in names])
        return part

    def tag(self, files: list[Path], bs: int = 64, workers: int | None = None) -> pd.DataFrame:
        """`predict`'s photo table of `files`: path, error, per model <name>_predicted (its answer:
        a search filter's, for a filtered model) and <name>_p_<class>, and each filter's flag.
        Under `accelerate launch` or `torchrun` each process tags its share of `files`
        (accelerate's split_between_processes) and the main process returns the whole table,
        each file once, in order (the others None)."""
        mine, state = files, None
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            from accelerate import PartialState

            state = PartialState()
            with state.split_between_processes(files) as share:
                mine = list(share)
        if self.engine == "onnx":
            shown = state is None or state.is_main_process
            table = onnx_models.tag_onnx(self.models, mine, bs, workers, progress=shown)
        else:
            from . import fastai_models

            with runtime.alone():  # each process predicts its own share: no gathering in get_preds
                table = fastai_models.tag(self.models, mine, bs)
        if state is not None:
            from accelerate.utils import gather_object

            rows = gather_object(table.to_dict("records"))
            if not state.is_main_process:
                return None
            order = {str(f): i for i, f in enumerate(files)}
            whole = pd.DataFrame(rows)
            table = whole.iloc[whole.path.map(order).argsort()].reset_index(drop=True)
        return filters.apply(table, self.filters)

    def infer(self, photos: list[dict]) -> list[dict[str, np.ndarray]]:
        """Each photo's probabilities per model ({name: classes}) for decoded photos ({geometry:
        array}, `photos.decode`'s): one body pass per group of models sharing a body."""
        return onnx_models.batch_probabilities(self.groups, photos)

    def tagged(self, photos, bs: int = 64):
        """`onnx_models.tagged` with these models: (probabilities or None, item) per item of a
        stream of decoded photos, in order, inferred in batches of `bs`."""
        return onnx_models.tagged(self.groups, photos, bs)

    def table(
        self, probs: list[dict[str, np.ndarray] | None], names: list[str], errors: list[str]
    ) -> pd.DataFrame:
        """`predict`'s photo table for photos' probabilities (one row each, named `names`; None
        for a photo that was not tagged, whose `errors` entry says why), the filters applied."""
        n = len(probs)
        arrays = {
            m.name: np.full((n, len(m.classes)), np.nan, dtype=np.float32) for m in self.models
        }
        for i, p in enumerate(probs):
            for name, values in (p or {}).items():
                if name in arrays:  # not a body's features
                    arrays[name][i] = values
        table = onnx_models.probability_table(self.models, names, errors, arrays)
        return filters.apply(table, self.filters)

    def column_names(self) -> list[str]:
        """The columns of `table` after path and error, in their order (ONNX models)."""
        empty = [{m.name: np.full(len(m.classes), np.nan, np.float32) for m in self.models}]
        return [c for c in self.table(empty, ["-"], [""]).columns if c not in ("path", "error")]

    def describe(self) -> list[dict]:
        """The models: classes, filters, checksums (their versions) and the body passes they share."""
        passes = {m.name: i for i, group in enumerate(self.groups) for m in group}
        out = []
        for m in self.models:
            found = self.filters.get(m.name)
            out.append({
                "name": m.name, "task": m.meta.get("task"), "arch": m.meta.get("arch"),
                "classes": m.classes, "file": str(m.path), "sha256": self.checksums[m.name],
                "filter": found and {k: found[k] for k in ("column", "positive", "threshold")},
                "body_pass": passes[m.name],
                "shares_body_with": [n for n, i in passes.items() if i == passes[m.name] and n != m.name],
            })  # fmt: skip
        return out

    def warm_up(self) -> None:
        """Tag one made-up photo, so the first real photo does not pay ONNX Runtime's first-run
        costs, and a model that cannot run is found before a server says it is ready."""
        gradient = np.linspace(0, 255, 320 * 240 * 3).astype(np.uint8).reshape(240, 320, 3)
        buffer = io.BytesIO()
        Image.fromarray(gradient).save(buffer, "JPEG")
        arrays, _ = decode(io.BytesIO(buffer.getvalue()), self.geometries)
        self.infer([arrays])
