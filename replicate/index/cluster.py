"""`replicate index --ray`: the index's tagging as a Ray Data job, on one machine or a cluster.

    ray start --head && replicate index exports/tagger /shared/photos --out /shared/index --ray auto

The pipeline, each stage where Ray Data puts it:

1. the photos to tag (path, size, mtime_ns, and the columns their rows carry) from the driver;
2. `decode_batch`: each photo read, hashed and decoded (`photos.decode`, the pipeline `predict`
   uses) to each model's input crop; a task stage, which Ray Data fuses into the actors' processes
   (see ACTOR_CPUS below);
3. `TagActor`, an actor pool (`map_batches` with a class): the models loaded once per actor
   (`engine.model_set.ModelSet`), one body pass per shared body, the index's rows (`plan.rows`);
4. `write_batch`, tasks: each batch of `--part-size` rows committed as one part of the index
   (`store.write_part`: a hidden file renamed into place), on the shared folder the index is in.

The driver only counts the parts. Every node must reach the models and the photos at the paths
given and the index folder (a shared file system), and have replicate installed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from ..engine import onnx_models
from ..engine.model_set import ModelSet
from ..errors import ReplicateError
from . import store
from .plan import IndexJob, Work, rows

# One actor per two CPUs, each reserving one and running its ONNX Runtime sessions on two threads.
# Ray Data fuses the decoding into the actors' processes (a task stage before an actor stage with
# the same resources: no pixels through the object store); each call decodes its photos on
# DECODE_THREADS threads, then infers them in batches of --bs. Measured on the 2 cores here, the
# 2,140 Houses photos, Ray's start-up included, taking turns in one run against `predict` (114 and
# 112 photos/s): decoding on 2 threads 88 and 90 photos/s, on the actor's own thread 82 and 85.
# In earlier runs: calls of 160 photos 5-10% faster than calls of 64; two actors of one thread
# each 30% slower; the decoding unfused, in tasks of half a CPU, 10% slower; two calls in flight
# per actor (max_concurrent_calls_per_actor=2) no change beyond the machine's noise.
ACTOR_CPUS, ACTOR_THREADS, CPUS_PER_ACTOR, CALL_PHOTOS, DECODE_THREADS = 1, 2, 2, 256, 2


# Ray's C++ core logs where Python's logging cannot reach it: straight to file descriptor 2. With
# RAY_BACKEND_LOG_LEVEL unset, Ray Data's fused actor gets an error-level note ("has constructor
# arguments in the object store and max_restarts > 0") nobody can act on; set to fatal, that goes,
# but ray.init itself then writes an info line saying it read the variable. That one line is
# dropped at the descriptor (`_without`), the rest of what ray.init writes passed on.
RAY_LEVEL_NOTE = re.compile(r"^\[[^]]*\] logging\.cc:\d+: Set ray log level from environment")


@contextlib.contextmanager
def _without(note: re.Pattern):
    """File descriptor 2 (what C++ libraries write to, past sys.stderr) caught while the block
    runs, then written on without the lines `note` matches."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as caught:
        os.dup2(caught.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            caught.seek(0)
            kept = [line for line in caught.read().decode(errors="replace").splitlines(True)
                    if not note.search(line)]  # fmt: skip
            sys.stderr.write("".join(kept))
            sys.stderr.flush()


def connect(address: str, log=print):
    """Ray, connected: `auto` joins the cluster this machine is part of (`ray start`) or starts
    a local one; else the cluster at ADDRESS (host:port of its head). Returns the ray module."""
    try:
        import ray
    except ImportError:
        raise ReplicateError(
            "--ray needs Ray: pip install 'replicate[ray]' (make install has it)"
        ) from None
    os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "fatal")  # see RAY_LEVEL_NOTE
    if ray.is_initialized():  # joined already: by an earlier part of this job
        return ray
    try:
        with _without(RAY_LEVEL_NOTE):
            ray.init(
                address=None if address == "auto" else address,
                log_to_driver=False,
                logging_level="ERROR",
                configure_logging=True,
            )
    except (ConnectionError, ValueError, RuntimeError) as e:
        raise ReplicateError(
            f"--ray {address}: cannot reach a Ray cluster ({str(e).splitlines()[0][:200]}): "
            "start one with `ray start --head`, or give its head's host:port"
        ) from None
    resources = ray.cluster_resources()
    log(
        f"ray: {len(ray.nodes())} node(s), {int(resources.get('CPU', 0))} CPUs, "
        f"at {ray.get_runtime_context().gcs_address}"
    )
    return ray


def tag(work: Work, job: IndexJob, models: ModelSet, folder: store.IndexFolder, log=print) -> int:
    """Tag `work` on the Ray cluster the job joined (`connect`, before the index was opened) into
    committed parts of `folder`'s current generation; returns the photos tagged."""
    import ray
    from ray import data

    # Ray Data's plan lines and bars (its logger is set up when ray.data is imported): the driver
    # logs each part instead; Ray Data's errors still show.
    data.DataContext.get_current().enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.ERROR)
    geometries = models.subset(work.names).geometries
    cpus = int(ray.cluster_resources().get("CPU", 1))
    # Workers read by absolute path (their working folder is not the driver's); rows keep the path
    # as given, as `predict` writes it.
    files = [os.path.abspath(p) for p in work.photos.path]
    ds = data.from_pandas(work.photos.assign(file=files))
    ds = ds.map_batches(
        decode_batch,
        batch_size=CALL_PHOTOS,
        batch_format="pandas",
        fn_kwargs={"geometries": geometries},
    )
    ds = ds.map_batches(
        TagActor,
        batch_size=CALL_PHOTOS,
        batch_format="numpy",
        compute=data.ActorPoolStrategy(
            min_size=1,
            max_size=max(1, cpus // CPUS_PER_ACTOR),
        ),
        num_cpus=ACTOR_CPUS,
        fn_constructor_kwargs={
            "paths": [str(p.resolve()) for p in models.paths],
            "names": work.names,
            "carried": work.carried,
            "bs": job.bs,
            "features": job.features,
        },
    )
    ds = ds.map_batches(
        write_batch,
        batch_size=job.part_size,
        batch_format="pandas",
        fn_kwargs={"parts_dir": str(folder.parts_dir.resolve()), "generation": folder.generation, "columns": folder.columns},
    )  # fmt: skip
    done = 0
    for part in ds.iter_rows():
        done += int(part["rows"])
        log(f"  part {part['part']}: {part['rows']} photos ({done} of {len(work.photos)})")
    return done


def decode_batch(batch: pd.DataFrame, geometries: list) -> dict:
    """Stage 2: each photo's SHA-256, error and decoded crops (pixels_<k>: N x H x W x 3 uint8 for
    the k-th input geometry; zeros where it did not decode), beside the batch's own columns."""
    geometries = [tuple(g) for g in geometries]
    n = len(batch)
    pixels = [np.zeros((n, g[0], g[0], 3), dtype=np.uint8) for g in geometries]
    errors, hashes = [""] * n, [""] * n
    stream = onnx_models.decoded(
        [Path(f) for f in batch.file], geometries, DECODE_THREADS, hashed=True
    )
    for i, (path, file, (arrays, error, sha)) in enumerate(zip(batch.path, batch.file, stream)):
        errors[i], hashes[i] = error.replace(file, path), sha  # an error names the photo as its row
        for k, g in enumerate(geometries):
            if arrays:
                pixels[k][i] = arrays[g]
    out = {c: batch[c].to_numpy() for c in batch.columns}
    out.update(error=np.array(errors, dtype=object), sha256=np.array(hashes, dtype=object))
    out.update({f"pixels_{k}": p for k, p in enumerate(pixels)})
    return out


class TagActor:
    """Stage 3: the models loaded once per actor (a ModelSet), each batch's photos tagged into
    index rows."""

    def __init__(
        self, paths: list[str], names: list[str] | None, carried: list[str], bs: int, features: bool
    ):
        loaded = ModelSet([Path(p) for p in paths], threads=ACTOR_THREADS)
        self.models = loaded.subset(names)
        self.carried, self.bs, self.features = carried, bs, features

    def __call__(self, batch: dict) -> pd.DataFrame:
        errors = [str(e) for e in batch["error"]]
        geometries = self.models.geometries
        photos = [
            (None if e else {g: batch[f"pixels_{k}"][i] for k, g in enumerate(geometries)},)
            for i, e in enumerate(errors)
        ]
        # in batches of --bs, as without Ray
        probs = [p for p, _ in self.models.tagged(photos, self.bs)]
        facts = pd.DataFrame({c: batch[c] for c in ("path", "size", "mtime_ns", "sha256")})
        tagged = rows(self.models, facts, probs, errors, self.features)
        carried = pd.DataFrame({c: batch[c] for c in self.carried})
        return pd.concat([tagged, carried], axis=1)


def write_batch(batch: pd.DataFrame, parts_dir: str, generation: int, columns: list[str]):
    """Stage 4: the batch committed as one part (its `columns` in order); returns its name and
    row count."""
    part = store.write_part(Path(parts_dir), batch.reindex(columns=columns), generation)
    return pd.DataFrame({"part": [part.name], "rows": [len(batch)]})
