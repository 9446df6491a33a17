"""Figures of the weight-decomposition analysis: the paper's Figure 2 (and, re-exported
here, the trajectory view and the layer × step heatmap).

Each function follows the seaborn/pandas manner: a tidy deltas table in, a
:class:`matplotlib.figure.Figure` out, optional ``axes=`` to draw into the caller's own
layout. Figures are built with :class:`~matplotlib.figure.Figure`, not ``pyplot``, so that
nothing registers in pyplot's global figure list: a CLI that draws hundreds of figures
leaks no memory, tests run headless, and in Jupyter the returned figure still displays
when it is the last expression of a cell (or via ``IPython.display.display(fig)``).

Figure 2 has two designs (docs/guides/report.md). Up to :data:`MANY_LAYERS` layers and
ten steps, the paper's: colour = layer, marker = step. Beyond, where 32–80 colours or ten
markers cannot be told apart: colour = training step on a sequential scale (early light,
late dark), one small marker, layers left to the heatmap and the trajectories.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Literal

import matplotlib as mpl
import numpy as np
import pandas as pd
from matplotlib import patheffects
from matplotlib.axes import Axes
from matplotlib.colors import BoundaryNorm, Colormap
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from wdanalysis.plots.common import (
    MANY_LAYERS,
    PAPER_ORDER,
    X_LABEL,
    axes_grid,
    colourbar,
    cycle,
    layer_colours,
    legend_below,
    light_grid,
    n_layers,
    order_runs,
    panel_title,
    panel_titles,
    prepare,
    y_label,
)
from wdanalysis.plots.common import scientific as scientific_axes
from wdanalysis.plots.heatmap import plot_heatmap
from wdanalysis.plots.kinds import kind_label, kinds_of, of_kind, pooled_fit
from wdanalysis.plots.layout import finish
from wdanalysis.plots.trajectories import plot_trajectories
from wdanalysis.stats.fits import fit_lines

__all__ = [
    "FIT_GID",
    "PAPER_ORDER",
    "STEP_MARKERS",
    "X_LABEL",
    "Y_LABEL",
    "order_runs",
    "plot_figure2",
    "plot_heatmap",
    "plot_trajectories",
]

#: One marker per step (recycled past ten steps, with a warning).
STEP_MARKERS: tuple[str, ...] = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">")
Y_LABEL = y_label("delta_m")
FIT_GID = "fit-line"
STEP_CMAP = "viridis_r"  # early steps light, late steps dark


def steps_of(data: pd.DataFrame, warn: bool) -> list:
    """Known steps ascending, then <NA> if some checkpoint had an unknown step."""
    steps = sorted(int(s) for s in data["step"].dropna().unique())
    if data["step"].isna().any():
        steps.append(pd.NA)
    if warn and len(steps) > len(STEP_MARKERS):
        warnings.warn(
            f"{len(steps)} steps but only {len(STEP_MARKERS)} distinct markers: markers repeat; "
            "select fewer steps, or pass colour_by='step'",
            UserWarning,
            stacklevel=3,
        )
    return steps


def _at_step(frame: pd.DataFrame, step) -> pd.DataFrame:
    return frame.loc[frame["step"].isna()] if step is pd.NA else frame.loc[frame["step"] == step]


def _step_label(step) -> str:
    return "unknown" if step is pd.NA else str(step)


def format_r(r: float) -> str:
    return "r = n/a" if not np.isfinite(r) else f"r = {r:.2f}".replace("-", "−")


def _step_colours(steps: list, cmap: str | Colormap):
    """A discrete sequential scale over the steps' ranks (even bands however they are
    spaced); an unknown step is grey."""
    colormap = mpl.colormaps[cmap] if isinstance(cmap, str) else cmap
    known = [s for s in steps if s is not pd.NA]
    norm = BoundaryNorm(np.arange(-0.5, max(len(known), 1) + 0.5), colormap.N)
    return colormap.with_extremes(bad="0.55"), norm


def _scatter_panel(ax: Axes, frame: pd.DataFrame, steps: list, style: dict) -> None:
    """One scatter collection per step: its marker and layer colours (the paper's design)
    or one marker and its step colour (many layers)."""
    markers = cycle(STEP_MARKERS, len(steps)) if style["by"] == "layer" else ["o"] * len(steps)
    for rank, (step, marker) in enumerate(zip(steps, markers, strict=True)):
        at = _at_step(frame, step)
        if at.empty:
            continue
        kw = {"marker": marker, "s": style["size"], "edgecolors": "0.15", "linewidths": 0.4}
        if style["by"] == "step":
            value = np.full(len(at), np.nan if step is pd.NA else float(rank))
            kw.update(c=value, cmap=style["colours"][0], norm=style["colours"][1], alpha=0.85)
            kw["linewidths"] = 0.2
        elif style["colours"] is None:
            kw["color"] = "C0"
        else:
            layer = pd.to_numeric(at["layer"], errors="coerce").to_numpy(float, na_value=np.nan)
            kw.update(c=layer, cmap=style["colours"][0], norm=style["colours"][1])
        ax.scatter(at["delta_d"], at[style["y"]], **kw)


def _fit_line(ax: Axes, frame: pd.DataFrame, fit: pd.Series | None) -> None:
    """The least-squares line across the panel's ΔD range, drawn over the points."""
    if fit is None or not np.isfinite(fit["slope"]):
        return
    xs = np.array([frame["delta_d"].min(), frame["delta_d"].max()], dtype=float)
    halo = [patheffects.withStroke(linewidth=3.6, foreground="white", alpha=0.8)]
    ax.plot(
        xs,
        fit["intercept"] + fit["slope"] * xs,
        color="black",
        lw=1.6,
        zorder=3,
        gid=FIT_GID,
        path_effects=halo,  # stays visible over dense, dark points
    )


def point_style(data: pd.DataFrame, colour_by: str, cmap, marker_size: float, y: str) -> dict:
    """How points are coloured: by layer (the paper) or by step (many layers or steps)."""
    layers = n_layers(data)
    steps = steps_of(data, warn=False)
    if colour_by == "auto":
        many = layers > MANY_LAYERS or len(steps) > len(STEP_MARKERS)
        colour_by = "step" if many else "layer"
    if colour_by not in ("layer", "step"):
        raise ValueError(f"colour_by must be 'auto', 'layer' or 'step', got {colour_by!r}")
    if colour_by == "layer":
        return {"by": "layer", "colours": layer_colours(data, cmap), "size": marker_size, "y": y}
    size = marker_size * min(1.0, (MANY_LAYERS / max(layers, 1)) ** 0.5)
    step_cmap = STEP_CMAP if cmap == "viridis" else cmap
    return {"by": "step", "colours": _step_colours(steps, step_cmap), "size": size, "y": y}


def _decorate(figure: Figure, grid: np.ndarray, style: dict, steps: list) -> None:
    """Colourbar and legend: layers and step markers, or the step scale."""
    fit_handle = Line2D([], [], color="black", lw=1.6, label="least-squares fit")
    if style["by"] == "step":
        known = [s for s in steps if s is not pd.NA]
        ticks = np.arange(len(known))
        every = max(1, len(known) // 10)
        colourbar(
            figure,
            grid,
            style["colours"],
            label="training step",
            ticks=(ticks[::every], [str(s) for s in known][::every]),
        )
        legend_below(figure, grid, [fit_handle], title="")
        return
    if style["colours"] is not None:
        colourbar(figure, grid, style["colours"])
    handles = [
        Line2D([], [], ls="", marker=m, mfc="0.7", mec="0.15", ms=6.5, label=_step_label(s))
        for s, m in zip(steps, cycle(STEP_MARKERS, len(steps)), strict=True)
    ]
    legend_below(figure, grid, [*handles, fit_handle], title="training step")


def plot_figure2(
    deltas: pd.DataFrame,
    module: str | None = None,
    runs: Sequence[str] | None = None,
    *,
    y: str = "delta_m",
    colour_by: Literal["auto", "layer", "step"] = "auto",
    sharex: bool = False,
    sharey: bool = False,
    fits: pd.DataFrame | None = None,
    axes: Sequence[Axes] | None = None,
    figsize: tuple[float, float] | None = None,
    dpi: float | None = None,
    cmap: str | Colormap = "viridis",
    marker_size: float = 30.0,
    scientific: bool = True,
    title: str | None = None,
    pool: bool = False,
) -> Figure:
    """The paper's Figure 2: ΔM (or ``y``) against ΔD, one panel per run, with the fitted line.

    Where the module comes in several kinds (T5's encoder self-, decoder self- and
    cross-attention; SDXL's two text encoders; a UNet's ``attn1``/``attn2``), each kind has
    its own row of panels and its own fit; ``pool=True`` draws the paper's one cloud of
    points per run instead.

    ``colour_by="layer"``: colour = layer (colourbar), marker = step (legend below the
    panels), as the paper. ``colour_by="step"``: colour = training step on a sequential
    scale, one small marker, for 32–80 layers. ``"auto"`` (default) picks "layer" up to
    :data:`~wdanalysis.plots.common.MANY_LAYERS` layers and ten steps. The black line is
    the least-squares fit across the data's ΔD range; each panel is titled with its method
    and pooled Pearson r. ``module`` picks the weight ("query" = paper Fig. 2, "value" =
    Fig. 6; exact names like "q_proj" work too) and is required when several are present.
    ``y`` names the column on the vertical axis (its label follows it). ``fits`` (from
    :func:`wdanalysis.stats.fits.fit_lines`, with the same ``y``) avoids refitting. Panels
    follow ``runs`` if given, else FT, LoRA, DoRA, then other methods in input order. With
    ``axes=`` the panels are drawn into the caller's axes (one per run) and the legend goes
    into the last one; ``y="delta_m_learned"``: ΔM less the decay's shrinkage. Returns it.
    """
    data, order = prepare(deltas, module, runs, y)
    if fits is None:
        fits = fit_lines(data, per_step=False, pool=pool, y=y, n_boot=0)
    kinds = kinds_of(data, pool)
    figure, grid = axes_grid(len(kinds), len(order), axes, figsize, dpi, sharex, sharey)
    style = point_style(data, colour_by, cmap, marker_size, y)
    steps = steps_of(data, warn=style["by"] == "layer")
    titles = panel_titles(data, order)
    for row, kind in enumerate(kinds):
        label = f" · {kind_label(kind)}" if kind_label(kind) else ""
        for ax, run in zip(grid[row], order, strict=True):
            frame = of_kind(data.loc[data["run"] == run], kind)
            fit = pooled_fit(fits, run, frame) if len(frame) else None
            _scatter_panel(ax, frame, steps, style)
            _fit_line(ax, frame, fit)
            r = np.nan if fit is None else float(fit["pearson_r"])
            panel_title(ax, f"{titles[run]}{label} ({format_r(r)})")
            ax.set_xlabel(X_LABEL)
            if scientific:
                scientific_axes(ax)
            light_grid(ax)
        grid[row, 0].set_ylabel(y_label(y))
    _decorate(figure, grid, style, steps)
    if title:
        figure.suptitle(title)
    return finish(figure)
