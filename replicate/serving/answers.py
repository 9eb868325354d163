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
    """One photo's tags from its probabilities (`ModelSet.infer`): per model its class (the argmax,
    as `predict`'s <name>_predicted), probabilities and, for a search filter, has_<attribute>
    (`filters.passes`) with the threshold used."""
    out = {}
    for m in models.models:
        p = probs[m.name]
        tags = {
            "class": m.classes[int(p.argmax())],
            "probabilities": dict(zip(m.classes, p.tolist())),
        }
        found = models.filters.get(m.name)
        if found:
            tags[found["column"]] = bool(
                filters.passes(found, float(p[m.classes.index(found["positive"])]))
            )
            tags["threshold"] = found["threshold"]
        out[m.name] = tags
    return out


def listing(models: ModelSet, table: pd.DataFrame, listing_id: str, threshold: float = 0.5) -> dict:
    """The listing's row of `predict`'s tags_listings table, from its tagged photos (`table`): per
    model and class the highest probability and has_<model>_<class> (above `threshold`), and for
    each search filter whether any photo passes it (the listing rule)."""
    ok = table[table.error == ""]
    if ok.empty:
        return {"photos": 0}
    ids = pd.Series([listing_id] * len(ok), index=ok.index)
    row = filters.by_listing(ok, ids, threshold, models.filters).iloc[0].to_dict()
    row.pop("listing")
    return {k: (v.item() if hasattr(v, "item") else v) for k, v in row.items()}
