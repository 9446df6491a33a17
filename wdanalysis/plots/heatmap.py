"""The layer × step heatmap: every ΔM (or ``y``) and ΔD value of a module at a glance.

One column of panels per run; rows ΔM and ΔD (and, where the module comes in several
kinds, a pair of rows per kind). Each panel is a grid of cells, layer up, step across,
with its own colourbar: runs differ in scale by orders of magnitude (FT against LoRA), so
a shared scale would paint all but one run a single colour. Values of both signs get a
diverging scale centred on zero. This is the view that stays readable at 80 layers.
"""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib as mpl
import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.colors import TwoSlopeNorm
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from wdanalysis.plots.common import PowerOfTen, panel_title, panel_titles, prepare, y_label
from wdanalysis.plots.kinds import kind_label, kinds_of, of_kind
from wdanalysis.plots.layout import finish, fixed_figure, layout_of
from wdanalysis.plots.scales import colour_norm

__all__ = ["HEATMAP_GID", "heatmap_grid", "plot_heatmap"]

HEATMAP_GID = "heatmap"


def heatmap_grid(frame: pd.DataFrame, column: str) -> tuple[np.ndarray, list[int], list[int]]:
    """The (layers × steps) array of ``column`` for one run and kind, with its layer and
    step labels; a missing (layer, step) is NaN; several matrices at one cell: their mean."""
    rows = frame.assign(
        layer=pd.to_numeric(frame["layer"], errors="coerce"),
        step=pd.to_numeric(frame["step"], errors="coerce"),
    ).dropna(subset=["layer", "step"])
    table = rows.pivot_table(index="layer", columns="step", values=column, aggfunc="mean")
    table = table.sort_index().sort_index(axis=1)
    layers = [int(v) for v in table.index]
    steps = [int(v) for v in table.columns]
    return table.to_numpy(dtype=float), layers, steps


def _panel(ax: Axes, figure: Figure, frame: pd.DataFrame, column: str) -> None:
    values, layers, steps = heatmap_grid(frame, column)
    if not layers:
        ax.set_axis_off()
        return
    norm = colour_norm(values)
    cmap = "RdBu_r" if isinstance(norm, TwoSlopeNorm) else "viridis"
    colormap = mpl.colormaps[cmap].with_extremes(bad="0.85")
    x_edges = np.arange(len(steps) + 1) - 0.5
    y_edges = np.arange(len(layers) + 1) - 0.5
    mesh = ax.pcolormesh(
        x_edges, y_edges, np.ma.masked_invalid(values), cmap=colormap, norm=norm, gid=HEATMAP_GID
    )
    every = max(1, int(np.ceil(len(steps) / 8)))
    ax.set_xticks(np.arange(len(steps))[::every], [str(s) for s in steps][::every])
    ax.yaxis.set_major_locator(MaxNLocator(nbins=min(len(layers), 8), integer=True))
    ax.yaxis.set_major_formatter(
        mpl.ticker.FuncFormatter(
            lambda v, _: str(layers[int(v)]) if 0 <= int(v) < len(layers) else ""
        )
    )
    layout = layout_of(figure)
    cax = figure.add_axes((0.9, 0.1, 0.02, 0.8), label="<colorbar>")
    layout.panel_bars.append((ax, cax))  # placed right of the panel by finish()
    bar = figure.colorbar(mesh, cax=cax, format=PowerOfTen())
    bar.ax.tick_params(labelsize="small")


def plot_heatmap(
    deltas: pd.DataFrame,
    module: str | None = None,
    runs: Sequence[str] | None = None,
    *,
    y: str = "delta_m",
    figsize: tuple[float, float] | None = None,
    dpi: float | None = None,
    title: str | None = None,
) -> Figure:
    """Layer × step heatmaps of ``y`` (ΔM by default) and ΔD, one column per run.

    Rows: ``y`` then ΔD, for each kind of matrix (component, stack, attention kind) the
    module comes in. Cell (layer, step) is exactly the table's value (the mean where
    several matrices share a layer index within one kind); grey = no value. Rows with an
    unknown layer or step are left out. Each panel has its own colourbar.
    """
    data, order = prepare(deltas, module, runs, y)
    kinds = kinds_of(data)
    quantities = [(kind, column) for kind in kinds for column in (y, "delta_d")]
    layers = max(int(pd.to_numeric(data["layer"], errors="coerce").nunique()), 1)
    height = max(2.3, min(0.045 * layers + 1.6, 5.4))  # a panel plus its 0.75 in gap
    size = figsize or (3.6 * len(order) + 0.6, height * len(quantities) + 0.8)
    margins = {"left": 1.0, "right": 0.75, "wspace": 1.15, "hspace": 0.75}
    figure, grid = fixed_figure(len(quantities), len(order), size, dpi, **margins)
    titles = panel_titles(data, order)
    for row, (kind, column) in enumerate(quantities):
        label = kind_label(kind)
        for ax, run in zip(grid[row], order, strict=True):
            _panel(ax, figure, of_kind(data.loc[data["run"] == run], kind), column)
            if row == 0 or column == y:
                text = titles[run] + (f" · {label}" if label else "")
                panel_title(ax, text, pad=6.0, fontsize="medium")
        grid[row, 0].set_ylabel(f"{y_label(column, short=True)}\nlayer")
    for ax in grid[-1]:
        ax.set_xlabel("training step")
    if title:
        figure.suptitle(title)
    return finish(figure)
