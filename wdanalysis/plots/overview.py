"""The report's overview figures: Figure 2 and the trajectories of every module on one page.

One row of panels per module (and per kind of matrix where a module comes in several), so
the file names never depend on how many modules a table holds, and one page shows the
whole comparison. The panels follow the per-module figures' designs
(:func:`~wdanalysis.plots.figures.plot_figure2`,
:func:`~wdanalysis.plots.trajectories.plot_trajectories`): colour = layer and marker =
step up to :data:`~wdanalysis.plots.common.MANY_LAYERS` layers, colour = step beyond; one
line per weight matrix, or depth-group medians beyond. They are drawn by
:class:`~wdanalysis.plots.facets.Facets` (one Axes for the page), which keeps a page of
dozens of panels about as cheap as one ordinary figure (docs/guides/report.md).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from matplotlib.collections import LineCollection, PolyCollection
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from wdanalysis.plots.common import (
    MANY_LAYERS,
    X_LABEL,
    cycle,
    layer_colours,
    n_layers,
    order_runs,
    panel_titles,
    y_label,
)
from wdanalysis.plots.facets import Box, Facets, nice_ticks
from wdanalysis.plots.figures import FIT_GID, STEP_MARKERS, format_r, point_style, steps_of
from wdanalysis.plots.kinds import kind_label
from wdanalysis.plots.panels import overview_rows, row_panels
from wdanalysis.plots.trajectories import depth_groups, depth_palette

__all__ = [
    "TRAJECTORY_GID",
    "overview_rows",
    "plot_figure2_overview",
    "plot_trajectories_overview",
    "row_panels",
]

_KEY_WIDTH = 1.0  # inches right of the panels for the colour key
TRAJECTORY_GID = "trajectory-lines"


def _row_name(module: str, kind: dict) -> str:
    label = kind_label(kind)
    return f"{module} · {label}" if label else module


def _colour_key(facets: Facets, colours, label: str, labels: Sequence[str] | None = None):
    """A discrete colour key right of the panels: one band per value, a few labelled."""
    colormap, norm = colours
    bounds = np.asarray(norm.boundaries, float)
    values = (bounds[:-1] + bounds[1:]) / 2
    x0 = facets.width - _KEY_WIDTH + 0.15
    top, height = facets.top, min(2.6, facets.height - facets.top - 1.2)
    step = height / len(values)
    bands = [
        [(x0, top + i * step), (x0 + 0.15, top + i * step), (x0 + 0.15, top + (i + 1) * step)]
        + [(x0, top + (i + 1) * step)]
        for i in range(len(values))
    ]
    facets.ax.add_collection(PolyCollection(bands, facecolors=colormap(norm(values))))
    names = list(labels) if labels is not None else [str(int(v)) for v in values]
    every = max(1, -(-len(values) // 8))
    for i in range(0, len(values), every):
        y = top + (i + 0.5) * step
        facets.text(x0 + 0.22, y, names[i], va="center", fontsize=7)
    facets.text(x0, top - 0.08, label, va="bottom", fontsize=8)


def _step_codes(data: pd.DataFrame, steps: list) -> np.ndarray:
    """Each row's rank among ``steps`` (the unknown step, if any, is the last)."""
    known = [s for s in steps if s is not pd.NA]
    codes = pd.Series(data["step"]).map({s: i for i, s in enumerate(known)})
    return codes.fillna(len(known)).to_numpy(int)


def _line_fit(x: np.ndarray, y: np.ndarray) -> tuple[float, float, float]:
    """Least-squares slope, intercept and Pearson r, as ``fit_one`` defines them (NaN when
    fewer than 2 points or ΔD constant; r NaN when y is constant)."""
    if len(x) < 2 or np.all(x == x[0]):
        return np.nan, np.nan, np.nan
    dx, dy = x - x.mean(), y - y.mean()
    slope = float(dx @ dy / (dx @ dx))
    intercept = float(y.mean() - slope * x.mean())
    spread = float(np.sqrt((dx @ dx) * (dy @ dy)))
    return slope, intercept, float(dx @ dy / spread) if spread > 0 else np.nan


def _collect(points: dict, box: Box, panel: dict) -> None:
    """Add a panel's points, in page inches, to ``points`` (step rank → arrays)."""
    for rank in np.unique(panel["code"]):
        at = panel["code"] == rank
        mine = points.setdefault(int(rank), {"x": [], "y": [], "layer": []})
        mine["x"].append(box.x(panel["x"][at]))
        mine["y"].append(box.y(panel["y"][at]))
        mine["layer"].append(panel["layer"][at])


def _scatter(facets: Facets, points: dict, steps: list, style: dict) -> None:
    """One collection per step for the whole page (panels never overlap, and one
    collection draws far faster than one per panel): its marker and layer colours, or
    its step colour."""
    markers = cycle(STEP_MARKERS, len(steps)) if style["by"] == "layer" else ["o"] * len(steps)
    for rank, marker in enumerate(markers):
        if rank not in points:
            continue
        x, y, layer = (np.concatenate(points[rank][key]) for key in ("x", "y", "layer"))
        kw = {"marker": marker, "s": style["size"], "edgecolors": "0.15", "linewidths": 0.3}
        if style["by"] == "step":
            value = np.full(len(x), np.nan if steps[rank] is pd.NA else float(rank))
            kw.update(c=value, cmap=style["colours"][0], norm=style["colours"][1], alpha=0.85)
        elif style["colours"] is None:
            kw["color"] = "C0"
        else:
            kw.update(c=layer, cmap=style["colours"][0], norm=style["colours"][1])
        facets.ax.scatter(x, y, **kw)


def _columns(data: pd.DataFrame, y: str) -> dict[str, np.ndarray]:
    """The numeric columns the panels draw, as arrays."""
    return {
        "x": data["delta_d"].to_numpy(float),
        "y": data[y].to_numpy(float),
        "layer": pd.to_numeric(data["layer"], errors="coerce").to_numpy(float, na_value=np.nan),
    }


def plot_figure2_overview(
    deltas: pd.DataFrame,
    *,
    y: str = "delta_m",
    pool: bool = False,
    runs: Sequence[str] | None = None,
    dpi: float = 100,
) -> Figure:
    """Figure 2 of every module on one page: a row of panels per module (and kind), a column
    per run; ΔM (or ``y``) against ΔD with the least-squares line and r in each title (the
    pooled fit of ``fits.csv``: same rows, same formulas).

    ``deltas`` holds only defined rows (:func:`wdanalysis.stats.fits.drop_undefined`).
    """
    data = deltas.assign(run=deltas["run"].astype(str)).reset_index(drop=True)
    order = order_runs(data, runs)
    rows = overview_rows(data, pool)
    facets = Facets(len(rows), len(order), left=1.05, right=_KEY_WIDTH, top=0.55, bottom=1.1)
    facets.figure.set_dpi(dpi)
    style = point_style(data, "auto", "viridis", 16.0, y)
    steps = steps_of(data, warn=False)
    titles = panel_titles(data, order)
    arrays = {**_columns(data, y), "code": _step_codes(data, steps)}
    panels = row_panels(data, rows, order, arrays)
    lines, points = [], {}
    for r, (module, kind) in enumerate(rows):
        facets.row_label(r, f"{_row_name(module, kind)}\n{y_label(y, short=True)}")
        for c, run in enumerate(order):
            panel = panels[r, run]
            box = facets.box(r, c, panel["x"], panel["y"])
            _collect(points, box, panel)
            slope, intercept, r_value = _line_fit(panel["x"], panel["y"])
            if np.isfinite(slope):
                xs = (float(panel["x"].min()), float(panel["x"].max()))
                segment = box.clip_line(xs, slope, intercept)
                lines += [segment] if segment is not None else []
            facets.title(r, c, f"{titles[run]} ({format_r(r_value)})")
    _scatter(facets, points, steps, style)
    halo = LineCollection(lines, colors="white", linewidths=3.4, alpha=0.8, zorder=3)
    facets.ax.add_collection(halo)
    fit = LineCollection(lines, colors="black", linewidths=1.5, zorder=3, gid=FIT_GID)
    facets.ax.add_collection(fit)
    for c in range(len(order)):
        facets.x_label(c, X_LABEL)
    _figure2_keys(facets, style, steps)
    return facets.finish()


def _figure2_keys(facets: Facets, style: dict, steps: list) -> None:
    fit = Line2D([], [], color="black", lw=1.5, label="least-squares fit")
    known = [s for s in steps if s is not pd.NA]
    if style["by"] == "step":
        _colour_key(facets, style["colours"], "training step", [str(s) for s in known])
        handles, title = [fit], ""
    else:
        if style["colours"] is not None:
            _colour_key(facets, style["colours"], "layer")
        handles = [
            Line2D([], [], ls="", marker=m, mfc="0.7", mec="0.15", ms=6, label=str(s))
            for s, m in zip(steps, cycle(STEP_MARKERS, len(steps)), strict=True)
        ]
        handles, title = [*handles, fit], "training step"
    facets.figure.legend(
        handles=handles,
        loc="lower center",
        bbox_to_anchor=(0.5, 0.0),
        ncols=min(len(handles), 7),
        title=title or None,
        frameon=False,
        fontsize=8,
        title_fontsize=8,
    )


def _weights(panel: dict) -> list[np.ndarray]:
    """Positions of each weight matrix's points in a panel, ordered by step."""
    order = np.lexsort((panel["step"], panel["weight"]))
    cuts = np.flatnonzero(np.diff(panel["weight"][order])) + 1
    return np.split(order, cuts) if len(order) else []


def _trajectory_lines(panel: dict, column: str, summary: bool, colours, palette) -> list:
    """(path, colour, width, alpha) per weight matrix, or per depth group its layers thin
    and their median per step bold."""
    steps, values = panel["step"], panel[column]
    if not summary:
        lines = []
        for at in _weights(panel):
            layer = panel["layer"][at[0]]
            colour = "C0" if colours is None or np.isnan(layer) else colours[0](colours[1](layer))
            lines.append((np.column_stack([steps[at], values[at]]), colour, 1.0, 1.0))
        return lines
    groups = depth_groups(pd.Series(panel["layer"])).to_numpy()
    thin, bold = [], []
    for group in dict.fromkeys(groups):
        mine = groups == group
        for at in _weights(panel):
            if mine[at[0]]:
                path = np.column_stack([steps[at], values[at]])
                thin.append((path, palette[group], 0.6, 0.25))
        known = np.unique(steps[mine])
        median = [np.median(values[mine & (steps == s)]) for s in known]
        bold.append((np.column_stack([known, median]), palette[group], 2.0, 1.0))
    return thin + bold


def plot_trajectories_overview(
    deltas: pd.DataFrame,
    *,
    y: str = "delta_m",
    runs: Sequence[str] | None = None,
    dpi: float = 100,
) -> Figure:
    """ΔM (or ``y``) and ΔD against training step for every module on one page: a row per
    module (and kind), two columns per run (``y``, then ΔD); steps share one scale.

    One line per weight matrix coloured by layer up to
    :data:`~wdanalysis.plots.common.MANY_LAYERS` layers; beyond, four depth groups, each a
    bold median over its layers drawn thin behind it. Rows with an unknown step are left out.
    """
    data = deltas.loc[deltas["step"].notna()].reset_index(drop=True)
    data = data.assign(run=data["run"].astype(str))
    order = [run for run in order_runs(data, runs) if (data["run"] == run).any()]
    rows = overview_rows(data)
    columns = [(run, column) for run in order for column in (y, "delta_d")]
    summary = n_layers(data) > MANY_LAYERS
    margins = {"left": 1.05, "right": _KEY_WIDTH, "top": 0.65, "bottom": 1.1 if summary else 0.6}
    # step labels only under the bottom row: rows sit closer than Figure 2's
    facets = Facets(len(rows), len(columns), (1.75, 1.2), hgap=0.3, **margins)
    facets.figure.set_dpi(dpi)
    colours = None if summary else layer_colours(data, "viridis")
    palette = depth_palette(data, "viridis") if summary else {}
    x_ticks = nice_ticks(*_steps_range(data))
    x_ticks = (x_ticks[0], [t for t in x_ticks[1] if float(t).is_integer()])
    titles = panel_titles(data, order)
    key = ["parameter", "module"] if "parameter" in data.columns else ["layer", "module"]
    weight = data.groupby(key, sort=False, dropna=False).ngroup().to_numpy()
    arrays = {**_columns(data, y), "step": data["step"].to_numpy(float), "weight": weight}
    panels = row_panels(data, rows, order, {**arrays, "delta_d": arrays["x"], y: arrays["y"]})
    paths, styles = [], []
    for r, (module, kind) in enumerate(rows):
        facets.row_label(r, _row_name(module, kind))
        for c, run in enumerate(order):
            for k, column in enumerate((y, "delta_d")):
                panel = panels[r, run]
                last = r == len(rows) - 1
                box = facets.box(r, 2 * c + k, [], panel[column], last, x_ticks)
                for path, colour, width, alpha in _trajectory_lines(
                    panel, column, summary, colours, palette
                ):
                    paths.append(np.column_stack([box.x(path[:, 0]), box.y(path[:, 1])]))
                    styles.append((colour, width, alpha))
    for c, (run, column) in enumerate(columns):
        facets.column_head(c, f"{titles[run]} · {y_label(column, short=True)}")
        facets.x_label(c, "training step")
    _add_paths(facets, paths, styles)
    _trajectory_keys(facets, colours, palette)
    return facets.finish()


def _steps_range(data: pd.DataFrame) -> tuple[float, float]:
    steps = pd.to_numeric(data["step"], errors="coerce").dropna()
    return (float(steps.min()), float(steps.max())) if len(steps) else (0.0, 1.0)


def _add_paths(facets: Facets, paths: list, styles: list) -> None:
    if not paths:
        return
    colours = [(*_rgb(colour), alpha) for colour, _, alpha in styles]
    widths = [width for _, width, _ in styles]
    collection = LineCollection(paths, colors=colours, linewidths=widths, gid=TRAJECTORY_GID)
    facets.ax.add_collection(collection)
    points = [p for p, (_, width, alpha) in zip(paths, styles, strict=True) if alpha == 1.0]
    if points and all(width < 1.5 for _, width, _ in styles):  # one line per matrix: mark steps
        xy = np.concatenate(points)
        facets.ax.scatter(xy[:, 0], xy[:, 1], s=4, color="0.3", linewidths=0, zorder=3)


def _rgb(colour) -> tuple[float, float, float]:
    from matplotlib.colors import to_rgb

    return to_rgb(colour)


def _trajectory_keys(facets: Facets, colours, palette: dict) -> None:
    if colours is not None:
        _colour_key(facets, colours, "layer")
        return
    if palette:
        handles = [Line2D([], [], color=c, lw=2.0, label=g) for g, c in palette.items()]
        facets.figure.legend(
            handles=handles,
            loc="lower center",
            bbox_to_anchor=(0.5, 0.0),
            ncols=len(handles),
            title="depth group (bold: median)",
            frameon=False,
            fontsize=8,
            title_fontsize=8,
        )
