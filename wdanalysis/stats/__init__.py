"""Statistics of the ΔM–ΔD relation: line fits, correlations with layer-bootstrap
intervals and the within-step r, and the resampling that respects layers × steps. May
import the table schema and errors."""

from __future__ import annotations

from wdanalysis.stats.fit_table import fit_table_legend, format_fit_table
from wdanalysis.stats.fits import (
    BOOT_SEED,
    CONFIDENCE,
    FIT_COLUMNS,
    IID_COLUMNS,
    MODULE_ALIASES,
    N_BOOT,
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
    "BOOT_SEED",
    "CONFIDENCE",
    "FIT_COLUMNS",
    "IID_COLUMNS",
    "MODULE_ALIASES",
    "N_BOOT",
    "REQUIRED_COLUMNS",
    "compare_correlations",
    "drop_undefined",
    "fit_groups",
    "fit_lines",
    "fit_one",
    "fit_table_legend",
    "format_fit_table",
    "select_module",
    "validate_deltas",
]
