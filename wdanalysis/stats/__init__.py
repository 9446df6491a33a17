"""Statistics of the ΔM–ΔD relation: line fits, correlations with intervals, and the
resampling that respects layers × steps. May import the table schema and errors."""

from __future__ import annotations

from wdanalysis.stats.fit_table import format_fit_table
from wdanalysis.stats.fits import (
    CONFIDENCE,
    FIT_COLUMNS,
    MODULE_ALIASES,
    REQUIRED_COLUMNS,
    compare_correlations,
    drop_undefined,
    fit_groups,
    fit_lines,
    fit_one,
    select_module,
    validate_deltas,
)

__all__ = [
    "CONFIDENCE",
    "FIT_COLUMNS",
    "MODULE_ALIASES",
    "REQUIRED_COLUMNS",
    "compare_correlations",
    "drop_undefined",
    "fit_groups",
    "fit_lines",
    "fit_one",
    "format_fit_table",
    "select_module",
    "validate_deltas",
]
