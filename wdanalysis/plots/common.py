"""What every figure of the analysis shares: panel order, data preparation, the grid of
axes, colour scales, legends and axis labels.

Figures are built with :class:`~matplotlib.figure.Figure`, not ``pyplot``, so that nothing
registers in pyplot's global figure list: a CLI that draws hundreds of figures leaks no
memory and tests run headless.
"""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib as mpl
import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.colors import BoundaryNorm, Colormap, Normalize
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator, ScalarFormatter

from wdanalysis.plots.layout import fixed_figure, layout_of
from wdanalysis.plots.naming import (
    MANY_LAYERS,
    PAPER_ORDER,
    X_LABEL,
    cycle,
    n_layers,
    order_runs,
    panel_titles,
    y_label,
)
from wdanalysis.stats.fits import drop_undefined, select_module, validate_deltas

__all__ = [
    "MANY_LAYERS",
    "PAPER_ORDER",
    "PowerOfTen",
    "X_LABEL",
    "axes_grid",
    "colourbar",
    "cycle",
    "layer_colours",
    "legend_below",
    "light_grid",
    "panel_title",
    "n_layers",
    "order_runs",
    "panel_titles",
    "prepare",
    "scientific",
    "y_label",
]

#: Points between a panel and its title: room for the y axis' ×10⁻ⁿ multiplier.
TITLE_PAD = 16.0
#: Intervals between ticks at most (each tick is several artists to build and draw).
MAX_TICKS = 6
_GRID = {"axes.grid": True, "grid.linewidth": 0.4, "grid.alpha": 0.4}


def prepare(
    deltas: pd.DataFrame, module: str | None, runs: Sequence[str] | None, y: str = "delta_m"
) -> tuple[pd.DataFrame, list[str]]:
    """Validate, drop undefined rows, select one module and fix the panel order."""
    validate_deltas(deltas)
    validate_deltas(deltas, required=[y])
    data = select_module(drop_undefined(deltas, y=y), module)
    data = data.assign(run=data["run"].astype(str))
    order = order_runs(data, runs)
    return data.loc[data["run"].isin(order)], order


def layer_colours(data: pd.DataFrame, cmap: str | Colormap) -> tuple[Colormap, Normalize] | None:
    """A discrete norm over the layer indices (one colour band per layer), or None if unknown."""
    layers = pd.to_numeric(data["layer"], errors="coerce").dropna()
    if layers.empty:
        return None
    low, high = int(layers.min()), int(layers.max())
    colormap = mpl.colormaps[cmap] if isinstance(cmap, str) else cmap
    colormap = colormap.with_extremes(bad="0.55")  # a row without a layer shows grey
    norm = BoundaryNorm(np.arange(low - 0.5, high + 1.5), colormap.N)
    return colormap, norm


def axes_grid(
    nrows: int,
    ncols: int,
    axes,
    figsize: tuple[float, float] | None,
    dpi: float | None,
    sharex: bool | str,
    sharey: bool | str,
    lines: bool = True,
) -> tuple[Figure, np.ndarray]:
    """A fresh fixed-layout figure (:mod:`wdanalysis.plots.layout`), or the caller's axes
    checked for the right count; ``lines``: the light grid behind the data."""
    if axes is not None:
        grid = np.asarray(axes, dtype=object).reshape(-1)
        if grid.size != nrows * ncols:
            raise ValueError(f"need {nrows * ncols} axes (one per panel), got {grid.size}")
        return grid[0].get_figure(), grid.reshape(nrows, ncols)
    size = figsize or (3.3 * ncols + 1.1, 3.0 * nrows + 0.9)
    if lines:  # set at creation: turning the grid on afterwards restyles every tick
        with mpl.rc_context(_GRID):
            return fixed_figure(nrows, ncols, size, dpi, sharex, sharey, **_margins(sharex))
    return fixed_figure(nrows, ncols, size, dpi, sharex, sharey, **_margins(sharex))


def _margins(sharex: bool | str) -> dict[str, float]:
    return {"hspace": 0.5} if sharex in (True, "col", "all") else {}  # no inner x labels


def light_grid(ax: Axes) -> None:
    """The panels' light grid on a caller's axes (:func:`axes_grid` draws it on its own)."""
    if layout_of(ax.get_figure()) is None:
        ax.grid(True, lw=_GRID["grid.linewidth"], alpha=_GRID["grid.alpha"])


def panel_title(ax: Axes, text: str, pad: float = TITLE_PAD, **kwargs) -> None:
    """A panel's title at a fixed height, clear of the ×10⁻ⁿ multiplier above the y axis
    (placing it automatically measures the axis at every draw)."""
    ax.set_title(text, y=1.0, pad=pad, **kwargs)


_SUPERSCRIPT = str.maketrans("-0123456789", "⁻⁰¹²³⁴⁵⁶⁷⁸⁹")


class PowerOfTen(ScalarFormatter):
    """A scalar formatter whose multiplier reads ×10⁻⁴ in plain text: the look of
    matplotlib's mathtext offset without parsing mathtext at every draw (a third of a
    figure's drawing time)."""

    def __init__(self) -> None:
        super().__init__(useOffset=False, useMathText=False)
        self.set_scientific(True)
        self.set_powerlimits((-2, 3))

    def get_offset(self) -> str:
        text = super().get_offset().replace("\u2212", "-")  # e.g. "1e-4", "" when none
        mantissa, _, exponent = text.partition("e")
        if not exponent:
            return text
        power = "10" + str(int(exponent)).translate(_SUPERSCRIPT)
        return f"×{power}" if mantissa in ("", "1") else f"{mantissa}×{power}"


def scientific(ax: Axes, axes: Sequence[str] = ("x", "y")) -> None:
    """×10⁻ⁿ multipliers instead of long decimals (ΔM and ΔD are often ~1e-4), and at
    most :data:`MAX_TICKS` round intervals between ticks."""
    for name in axes:
        axis = ax.xaxis if name == "x" else ax.yaxis
        if isinstance(axis.get_major_formatter(), ScalarFormatter):  # not a log axis
            axis.set_major_formatter(PowerOfTen())
            axis.set_major_locator(MaxNLocator(nbins=MAX_TICKS, steps=[1, 2, 2.5, 5, 10]))


def colourbar(figure: Figure, axes: np.ndarray, colours, label: str = "layer", ticks=None):
    """One colourbar for all panels; integer ticks, or ``ticks`` = (positions, labels)."""
    colormap, norm = colours
    mappable = mpl.cm.ScalarMappable(norm=norm, cmap=colormap)
    layout = layout_of(figure)
    if layout is not None:  # placed by finish()
        layout.colourbar = figure.add_axes((0.9, 0.1, 0.02, 0.8), label="<colorbar>")
        bar = figure.colorbar(mappable, cax=layout.colourbar, label=label)
    else:
        bar = figure.colorbar(mappable, ax=list(axes.ravel()), label=label, fraction=0.05)
    if ticks is not None:
        positions, labels = ticks
        bar.set_ticks(positions, labels=labels)
    else:
        bar.ax.yaxis.set_major_locator(MaxNLocator(nbins=8, integer=True))
    bar.ax.minorticks_off()
    return bar


def legend_below(figure: Figure, axes: np.ndarray, handles: list, title: str) -> None:
    """Below the panels when we own the layout (never over data), else in the last panel."""
    if not handles:
        return
    layout = layout_of(figure)
    if layout is not None:  # finish() makes room below the panels
        ncols = min(len(handles), 7)
        layout.legend_lines = -(-len(handles) // ncols) + (1 if title else 0)
        figure.legend(
            handles=handles,
            loc="lower center",
            bbox_to_anchor=(0.5, 0.01),
            ncols=ncols,
            title=title,
            frameon=False,
            handletextpad=0.3,
            columnspacing=1.2,
        )
    else:
        axes.ravel()[-1].legend(handles=handles, title=title, fontsize="small", loc="best")
