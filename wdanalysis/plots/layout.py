"""Fixed figure layouts: margins in inches, set once from what the figure holds.

Matplotlib's constrained layout measures every text of a figure (each tick label, title
and legend entry) at every draw and then draws again: about half of a report figure's
drawing time. The report's figures have a known anatomy (a grid of panels; tick labels
kept short by :class:`~wdanalysis.plots.common.PowerOfTen`; a colourbar to the right or
one per panel; a legend below), so their margins are fixed in inches here instead: the
panels get every inch that is left, nothing is measured, and each format is one draw.

A figure built by :func:`fixed_figure` carries its :class:`FixedLayout`; the helpers of
:mod:`wdanalysis.plots.common` add the colourbar and the legend to it, and each plotting
function ends with :func:`finish`, which places the panels, colourbars and legend.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

__all__ = ["FixedLayout", "finish", "fixed_figure", "layout_of"]

_ATTRIBUTE = "_wdanalysis_layout"
#: Inches: a line of 10 pt text with its spacing; the shared colourbar's width.
_LINE = 0.21
_BAR = 0.15


@dataclass
class FixedLayout:
    """Margins and gaps in inches around a grid of panels, and what sits in them."""

    nrows: int
    ncols: int
    left: float = 0.85  # y tick labels and the y label
    right: float = 0.2
    bottom: float = 0.55  # x tick labels and the x label
    top: float = 0.5  # panel title above the y axis' ×10⁻ⁿ multiplier
    wspace: float = 0.6  # the next panel's y tick labels
    hspace: float = 0.95  # x tick labels, x label and the next row's title
    colourbar: Axes | None = None  # one bar right of all panels
    panel_bars: list[tuple[Axes, Axes]] = field(default_factory=list)  # (panel, its bar)
    legend_lines: int = 0  # rows of legend entries plus its title below the panels

    def margins(self, figure: Figure) -> dict[str, float]:
        """``subplots_adjust`` fractions for this figure's size."""
        width, height = figure.get_size_inches()
        right = self.right + (_BAR + 1.0 if self.colourbar is not None else 0.0)
        bottom = self.bottom + (0.12 + _LINE * self.legend_lines if self.legend_lines else 0.0)
        top = self.top + (0.35 if figure._suptitle is not None else 0.0)
        # Never let the margins eat the panels of a figure the caller made small.
        left = min(self.left, 0.3 * width)
        right = min(right, 0.3 * width)
        bottom, top = min(bottom, 0.35 * height), min(top, 0.25 * height)
        panel_w = max((width - left - right - (self.ncols - 1) * self.wspace) / self.ncols, 0.3)
        panel_h = max((height - bottom - top - (self.nrows - 1) * self.hspace) / self.nrows, 0.3)
        return {
            "left": left / width,
            "right": 1 - right / width,
            "bottom": bottom / height,
            "top": 1 - top / height,
            "wspace": self.wspace / panel_w,
            "hspace": self.hspace / panel_h,
        }


def layout_of(figure: Figure) -> FixedLayout | None:
    """The fixed layout of a figure made by :func:`fixed_figure`, else None (a caller's)."""
    return getattr(figure, _ATTRIBUTE, None)


def fixed_figure(
    nrows: int,
    ncols: int,
    figsize: tuple[float, float],
    dpi: float | None,
    sharex: bool | str = False,
    sharey: bool | str = False,
    **margins: float,
) -> tuple[Figure, np.ndarray]:
    """A figure without a layout engine and its grid of panels; ``margins`` in inches
    override :class:`FixedLayout`'s defaults."""
    figure = Figure(figsize=figsize, dpi=dpi or 100)
    grid = figure.subplots(nrows, ncols, sharex=sharex, sharey=sharey, squeeze=False)
    setattr(figure, _ATTRIBUTE, FixedLayout(nrows, ncols, **margins))
    return figure, grid


def finish(figure: Figure) -> Figure:
    """Place the panels, colourbars and legend of a fixed-layout figure (no-op otherwise)."""
    layout = layout_of(figure)
    if layout is None:
        return figure
    width, height = figure.get_size_inches()
    fractions = layout.margins(figure)
    figure.subplots_adjust(**fractions)
    if layout.colourbar is not None:
        x0 = fractions["right"] + 0.18 / width
        span = fractions["top"] - fractions["bottom"]
        low = fractions["bottom"] + 0.05 * span
        layout.colourbar.set_position([x0, low, _BAR / width, 0.9 * span])
    for panel, bar in layout.panel_bars:
        box = panel.get_position()
        bar.set_position([box.x1 + 0.08 / width, box.y0, 0.12 / width, box.height])
    return figure
