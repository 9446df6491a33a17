"""Figure 2 raw and with the weight decay's shrinkage taken out (issue 36).

:func:`plot_raw_vs_learned`: one column per method (FT, LoRA, DoRA), the raw ΔM on top and
``delta_m_learned`` = mean_n |m_t[n] − S_t·m_0[n]| below, every finished seed's points
(colour = layer, marker = seed). :func:`plot_r_intervals`: each seed's pooled r with its
layer-bootstrap interval, raw against learned, and the mean over seeds.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from wdanalysis.table.schema import with_y

METHODS = ("FT", "LoRA", "DoRA")
ROWS = {"raw": ("delta_m", "ΔM (raw)"), "learned": ("delta_m_learned", "ΔM learned (S·m₀ removed)")}
SEED_MARKERS = ("o", "s", "^", "D", "v", "P")


def _title(method: str, y: str, module: str, per_seed: pd.DataFrame, across: pd.DataFrame) -> str:
    mine = per_seed[(per_seed["method"] == method) & (per_seed["module"] == module)]
    mine = mine[mine["y"] == y]
    if len(mine) >= 2:
        row = across[(across["method"] == method) & (across["module"] == module)]
        row = row[row["y"] == y].iloc[0]
        return (
            f"{method} {y}: r {row['pearson_r_mean']:+.2f} "
            f"[{row['pearson_r_ci_low']:+.2f}, {row['pearson_r_ci_high']:+.2f}] ({len(mine)} seeds)"
        )
    if len(mine) == 1:
        row = mine.iloc[0]
        return (
            f"{method} {y}: r {row['pearson_r']:+.2f} "
            f"[{row['pearson_r_boot_low']:+.2f}, {row['pearson_r_boot_high']:+.2f}] (seed "
            f"{row['seed']})"
        )
    return f"{method} {y}: no run"


def plot_raw_vs_learned(
    deltas: pd.DataFrame, module: str, per_seed: pd.DataFrame, across: pd.DataFrame
) -> Figure:
    """ΔM (top) and ``delta_m_learned`` (bottom) against ΔD, one column per method."""
    data = deltas[deltas["module"] == module]
    figure = Figure(figsize=(13, 7.5), layout="constrained")
    grid = figure.subplots(2, len(METHODS), squeeze=False)
    seeds = sorted(data["seed"].unique())
    layers = data["layer"].astype(float)
    norm = (layers.min(), max(layers.max(), layers.min() + 1))
    for col, method in enumerate(METHODS):
        for row, (y, (column, label)) in enumerate(ROWS.items()):
            ax = grid[row, col]
            frame = (
                with_y(data[data["method"] == method], column)
                if ((data["method"] == method).any())
                else data.iloc[:0]
            )
            for seed, marker in zip(seeds, SEED_MARKERS * 4, strict=False):
                at = frame[frame["seed"] == seed]
                ax.scatter(
                    at["delta_d"],
                    at["delta_m"],
                    c=at["layer"].astype(float),
                    cmap="viridis",
                    vmin=norm[0],
                    vmax=norm[1],
                    marker=marker,
                    s=22,
                    edgecolor="0.2",
                    linewidth=0.3,
                    label=f"seed {seed}",
                )
            ax.set_title(_title(method, y, module, per_seed, across), fontsize=9)
            ax.set_xlabel("ΔD (direction change)")
            ax.set_ylabel(label if col == 0 else "")
            ax.ticklabel_format(axis="both", style="sci", scilimits=(-2, 3))
            ax.grid(True, lw=0.4, alpha=0.4)
    grid[0, -1].legend(fontsize=7, loc="best", title="colour = layer", title_fontsize=7)
    steps = ", ".join(str(s) for s in sorted(data["step"].dropna().unique()))
    figure.suptitle(
        f"{module}: Figure 2 raw (top) and with the weight decay's shrinkage removed (bottom), "
        f"steps {steps}; r [95 % t-interval over seeds; one seed: layer bootstrap]"
    )
    return figure


def plot_r_intervals(per_seed: pd.DataFrame, across: pd.DataFrame) -> Figure:
    """Pooled r per seed with its layer-bootstrap interval, raw and learned, per module."""
    modules = list(dict.fromkeys(per_seed["module"]))
    figure = Figure(figsize=(11, 4.2), layout="constrained")
    axes = figure.subplots(1, len(modules), squeeze=False)[0]
    colours = {"raw": "0.45", "learned": "C3"}
    for ax, module in zip(axes, modules, strict=True):
        ticks, labels = [], []
        for i, method in enumerate(METHODS):
            for j, y in enumerate(ROWS):
                base = i * 3 + j
                mine = per_seed[
                    (per_seed["method"] == method)
                    & (per_seed["module"] == module)
                    & (per_seed["y"] == y)
                ].sort_values("seed")
                offsets = np.linspace(-0.3, 0.3, max(len(mine), 1))
                for offset, (_, row) in zip(offsets, mine.iterrows(), strict=False):
                    r, low, high = (
                        row["pearson_r"],
                        row["pearson_r_boot_low"],
                        row["pearson_r_boot_high"],
                    )
                    ax.errorbar(
                        r,
                        base + offset,
                        xerr=[[r - low], [high - r]],
                        fmt="o",
                        ms=4,
                        color=colours[y],
                        capsize=2,
                        lw=1,
                    )
                mean = across[
                    (across["method"] == method) & (across["module"] == module) & (across["y"] == y)
                ]
                if (
                    len(mine) >= 2
                    and not mean.empty
                    and not math.isnan(mean["pearson_r_mean"].iloc[0])
                ):
                    ax.plot(mean["pearson_r_mean"].iloc[0], base, marker="|", ms=16, color="black")
                ticks.append(base)
                labels.append(f"{method} {y}")
        ax.axvline(0, color="black", lw=0.6)
        ax.set_yticks(ticks, labels)
        ax.invert_yaxis()
        ax.set_xlim(-1.05, 1.05)
        ax.set_xlabel("pooled Pearson r of ΔM on ΔD [layer-bootstrap 95 % interval]")
        ax.set_title(f"{module} (one point per seed; | = mean over seeds)")
        ax.grid(True, axis="x", lw=0.4, alpha=0.4)
    return figure
