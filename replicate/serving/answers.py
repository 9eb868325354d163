"""A tagged photo or listing -> the server's JSON answer, with the numbers `predict` writes.

    python -c "from replicate.serving import answers; help(answers.photo)"

Built without a table for one photo (a request's answer should not pay for pandas); a listing's
comes from `predict`'s listing table (`filters.by_listing`), so it follows the listing rule.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from ..engine import filters
from ..engine.model_set import ModelSet


def photo(models: ModelSet, probs: dict[str, np.ndarray]) -> dict:
    """One photo's tags from its probabilities (`ModelSet.infer`): per model its `class` (its one
    answer, as `predict`'s <name>_predicted: the argmax, or for a search filter the filter's
    answer) and probabilities, and for a search filter has_<attribute> (`filters.passes`, the same
    answer as a flag) with the threshold used."""
    out = {}
    for m in models.models:
        p = probs[m.name]
        tags = {"class": m.classes[int(p.argmax())]}
        found = models.filters.get(m.name)
        if found:
            flag = bool(filters.passes(found, float(p[m.classes.index(found["positive"])])))
            tags = {"class": filters.answer(found, flag), found["column"]: flag}
            tags["threshold"] = found["threshold"]
        out[m.name] = {**tags, "probabilities": dict(zip(m.classes, p.tolist()))}
    return out


def listing(models: ModelSet, table: pd.DataFrame, listing_id: str) -> dict:
    """The listing's row of `predict`'s tags_listings table (`filters.by_listing`: the listing
    rule) from its photos' rows (`table`, the unreadable ones included): photos, unreadable and
    unreadable_photos (a list), error, and per model its answers and best scores; answers null
    when no photo could be read."""
    ids = pd.Series([listing_id] * len(table), index=table.index)
    row = filters.by_listing(table, ids, models.classes, models.filters).iloc[0].to_dict()
    row.pop("listing")
    row["unreadable_photos"] = [p for p in row["unreadable_photos"].split("; ") if p]
    return {k: _plain(v) for k, v in row.items()}


def _plain(value):
    """A JSON value: numpy scalars as Python's, NaN and pandas' NA as null."""
    if isinstance(value, list):
        return value
    return None if pd.isna(value) else value.item() if hasattr(value, "item") else value
