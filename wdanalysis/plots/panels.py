"""The rows and panels of the report's pages, as arrays: which (module, kind) each row of
panels shows and which table rows each panel holds. No matplotlib here: index.html's
heatmap tables use these too, in a process whose figures workers draw.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from wdanalysis.table.schema import IDENTITY_COLUMNS, as_text

__all__ = ["overview_rows", "row_panels"]


def overview_rows(data: pd.DataFrame, pool: bool = False) -> list[tuple[str, dict]]:
    """(module, kind) per row of panels, in table order: per module, :func:`kinds_of` its
    rows (the identity columns are read as text once for the whole table)."""
    modules = data["module"].astype(str).to_numpy()
    columns = [] if pool else [c for c in IDENTITY_COLUMNS if c in data.columns]
    texts = {c: as_text(data[c]).to_numpy() for c in columns}
    rows = []
    for module in dict.fromkeys(modules):
        at = modules == module
        differ = [c for c in columns if len(set(texts[c][at])) > 1]
        kinds = dict.fromkeys(zip(*(texts[c][at] for c in differ), strict=True))
        rows += [(module, dict(zip(differ, kind, strict=True))) for kind in kinds] or [(module, {})]
    return rows


def row_panels(data: pd.DataFrame, rows: list, order: list, arrays: dict) -> dict:
    """(row, run) → the panel's slice of each of ``arrays`` (one pass over pandas; ``data``
    indexed 0..n-1, as the arrays)."""
    runs = data["run"].to_numpy(str)
    modules = data["module"].astype(str).to_numpy()
    columns = dict.fromkeys(c for _, kind in rows for c in kind)
    texts = {c: as_text(data[c]).to_numpy() for c in columns}
    panels = {}
    for r, (module, kind) in enumerate(rows):
        mine = modules == module
        for column, value in kind.items():
            mine &= texts[column] == value
        positions = np.flatnonzero(mine)
        for run in order:
            at = positions[runs[positions] == run]
            panels[r, run] = {key: value[at] for key, value in arrays.items()}
    return panels
