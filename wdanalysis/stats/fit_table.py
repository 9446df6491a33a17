"""The pooled fits as an aligned text table for the terminal (``compare`` prints it).

Beside each pooled slope and r stands its 95 % layer-bootstrap interval (whole layers
resampled, the design-valid interval), and beside the pooled r the within-step r.
Undefined values print as — with the reason in a note; "sign held" says at how many steps
the slope has the pooled sign, the paper's claim being about that sign. The table ends
with a one-line legend (:func:`fit_table_legend`).
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from wdanalysis.errors import WDAnalysisError
from wdanalysis.table.schema import IDENTITY_COLUMNS, name_column

__all__ = ["fit_table_legend", "format_fit_table", "sign_held", "signs_held"]


def _fmt(value: float, spec: str) -> str:
    if value is None or value is pd.NA or not np.isfinite(value):
        return "—"
    return format(value, spec).replace("-", "−")


def _text(value) -> str:
    """A key cell; an empty identity read back from CSV (NaN) prints as —."""
    empty = value is None or value == "" or (isinstance(value, float) and math.isnan(value))
    return "—" if empty else str(value)


def signs_held(fits: pd.DataFrame, keys: list[str]) -> dict:
    """``sign_held`` of every pooled row, by its index: the key columns are read once
    (one pass over the table, not one per row)."""

    def key_of(frame: pd.DataFrame) -> list[tuple]:
        columns = [frame[key].astype(str) for key in keys]
        return list(zip(*columns, strict=True)) if columns else [()] * len(frame)

    scope = fits["scope"].to_numpy()
    steps = fits.loc[scope == "step"]
    slopes = steps["slope"].to_numpy(dtype=float)
    by_key: dict[tuple, list[float]] = {}
    for key, slope in zip(key_of(steps), slopes, strict=True):
        if np.isfinite(slope):
            by_key.setdefault(key, []).append(slope)
    pooled = fits.loc[scope == "pooled"]
    out = {}
    for index, key, slope in zip(
        pooled.index,
        key_of(pooled),
        pooled["slope"].to_numpy(float),
        strict=True,
    ):
        mine = np.asarray(by_key.get(key, []))
        if len(mine) == 0 or not np.isfinite(slope):
            out[index] = "—"
        else:
            out[index] = f"{int((np.sign(mine) == np.sign(slope)).sum())}/{len(mine)}"
    return out


def sign_held(fits: pd.DataFrame, pooled: pd.Series, keys: list[str]) -> str:
    """'4/5' = the slope has the pooled slope's sign at 4 of the 5 steps with a fit."""
    same = fits["scope"].to_numpy() == "step"  # one mask, no filtered copy of the table
    for key in keys:
        same &= fits[key].astype(str).to_numpy() == str(pooled[key])
    slopes = fits["slope"].to_numpy(dtype=float)[same]
    slopes = slopes[np.isfinite(slopes)]
    if len(slopes) == 0 or not np.isfinite(pooled["slope"]):
        return "—"
    agree = int((np.sign(slopes) == np.sign(pooled["slope"])).sum())
    return f"{agree}/{len(slopes)}"


def _interval(row: pd.Series, stem: str, spec: str) -> str:
    low, high = row.get(f"{stem}_boot_low", math.nan), row.get(f"{stem}_boot_high", math.nan)
    if not (np.isfinite(low) and np.isfinite(high)):
        return "—"
    return f"[{_fmt(low, spec)}, {_fmt(high, spec)}]"


def _setting(fits: pd.DataFrame, column: str, default):
    """One value of a per-row setting (n_boot, boot_seed, y) for the legend."""
    if column not in fits.columns or fits[column].dropna().empty:
        return default
    return fits[column].dropna().iloc[0]


def fit_table_legend(fits: pd.DataFrame) -> str:
    """The one-line legend printed under :func:`format_fit_table`'s table."""
    n_boot, seed = int(_setting(fits, "n_boot", 0)), _setting(fits, "boot_seed", 0)
    y = str(_setting(fits, "y", "delta_m"))
    what = "ΔM" if y == "delta_m" else y
    interval = (
        f"[95% CI] layer bootstrap ({n_boot} whole-layer resamples, seed {seed})"
        if n_boot
        else "no layer bootstrap (n_boot=0)"
    )
    return (
        f"legend: slope, r of {what} on ΔD pooled over layers × steps; {interval}; "
        "within r: r within each step; ρ: Spearman; sign held: steps with the pooled "
        "slope's sign — docs/guides/reading-results.md"
    )


def format_fit_table(fits: pd.DataFrame) -> str:
    """A compact, aligned text table of the pooled fits, for the terminal.

    Columns: method, run, module (and the kinds of matrix), n, slope with its 95 %
    layer-bootstrap interval, r with its interval, the within-step r, Spearman's ρ and,
    when per-step fits are present, at how many steps the slope has the pooled sign;
    undefined values print as — and the reason follows in a note. The last line is the
    legend.
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
    header = [*keys, "n", "slope", "[95% CI]", "r", "[95% CI]", "within r", "ρ"]
    if has_steps:
        header.append("sign held")
    lines, held = [], signs_held(fits, keys) if has_steps else {}
    for index, row in pooled.iterrows():
        cells = [_text(row[key]) for key in keys]
        cells += [
            str(int(row["n"])),
            _fmt(row["slope"], "#.3g"),
            _interval(row, "slope", "#.3g"),
            _fmt(row["pearson_r"], "+.2f"),
            _interval(row, "pearson_r", "+.2f"),
            _fmt(row.get("within_step_r", math.nan), "+.2f"),
            _fmt(row.get("spearman_rho", math.nan), "+.2f"),
        ]
        if has_steps:
            cells.append(held[index])
        note = row.get("note")
        if isinstance(note, str) and note:  # NaN when the fits were read back from CSV
            cells.append(f"  ({note})")
        lines.append(cells)
    return _align([header, *lines], numeric_from=len(keys)) + "\n" + fit_table_legend(fits)


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
