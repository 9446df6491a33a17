"""The dose–response view of issue 23: pooled ΔM–ΔD r against the weight-decay dose.

Decoupled weight decay shrinks each row's norm by ≈ exp(−wd·Σₜ lrₜ) and leaves its
direction alone, so the dose wd·Σₜ lrₜ is the axis on which a run's ΔM can be pushed
independently of its ΔD. One line per method and training length, the paper's r (DoRA
paper, Figure 2, VL-BART query) drawn at the paper's dose as a star.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from wdanalysis.errors import WDAnalysisError
from wdanalysis.plots.figures import PAPER_ORDER
from wdanalysis.plots.seed_correlations import PAPER_R

__all__ = ["plot_dose_response"]

PAPER_DOSE = {"FT": 0.05, "LoRA": 0.5, "DoRA": 0.5}  # wd·Σlr of the authors' runs (issue 23)
LENGTH_STYLES = ("-", "--", ":", "-.")
#: The learned lines: dotted for the first length, dash-dot-dot for the second (thin, so
#: the raw lines stay in front).
LEARNED_STYLES = (":", (0, (4, 1.5, 1, 1.5, 1, 1.5)), (0, (1, 3)), (0, (6, 2)))


def plot_dose_response(
    table: pd.DataFrame, modules: tuple[str, ...] = ("query", "value")
) -> Figure:
    """One panel per module: r against the applied dose (log axis) per method and length.

    ``table`` has columns method, module, steps, seed, decay_dose, pearson_r,
    pearson_r_boot_low and pearson_r_boot_high (``dose_study.csv``). Every seed is a dot;
    the line joins the per-dose mean over seeds; the bars are seed 0's layer-bootstrap
    interval. Cells with a known ``pearson_r_learned`` (ΔM less the decay's shrinkage,
    issue 36) add hollow markers joined by a thin line: the "learned" r.
    """
    if table.empty:
        raise WDAnalysisError("no finished cells to plot", hint="run wdanalysis demo --study dose")
    figure = Figure(figsize=(4.2 * len(modules) + 2.2, 3.8), layout="constrained")
    axes = figure.subplots(1, len(modules), squeeze=False)[0]
    methods = [m for m in PAPER_ORDER if m in set(table["method"])]
    lengths = sorted(set(table["steps"]))
    for ax, module in zip(axes, modules, strict=True):
        rows = table.loc[table["module"] == module]
        for i, method in enumerate(methods):
            colour = f"C{i}"
            for j, steps in enumerate(lengths):
                _line(ax, rows, method, steps, colour, LENGTH_STYLES[j % len(LENGTH_STYLES)])
                _learned(ax, rows, method, steps, colour, LEARNED_STYLES[j % len(LEARNED_STYLES)])
            if method in PAPER_R:
                ax.scatter(
                    PAPER_DOSE[method],
                    PAPER_R[method],
                    marker="*",
                    s=140,
                    color=colour,
                    edgecolor="k",
                    zorder=5,
                )
        ax.axhline(0, color="0.6", lw=0.8)
        ax.set_xscale("log")
        ax.set_ylim(-1.05, 1.05)
        ax.set_xlabel("weight-decay dose  wd · Σₜ lrₜ")
        ax.set_title(f"{module}")
    axes[0].set_ylabel("pooled Pearson r (ΔM on ΔD)")
    # outside the panels: the study's lines cover every corner of them
    axes[-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    figure.suptitle("r against decay dose (★ paper's r at the paper's dose)", fontsize=10)
    return figure


def _line(ax, rows: pd.DataFrame, method: str, steps: int, colour: str, style: str) -> None:
    mine = rows.loc[(rows["method"] == method) & (rows["steps"] == steps)]
    if mine.empty:
        return
    mean = mine.groupby("decay_dose", sort=True)["pearson_r"].mean()
    ax.plot(mean.index, mean.to_numpy(), style, color=colour, label=f"{method}, {steps} steps")
    ax.scatter(mine["decay_dose"], mine["pearson_r"], s=14, color=colour, zorder=3)
    first = mine.loc[mine["seed"] == mine["seed"].min()]
    r = first["pearson_r"].to_numpy(np.float64)
    low = r - first["pearson_r_boot_low"].to_numpy(np.float64)
    high = first["pearson_r_boot_high"].to_numpy(np.float64) - r
    ax.errorbar(
        first["decay_dose"], r, yerr=[low, high], fmt="none", ecolor=colour, alpha=0.5, capsize=2
    )


def _learned(ax, rows: pd.DataFrame, method: str, steps: int, colour: str, style) -> None:
    """The r of ``delta_m_learned`` where the cells have it (cells cached before issue 36
    have not)."""
    if "pearson_r_learned" not in rows:
        return
    mine = rows.loc[(rows["method"] == method) & (rows["steps"] == steps)]
    mine = mine.loc[mine["pearson_r_learned"].notna()]
    if mine.empty:
        return
    mean = mine.groupby("decay_dose", sort=True)["pearson_r_learned"].mean()
    label = f"{method}, {steps} steps, learned ΔM"
    ax.plot(mean.index, mean.to_numpy(), linestyle=style, lw=0.9, color=colour, label=label)
    ax.scatter(mine["decay_dose"], mine["pearson_r_learned"], s=18, facecolor="none",
               edgecolor=colour, zorder=3)  # fmt: skip
