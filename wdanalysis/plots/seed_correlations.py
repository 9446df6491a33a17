"""Per-seed correlations beside Figure 2: is a sign a property of the regime or of one seed?"""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from wdanalysis.errors import WDAnalysisError
from wdanalysis.plots.figures import PAPER_ORDER
from wdanalysis.stats.resampling import across_seed_summary
from wdanalysis.table.schema import identity_columns

__all__ = ["plot_seed_correlations"]

PAPER_R = {"FT": -0.62, "LoRA": +0.83, "DoRA": -0.31}  # VL-BART query, DoRA paper Fig. 2


def plot_seed_correlations(
    per_seed: pd.DataFrame,
    module: str,
    value: str = "pearson_r",
    ax: Axes | None = None,
) -> Figure:
    """One column per method: each seed's r (dots), the across-seed mean with its 95 %
    Student-t interval (bar), and the paper's r (star) for reference.

    ``per_seed`` has columns method, module, seed and ``value`` (e.g. from ``seeds.csv``).
    """
    rows = per_seed.loc[per_seed["module"].astype(str) == str(module)]
    if rows.empty:
        raise WDAnalysisError(f"no per-seed rows for module {module!r}")
    kinds = identity_columns(rows)
    if kinds:  # one column per method: one kind of matrix, never several pooled
        raise WDAnalysisError(
            f"the per-seed rows of {module!r} hold several kinds of matrices "
            f"({', '.join(kinds)} differ)",
            hint="pass the rows of one kind (e.g. per_seed[per_seed.attention == 'self'])",
        )
    methods = [m for m in PAPER_ORDER if m in set(rows["method"])]
    methods += [m for m in dict.fromkeys(rows["method"]) if m not in methods]
    if ax is None:
        figure = Figure(figsize=(1.6 + 1.3 * len(methods), 3.6), layout="constrained")
        ax = figure.add_subplot()
    else:
        figure = ax.figure
    summary = across_seed_summary(rows, value).set_index("method")
    for i, method in enumerate(methods):
        values = rows.loc[rows["method"] == method, value].to_numpy(np.float64)
        jitter = np.linspace(-0.12, 0.12, len(values)) if len(values) > 1 else np.zeros(1)
        ax.scatter(i + jitter, values, s=22, color=f"C{i}", alpha=0.8, zorder=3)
        mean = summary.loc[method, f"{value}_mean"]
        low, high = summary.loc[method, f"{value}_ci_low"], summary.loc[method, f"{value}_ci_high"]
        if np.isfinite(low):
            ax.errorbar(
                i + 0.3,
                mean,
                yerr=[[mean - low], [high - mean]],
                fmt="o",
                color="k",
                capsize=4,
                ms=4,
                zorder=4,
            )
        if method in PAPER_R:
            ax.scatter(i + 0.3, PAPER_R[method], marker="*", s=90, color="0.5", zorder=2)
    ax.axhline(0, color="0.6", lw=0.8)
    ax.set_xticks(range(len(methods)), methods)
    ax.set_xlim(-0.6, len(methods) - 0.2)
    ax.set_ylim(-1.05, 1.05)
    label = {"pearson_r": "pooled Pearson r", "within_step_r": "within-step r"}.get(value, value)
    ax.set_ylabel(f"{label} of ΔM on ΔD")
    n = int(rows["seed"].nunique()) if "seed" in rows.columns else len(rows)
    ax.set_title(f"{module}: {n} seeds (dots), mean ± 95 % CI (bar), paper (★)", fontsize=9)
    return figure
