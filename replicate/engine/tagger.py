"""Photos in memory -> tags, with `predict`'s engine: what `replicate serve` answers with.

    python -c "from replicate import tagger; t = tagger.Tagger(['exports/tagger']); print(t.describe())"

`Tagger` loads the models once (run folders, .onnx files or bundles, as `predict.load_models`
does), and tags uploaded bytes the way `predict` tags files: the one photo pipeline
(`photos.decode`: EXIF orientation, the draft-mode rule, each model's validation crop), one body
pass for the models that share a body (`onnx_engine.sharing`), each two-class run's search filter
at its threshold (`filters.apply`) and, per listing, the listing rule (`filters.by_listing`), so an
answer carries the numbers `predict` writes for the same file.

Before anything is decoded, `inspect` checks an upload's first bytes against the allowed image
formats and its header's pixel count, so a 1 MB PNG that claims 20,000 x 20,000 px is refused in
milliseconds without its pixels ever being allocated.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from . import filters, onnx_engine, photos, predict
from .folders import sha256_file

# Magic bytes of the formats the server takes. A table of our own: Pillow has no way to name a
# format without starting to parse it, and the check must come before any parsing.
SIGNATURES = {
    "JPEG": (b"\xff\xd8\xff",),
    "PNG": (b"\x89PNG\r\n\x1a\n",),
    "GIF": (b"GIF87a", b"GIF89a"),
    "BMP": (b"BM",),
    "TIFF": (b"II*\x00", b"MM\x00*"),
}
FORMATS = "JPEG, PNG, WebP, GIF, BMP, TIFF"
ROTATED = {5, 6, 7, 8}  # EXIF orientations that swap width and height
CHECKSUM = "_model_sha256"  # an index row's column of the SHA-256 of the model that tagged it


class Refused(Exception):
    """An upload the server does not tag: `status` (415, 422) and a one-line reason."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def image_format(data: bytes) -> str | None:
    """The allowed format `data` starts as, by its magic bytes; None for anything else."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return next((f for f, sigs in SIGNATURES.items() if data.startswith(sigs)), None)


def inspect(data: bytes, max_pixels: int) -> tuple[str, int, int]:
    """(format, width, height upright) from the header alone; Refused(415) for a format not on
    the allow list, Refused(422) for a header that does not parse or claims over `max_pixels`."""
    fmt = image_format(data)
    if fmt is None:
        raise Refused(415, f"not an image this server takes ({FORMATS}), judged by its first bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:  # the header only: nothing is decoded
                width, height = im.size
                orientation = im.getexif().get(0x0112, 1) if fmt in ("JPEG", "TIFF", "WEBP") else 1
    except Image.DecompressionBombError:
        raise Refused(422, f"the photo's header claims over {max_pixels:,} pixels") from None
    except Exception as e:  # PIL raises many types for broken headers
        raise Refused(422, f"the photo does not decode: {type(e).__name__}: {e}") from None
    if width * height > max_pixels:
        raise Refused(422, f"the photo is {width} x {height} px, over --max-pixels {max_pixels:,}")
    return fmt, *((height, width) if orientation in ROTATED else (width, height))


class Tagger:
    """A set of models loaded once: `prepare` decodes an upload, `infer` tags a batch of decoded
    photos, `answer` turns one photo's probabilities into its JSON, `listing` a listing's."""

    def __init__(
        self,
        paths: list[Path],
        max_pixels: int = 50_000_000,
        names: list[str] | None = None,
        threads: int = 0,
    ):
        """`names`: only these of the models (as `predict` names them among all of `paths`);
        `threads`: each ONNX Runtime session's (0: one per core)."""
        self.paths = [Path(p) for p in paths]
        self.max_pixels = max_pixels
        self.models = predict.load_models(self.paths, "onnx", "cpu", threads)
        if names is not None:
            self.models = [m for m in self.models if m.name in names]
        self.groups = onnx_engine.sharing(self.models)
        self.geometries = list(dict.fromkeys(m.prep.geometry for m in self.models))
        self.filters = filters.of_models(self.models)
        files = {
            p: sha256_file(p) for p in dict.fromkeys(m.path for m in self.models)
        }  # a bundle: once
        self.checksums = {m.name: files[m.path] for m in self.models}
        self.warnings = [m.warning for m in self.models if m.warning]

    def prepare(self, data: bytes) -> dict:
        """An upload -> {sha256, format, width, height, arrays} (the decoded crops, one per input
        geometry); Refused for what `inspect` refuses and for pixels that do not decode. Runs in
        the server's decoding threads (Pillow releases the GIL while it decodes)."""
        fmt, width, height = inspect(data, self.max_pixels)
        arrays, error = photos.decode(io.BytesIO(data), self.geometries)
        if error:
            raise Refused(422, f"the photo does not decode: {error}")
        digest = hashlib.sha256(data).hexdigest()
        return {"sha256": digest, "format": fmt, "width": width, "height": height, "arrays": arrays}

    def infer(self, batch: list[dict]) -> list[dict[str, np.ndarray]]:
        """Each photo's probabilities per model ({name: classes}) for a batch of `prepare`d photos:
        one body pass per group of models sharing a body, as `predict` runs them."""
        return onnx_engine.batch_probabilities(self.groups, [p["arrays"] for p in batch])

    def table(
        self, probs: list[dict[str, np.ndarray]], names: list[str], errors: list[str] | None = None
    ) -> pd.DataFrame:
        """`predict`'s photo table for photos' probabilities (one row each, named `names`), the
        search filters applied; a photo without probabilities (None) is a row with an error
        (`errors`: each photo's, e.g. why it did not decode)."""
        n = len(probs)
        arrays = {
            m.name: np.full((n, len(m.classes)), np.nan, dtype=np.float32) for m in self.models
        }
        for i, p in enumerate(probs):
            for name, values in (p or {}).items():
                arrays[name][i] = values
        if errors is None:
            errors = ["" if p else "not tagged" for p in probs]
        table = onnx_engine.probability_table(self.models, names, errors, arrays)
        return filters.apply(table, self.filters)

    def index_rows(
        self, facts: pd.DataFrame, probs: list[dict[str, np.ndarray] | None], errors: list[str]
    ) -> pd.DataFrame:
        """An index's rows (`replicate index`) for photos: `facts` (path, size, mtime_ns, sha256),
        `predict`'s columns for each of them, and each model's checksum."""
        table = self.table(probs, list(facts.path), errors)
        checksums = {f"{name}{CHECKSUM}": sha for name, sha in self.checksums.items()}
        facts = facts.reset_index(drop=True)[["path", "size", "mtime_ns", "sha256"]]
        return pd.concat([facts, table.drop(columns="path")], axis=1).assign(**checksums)

    def column_names(self, names: list[str] | None = None) -> list[str]:
        """The columns of `index_rows` after the photo's facts and error, in their order (those of
        the models `names`; None: all): `predict`'s, then the checksums."""
        mine = [m for m in self.models if names is None or m.name in names]
        empty = {m.name: np.full((1, len(m.classes)), np.nan, np.float32) for m in mine}
        table = onnx_engine.probability_table(mine, ["-"], [""], empty)
        table = filters.apply(
            table, {m.name: self.filters[m.name] for m in mine if m.name in self.filters}
        )
        predicted = [c for c in table.columns if c not in ("path", "error")]
        return predicted + [f"{m.name}{CHECKSUM}" for m in mine]

    def answer(self, probs: dict[str, np.ndarray]) -> dict:
        """One photo's tags from its probabilities (`infer`): per model its class (the argmax, as
        `predict`'s <name>_predicted), probabilities and, for a search filter, has_<attribute>
        (p_<positive> at or above the threshold, `filters.apply`'s rule) with the threshold used.
        Without a table: a request's answer should not pay for pandas."""
        models = {}
        for m in self.models:
            p = probs[m.name]
            tags = {
                "class": m.classes[int(p.argmax())],
                "probabilities": dict(zip(m.classes, p.tolist())),
            }
            found = self.filters.get(m.name)
            if found:
                positive = float(p[m.classes.index(found["positive"])])
                tags[found["column"]] = positive >= found["threshold"]
                tags["threshold"] = found["threshold"]
            models[m.name] = tags
        return models

    def listing(self, table: pd.DataFrame, listing_id: str, threshold: float = 0.5) -> dict:
        """The listing's row of `predict`'s tags_listings table, from its tagged photos: per model
        and class the highest probability and has_<model>_<class> (above `threshold`), and for
        each search filter whether any photo passes it (the listing rule)."""
        ok = table[table.error == ""]
        if ok.empty:
            return {"photos": 0}
        ids = pd.Series([listing_id] * len(ok), index=ok.index)
        row = filters.by_listing(ok, ids, threshold, self.filters).iloc[0].to_dict()
        row.pop("listing")
        return {k: (v.item() if hasattr(v, "item") else v) for k, v in row.items()}

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
        """Tag one made-up photo, so the first real request does not pay ONNX Runtime's first-run
        costs, and a model that cannot run is found before the server says it is ready."""
        gradient = np.linspace(0, 255, 320 * 240 * 3).astype(np.uint8).reshape(240, 320, 3)
        buffer = io.BytesIO()
        Image.fromarray(gradient).save(buffer, "JPEG")
        self.infer([self.prepare(buffer.getvalue())])
