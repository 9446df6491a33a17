"""Small multiples drawn into one Axes: a report's every module on one page, fast.

A matplotlib Axes costs tens of milliseconds to build and draw (its ticks are dozens of
artists each), so a page of 21–80 real Axes takes seconds. The report's overview figures
(:mod:`wdanalysis.plots.overview`) have a simple anatomy instead: a grid of framed
panels, each with its own linear scales and three or four ticks. :class:`Facets` draws
that grid into a single Axes whose data coordinates are inches from the figure's top-left
corner: every panel maps its data into its box, all frames and tick marks are one line
collection, and only the tick labels and titles are texts. The result is an ordinary
:class:`~matplotlib.figure.Figure`, saved to PNG, SVG or PDF like any other.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from matplotlib.collections import LineCollection
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

__all__ = ["Box", "Facets", "nice_ticks", "tick_labels"]

_TICK = 0.05  # inches: length of a tick mark
_SUPERSCRIPT = str.maketrans("-0123456789", "⁻⁰¹²³⁴⁵⁶⁷⁸⁹")
TICK_SIZE = 7.0  # points: tick labels
TITLE_SIZE = 8.0  # points: panel titles


def nice_ticks(low: float, high: float, nbins: int = 3) -> tuple[tuple[float, float], list]:
    """Limits (the data range padded by 6 %) and the round tick values inside them."""
    if not (math.isfinite(low) and math.isfinite(high)):
        low, high = 0.0, 1.0
    if high <= low:
        pad = abs(low) * 0.05 or 1e-12
        low, high = low - pad, high + pad
    pad = 0.06 * (high - low)
    low, high = low - pad, high + pad
    ticks = MaxNLocator(nbins=nbins, steps=[1, 2, 2.5, 5, 10]).tick_values(low, high)
    return (low, high), [float(t) for t in ticks if low <= t <= high]


def tick_labels(ticks: Sequence[float]) -> list[str]:
    """Short labels: plain numbers between 0.01 and 9999, else mantissas sharing one power
    of ten, written once on the largest tick (``0  2  4×10⁻⁴``)."""
    if not ticks:
        return []
    top = max(abs(t) for t in ticks) or 1.0
    power = math.floor(math.log10(top))
    scale = 10.0**power if (power < -2 or power > 3) else 1.0
    labels = [f"{round(t / scale, 6):g}".replace("-", "−") for t in ticks]
    labels = ["0" if label in ("0", "−0") else label for label in labels]
    if scale != 1.0:
        last = int(np.argmax([abs(t) for t in ticks]))
        labels[last] += "×10" + str(power).translate(_SUPERSCRIPT)
    return labels


@dataclass(frozen=True)
class Box:
    """One panel: its top-left corner and size in inches, and its data limits."""

    x0: float
    y0: float
    width: float
    height: float
    xlim: tuple[float, float]
    ylim: tuple[float, float]

    def x(self, values) -> np.ndarray:
        """Data x → page inches."""
        low, high = self.xlim
        return self.x0 + (np.asarray(values, float) - low) / (high - low) * self.width

    def y(self, values) -> np.ndarray:
        """Data y → page inches (down the page)."""
        low, high = self.ylim
        share = (np.asarray(values, float) - low) / (high - low)
        return self.y0 + self.height * (1 - share)

    def clip_line(self, xs: tuple[float, float], slope: float, intercept: float):
        """The segment of y = intercept + slope·x over ``xs`` that lies inside the box (page
        inches), or None."""
        x_low, x_high = max(xs[0], self.xlim[0]), min(xs[1], self.xlim[1])
        if slope != 0:
            bounds = sorted([(v - intercept) / slope for v in self.ylim])
            x_low, x_high = max(x_low, bounds[0]), min(x_high, bounds[1])
        elif not self.ylim[0] <= intercept <= self.ylim[1]:
            return None
        if not x_low < x_high:
            return None
        ends = np.array([x_low, x_high])
        return np.column_stack([self.x(ends), self.y(intercept + slope * ends)])


class Facets:
    """A page of ``nrows`` × ``ncols`` framed panels of ``panel`` inches, margins in inches."""

    def __init__(
        self,
        nrows: int,
        ncols: int,
        panel: tuple[float, float] = (2.2, 1.5),
        *,
        left: float = 1.1,
        right: float = 0.3,
        top: float = 0.5,
        bottom: float = 0.6,
        wgap: float = 0.55,
        hgap: float = 0.6,
        dpi: float = 100,
    ) -> None:
        self.panel, self.left, self.top, self.wgap, self.hgap = panel, left, top, wgap, hgap
        self.nrows = nrows
        self.width = left + ncols * panel[0] + (ncols - 1) * wgap + right
        self.height = top + nrows * panel[1] + (nrows - 1) * hgap + bottom
        self.figure = Figure(figsize=(self.width, self.height), dpi=dpi)
        self.ax = self.figure.add_axes((0, 0, 1, 1))
        self.ax.set_axis_off()
        self.ax.set_xlim(0, self.width)
        self.ax.set_ylim(self.height, 0)
        self.segments: list[np.ndarray] = []

    def corner(self, row: int, col: int) -> tuple[float, float]:
        """Top-left corner of a panel, in inches."""
        return (
            self.left + col * (self.panel[0] + self.wgap),
            self.top + row * (self.panel[1] + self.hgap),
        )

    def box(self, row: int, col: int, xs, ys, x_labels: bool = True, x_ticks=None) -> Box:
        """Frame a panel scaled to the data ``xs`` and ``ys``, with ticks and labels; ``x_ticks``
        (limits, ticks) fixes the x scale (a shared one); ``x_labels=False`` leaves its labels
        out (an inner row)."""
        x0, y0 = self.corner(row, col)
        w, h = self.panel
        xlim, xt = x_ticks or nice_ticks(*_range(xs))
        ylim, yt = nice_ticks(*_range(ys))
        box = Box(x0, y0, w, h, xlim, ylim)
        corners = [[x0, y0], [x0 + w, y0], [x0 + w, y0 + h], [x0, y0 + h], [x0, y0]]
        self.segments.append(np.array(corners))
        for x, label in zip(box.x(xt), tick_labels(xt), strict=True):
            self.segments.append(np.array([[x, y0 + h], [x, y0 + h + _TICK]]))
            if x_labels:
                self.text(x, y0 + h + 0.08, label, ha="center", va="top", fontsize=TICK_SIZE)
        for y, label in zip(box.y(yt), tick_labels(yt), strict=True):
            self.segments.append(np.array([[x0 - _TICK, y], [x0, y]]))
            self.text(x0 - 0.08, y, label, ha="right", va="center", fontsize=TICK_SIZE)
        return box

    def text(self, x: float, y: float, text: str, **kwargs) -> None:
        """A text at page inches."""
        self.ax.text(x, y, text, **kwargs)

    def title(self, row: int, col: int, text: str) -> None:
        """A panel's title, above its frame."""
        x0, y0 = self.corner(row, col)
        self.text(x0, y0 - 0.06, text, ha="left", va="bottom", fontsize=TITLE_SIZE)

    def row_label(self, row: int, text: str) -> None:
        """A row's name, rotated, left of its y tick labels."""
        _, y0 = self.corner(row, 0)
        self.text(0.12, y0 + self.panel[1] / 2, text, ha="left", va="center", rotation=90)

    def x_label(self, col: int, text: str) -> None:
        """Under the bottom panel of a column, below its tick labels."""
        x0, y0 = self.corner(self.nrows - 1, col)
        y = y0 + self.panel[1] + 0.27
        self.text(x0 + self.panel[0] / 2, y, text, ha="center", va="top", fontsize=TITLE_SIZE)

    def column_head(self, col: int, text: str) -> None:
        """Above the top panel of a column, over its title."""
        x0, y0 = self.corner(0, col)
        self.text(x0 + self.panel[0] / 2, y0 - 0.3, text, ha="center", va="bottom")

    def finish(self) -> Figure:
        """Add the frames and tick marks (one collection) and return the figure."""
        self.ax.add_collection(LineCollection(self.segments, colors="0.2", linewidths=0.7))
        return self.figure


def _range(values) -> tuple[float, float]:
    finite = np.asarray(values, float)
    finite = finite[np.isfinite(finite)]
    if finite.size == 0:
        return 0.0, 1.0
    return float(finite.min()), float(finite.max())
