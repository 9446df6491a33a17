"""The pooled fits as an aligned text table for the terminal (``compare`` prints it).

Undefined values print as — with the reason in a note; "sign held" says at how many steps
the slope has the pooled sign, the paper's claim being about that sign.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from wdanalysis.errors import WDAnalysisError
from wdanalysis.table.schema import IDENTITY_COLUMNS, name_column

__all__ = ["format_fit_table"]


def _fmt(value: float, spec: str) -> str:
    if value is None or value is pd.NA or not np.isfinite(value):
        return "—"
    return format(value, spec).replace("-", "−")


def _text(value) -> str:
    """A key cell; an empty identity read back from CSV (NaN) prints as —."""
    empty = value is None or value == "" or (isinstance(value, float) and math.isnan(value))
    return "—" if empty else str(value)


def _sign_consistency(fits: pd.DataFrame, pooled: pd.Series, keys: list[str]) -> str:
    """'4/5' = the slope has the pooled slope's sign at 4 of the 5 steps with a fit."""
    steps = fits.loc[fits["scope"] == "step"]
    for key in keys:
        steps = steps.loc[steps[key].astype(str) == str(pooled[key])]
    slopes = steps["slope"].to_numpy(dtype=float)
    slopes = slopes[np.isfinite(slopes)]
    if len(slopes) == 0 or not np.isfinite(pooled["slope"]):
        return "—"
    agree = int((np.sign(slopes) == np.sign(pooled["slope"])).sum())
    return f"{agree}/{len(slopes)}"


def format_fit_table(fits: pd.DataFrame) -> str:
    """A compact, aligned text table of the pooled fits, for the terminal.

    Columns: method, run, module, n, slope, r, ρ, r's 95% CI and, when per-step fits are
    present, at how many steps the slope has the pooled sign; undefined values print as —
    and the reason follows in a note.
    """
    validate_deltas_like = [c for c in ("scope", "n", "slope", "pearson_r") if c not in fits]
    if validate_deltas_like:
        raise WDAnalysisError(
            f"not a fits table (missing {', '.join(validate_deltas_like)})",
            hint="pass the output of wdanalysis.stats.fit_lines",
        )
    pooled = fits.loc[fits["scope"] == "pooled"]
    keys = [c for c in (name_column(fits), "run", "module", *IDENTITY_COLUMNS) if c in fits]
    has_steps = bool((fits["scope"] == "step").any())
    header = [*keys, "n", "slope", "r", "ρ", "95% CI of r"]
    if has_steps:
        header.append("sign held")
    lines = []
    for _, row in pooled.iterrows():
        cells = [_text(row[key]) for key in keys]
        ci = f"[{_fmt(row['pearson_ci_low'], '.2f')}, {_fmt(row['pearson_ci_high'], '.2f')}]"
        cells += [
            str(int(row["n"])),
            _fmt(row["slope"], "#.3g"),
            _fmt(row["pearson_r"], "+.2f"),
            _fmt(row.get("spearman_rho", math.nan), "+.2f"),
            ci if np.isfinite(row["pearson_ci_low"]) else "—",
        ]
        if has_steps:
            cells.append(_sign_consistency(fits, row, keys))
        note = row.get("note")
        if isinstance(note, str) and note:  # NaN when the fits were read back from CSV
            cells.append(f"  ({note})")
        lines.append(cells)
    return _align([header, *lines], numeric_from=len(keys))


def _align(rows: list[list[str]], numeric_from: int) -> str:
    """Left-align text columns, right-align numeric ones; a trailing note is left as is."""
    width = max(len(r) for r in rows[:1])
    widths = [max(len(r[i]) for r in rows if i < len(r)) for i in range(width)]
    out = []
    for row in rows:
        cells = [
            cell.ljust(widths[i]) if i < numeric_from else cell.rjust(widths[i])
            for i, cell in enumerate(row[:width])
        ]
        out.append(("  ".join(cells) + "".join(row[width:])).rstrip())
    return "\n".join(out)
