"""benchmarks/results.csv, the one table every benchmark appends its measured rows to."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

RESULTS = Path(__file__).with_name("results.csv")


def append(rows: list[dict] | pd.DataFrame) -> Path:
    """Add `rows` below the rows already there (columns the table lacks are added, left empty
    in the older rows); returns the file."""
    table = pd.DataFrame(rows)
    if RESULTS.is_file():
        table = pd.concat([pd.read_csv(RESULTS), table], ignore_index=True)
    table.to_csv(RESULTS, index=False)
    return RESULTS
