"""The deltas table: its columns, one row of it, and reading it back.

One schema for every producer and reader: :func:`~wdanalysis.compare` (``deltas.csv``),
live tracking (``tracking.csv``), the statistics and the plots. Long format, one row per
(run, step, weight); ``step`` and ``layer`` are nullable integers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from wdanalysis.errors import WDAnalysisError
from wdanalysis.weights.identity import IDENTITY_COLUMNS

__all__ = [
    "COLUMNS",
    "IDENTITY_COLUMNS",
    "NAME_COLUMN",
    "REQUIRED_COLUMNS",
    "SCHEMA_VERSION",
    "as_text",
    "deltas_row",
    "identity_columns",
    "name_column",
    "name_columns",
    "read_table",
    "upgrade_table",
    "validate_deltas",
    "with_y",
]

#: 2: ``component`` and ``attention`` beside ``stack`` (which no longer holds "cross"),
#: ``rows_added``. Tables of version 1 lack them and read as if they were empty / 0.
#: 3: ``label`` beside ``method``: ``method`` is always the inferred one (FT, LoRA, DoRA,
#: …), ``label`` the display name (``--labels``, the keys of a ``{label: path}`` dict; else
#: the method). Older tables held the display name in ``method``: it is read as the label.
#: 4: ``decay_shrink`` and ``delta_m_learned`` (issue 36); older tables read them as empty.
SCHEMA_VERSION = 4

COLUMNS = [
    "method",
    "label",
    "run",
    "step",
    "layer",
    "module",
    "parameter",
    "component",
    "stack",
    "attention",
    "axis",
    "delta_m",
    "delta_d",
    "decay_shrink",
    "delta_m_learned",
    "n_vectors",
    "zero_norm_vectors",
    "rows_added",
    "checkpoint",
]
# Added in schema version 2, with the value an older table means.
_ADDED_IN_2 = {"component": "", "attention": "", "rows_added": 0}
#: The column figures, fits and printed tables name a run by (its display name).
NAME_COLUMN = "label"
_ADDED_IN_4 = {"decay_shrink": math.nan, "delta_m_learned": math.nan}
#: Columns every statistic needs; the rest of the deltas table is carried along unused.
REQUIRED_COLUMNS: tuple[str, ...] = (
    "method",
    "run",
    "step",
    "layer",
    "module",
    "delta_m",
    "delta_d",
)


def deltas_row(
    method: str,
    run: str,
    step,
    name,
    axis: str,
    change,
    checkpoint: str = "",
    rows_added: int = 0,
    label: str | None = None,
    decay_shrink: float | None = None,
) -> dict:
    """One row of the deltas table (``COLUMNS``); shared by ``compare`` and live tracking.

    ``method``: the inferred one; ``label``: the display name (default: the method).
    ``rows_added``: rows of the checkpoint's matrix beyond the base's (a vocabulary resized
    for added tokens), left out of ΔM/ΔD. ``decay_shrink``: the weight decay's factor ``S``
    on the weight's norms (None: unknown, NaN in the table); ``change.delta_m_learned`` is
    ``mean_n |m_t[n] − S·m_0[n]|``.
    """
    return {
        "method": method,
        "label": method if label is None else label,
        "run": run,
        "step": step,
        "layer": name.layer,
        "module": name.module,
        "parameter": name.parameter,
        "component": getattr(name, "component", ""),
        "stack": name.stack,
        "attention": getattr(name, "attention", ""),
        "axis": axis,
        "delta_m": change.delta_m,
        "delta_d": change.delta_d,
        "decay_shrink": math.nan if decay_shrink is None else float(decay_shrink),
        "delta_m_learned": getattr(change, "delta_m_learned", math.nan),
        "n_vectors": change.n_vectors,
        "zero_norm_vectors": change.zero_norm_vectors,
        "rows_added": rows_added,
        "checkpoint": checkpoint,
    }


def upgrade_table(table: pd.DataFrame) -> pd.DataFrame:
    """A table of an older schema with the columns added since, as an older table means
    them (no component, no attention kind, no added rows; its ``method`` held the display
    name, so that is the ``label``)."""
    added = _ADDED_IN_2 | _ADDED_IN_4
    missing = {c: v for c, v in added.items() if c not in table.columns}
    if NAME_COLUMN not in table.columns and "method" in table.columns:
        at = list(table.columns).index("method") + 1
        table = table.copy()
        table.insert(at, NAME_COLUMN, table["method"])
    return table.assign(**missing) if missing else table


def name_column(table: pd.DataFrame) -> str:
    """The column that names a run for display: ``label``, or ``method`` in a table (or a
    fits table) of an older schema that has no label."""
    return NAME_COLUMN if NAME_COLUMN in table.columns else "method"


def name_columns(table: pd.DataFrame) -> list[str]:
    """``method`` and, where the table has it, ``label``: what fits carry per run."""
    return ["method", NAME_COLUMN] if NAME_COLUMN in table.columns else ["method"]


def as_text(column: pd.Series) -> pd.Series:
    """An identity column as strings, an empty cell (NaN once read back from CSV) as ""."""
    return column.astype(object).where(column.notna(), "").astype(str)


def identity_columns(deltas: pd.DataFrame, pool: bool = False) -> list[str]:
    """The identity columns (``IDENTITY_COLUMNS``) that tell this table's matrices apart
    (more than one value): what fits and figures group by besides run and module, unless
    ``pool`` asks for one cloud of points per run and module (the paper's Figure 2). A
    column with one value (BERT's ``stack`` is always ``encoder``) would not split a group."""
    if pool:
        return []
    return [c for c in IDENTITY_COLUMNS if c in deltas.columns and as_text(deltas[c]).nunique() > 1]


def validate_deltas(deltas: pd.DataFrame, required: Sequence[str] = REQUIRED_COLUMNS) -> None:
    """Fail early, with the fix in the message, on a table that is not a deltas table.

    Checking at the boundary turns a ``KeyError: 'delta_d'`` deep inside pandas into one
    line the CLI can print.
    """
    if not isinstance(deltas, pd.DataFrame):
        raise TypeError(
            f"expected a pandas DataFrame of deltas (from wdanalysis.compare), "
            f"got {type(deltas).__name__}"
        )
    missing = [column for column in required if column not in deltas.columns]
    if missing:
        raise WDAnalysisError(
            f"the deltas table lacks column(s) {', '.join(missing)}; "
            f"it has {', '.join(map(str, deltas.columns)) or 'no columns'}",
            hint="pass the table produced by wdanalysis.compare (or its deltas.csv)",
        )
    if deltas.empty:
        raise WDAnalysisError(
            "the deltas table is empty: there is nothing to fit or plot",
            hint="check that the checkpoints hold the selected weight matrices",
        )
    for column in ("delta_m", "delta_d"):
        if not pd.api.types.is_numeric_dtype(deltas[column]):
            raise WDAnalysisError(
                f"column {column} must be numeric, found dtype {deltas[column].dtype}",
                hint="read deltas.csv with pandas.read_csv, which parses numbers",
            )


#: What fits and figures may put on the y axis: ΔM, or ΔM less the weight decay's shrinkage.
Y_COLUMNS = ("delta_m", "delta_m_learned")


def with_y(deltas: pd.DataFrame, y: str = "delta_m") -> pd.DataFrame:
    """The table with ``y`` in the ``delta_m`` column, which every fit and figure reads
    (``y="delta_m_learned"``: Figure 2 with the decay taken out; rows where it is unknown
    are NaN and dropped, with a warning, like any undefined point)."""
    if y not in Y_COLUMNS:
        raise WDAnalysisError(f"y must be one of {', '.join(Y_COLUMNS)}, got {y!r}")
    if y == "delta_m":
        return deltas
    if y not in deltas.columns or not pd.to_numeric(deltas[y], errors="coerce").notna().any():
        raise WDAnalysisError(
            f"the table has no known {y}",
            hint="the runs' weight decay is unknown: compare them with --weight-decay or "
            "--decay-shrink, or train with wdanalysis train (it records the shrink factor)",
        )
    return deltas.assign(delta_m=pd.to_numeric(deltas[y], errors="coerce"))


def read_table(path: str | Path) -> pd.DataFrame:
    """A deltas table (``deltas.csv``) or a live tracking table (``tracking.csv``).

    Both have the same columns; ``step`` and ``layer`` come back as nullable integers, as
    :func:`wdanalysis.compare` returns them, so every figure and fit treats them alike.
    """
    path = Path(path)
    try:
        table = pd.read_csv(path)
    except FileNotFoundError:
        raise WDAnalysisError("no such file", path, "pass a deltas.csv or tracking.csv") from None
    except (ValueError, UnicodeDecodeError, pd.errors.ParserError) as error:
        raise WDAnalysisError(
            f"cannot read the table: {' '.join(str(error).split())}",
            path,
            "pass a deltas.csv or tracking.csv written by wdanalysis",
        ) from None
    try:
        validate_deltas(table)
    except WDAnalysisError as error:
        raise WDAnalysisError(error.problem, path, error.hint) from None
    for column in ("step", "layer"):
        if column in table:
            table[column] = pd.to_numeric(table[column], errors="coerce").astype("Int64")
    table = upgrade_table(table)
    for column in IDENTITY_COLUMNS:  # empty cells come back as NaN: keep them empty strings
        if column in table:
            table[column] = as_text(table[column])
    return table
