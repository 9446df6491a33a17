"""The layer × step heatmaps of ``index.html``: coloured HTML tables, no image to draw.

One table per run, quantity (ΔM or ``y``, ΔD), module and kind of matrix: a row per layer,
a column per step, each cell painted on the panel's own colour scale (viridis, or RdBu
centred on zero where values take both signs — as :func:`~wdanalysis.plots.heatmap.plot_heatmap`
colours its PNG) with its exact value in a tooltip. A strip under each table is its colour
key. Readable at 80 layers (cells shrink to a few pixels), copyable, and free to draw; the
PNG/SVG heatmaps are drawn on request (``figures="all"``).
"""

from __future__ import annotations

from html import escape

import matplotlib as mpl
import numpy as np
import pandas as pd
from matplotlib.colors import TwoSlopeNorm

from wdanalysis.plots.kinds import kind_label
from wdanalysis.plots.naming import order_runs, panel_titles, y_label
from wdanalysis.plots.panels import overview_rows, row_panels
from wdanalysis.plots.scales import colour_norm

__all__ = ["HEATMAP_CSS", "grid_of", "heatmap_section"]

HEATMAP_CSS = """
.hm{display:flex;flex-wrap:wrap;gap:6px 22px;margin:.3rem 0 1rem}
.hm table{border-collapse:collapse;margin:0;font-size:11px}
.hm td,.hm th{border:0;padding:0 2px;white-space:nowrap;font-weight:normal;background:none}
.hm td.c{padding:0;min-width:16px}.hm th{color:#57606a}
.hm caption{text-align:left;font-size:12px;font-weight:600;padding-bottom:2px}
.key{height:8px;margin-top:3px}.keyl{display:flex;justify-content:space-between;font-size:10px;
color:#57606a}
"""


def _hex(colours: np.ndarray) -> list[str]:
    return [f"#{r:02x}{g:02x}{b:02x}" for r, g, b in colours[:, :3]]


def _fmt(value: float) -> str:
    return "—" if not np.isfinite(value) else f"{value:.3g}".replace("-", "−")


def grid_of(layer: np.ndarray, step: np.ndarray, value: np.ndarray):
    """:func:`~wdanalysis.plots.heatmap.heatmap_grid` on arrays: the (layers × steps) means
    of ``value`` (NaN where no value), rows with an unknown layer or step left out."""
    known = np.isfinite(layer) & np.isfinite(step)
    layers, rows = np.unique(layer[known], return_inverse=True)
    steps, cols = np.unique(step[known], return_inverse=True)
    sums = np.zeros((len(layers), len(steps)))
    counts = np.zeros_like(sums)
    np.add.at(sums, (rows, cols), value[known])
    np.add.at(counts, (rows, cols), 1)
    with np.errstate(invalid="ignore"):
        means = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
    return means, [int(v) for v in layers], [int(v) for v in steps]


def _table(panel: dict, column: str, caption: str) -> str:
    """One heatmap: rows = layers (top: first), columns = steps, its key underneath."""
    values, layers, steps = grid_of(panel["layer"], panel["step"], panel[column])
    if not layers:
        return f"<table><caption>{escape(caption)}</caption><tr><td>no value</td></tr></table>"
    norm = colour_norm(values)
    name = "RdBu_r" if isinstance(norm, TwoSlopeNorm) else "viridis"
    colormap = mpl.colormaps[name]
    finite = np.isfinite(values)
    rgba = colormap(norm(np.where(finite, values, 0.0)), bytes=True).reshape(-1, 4)
    colours = np.array(_hex(rgba), dtype=object).reshape(values.shape)
    colours[~finite] = "#d9d9d9"
    height = max(3, min(14, 320 // max(len(layers), 1)))
    every = max(1, -(-len(layers) // 16))
    head = "".join(f"<th>{s}</th>" for s in steps)
    body = []
    for i, layer in enumerate(layers):
        label = str(layer) if i % every == 0 else ""
        cells = "".join(
            f'<td class="c" style="background:{colours[i, j]};height:{height}px" '
            f'title="layer {layer}, step {steps[j]}: {_fmt(values[i, j])}"></td>'
            for j in range(len(steps))
        )
        body.append(f"<tr><th>{label}</th>{cells}</tr>")
    stops = _hex(colormap(np.linspace(0, 1, 9), bytes=True))
    low, high = float(norm.vmin), float(norm.vmax)
    key = (
        f'<tr><td></td><td colspan="{len(steps)}"><div class="key" style="background:'
        f'linear-gradient(to right,{",".join(stops)})"></div><div class="keyl"><span>'
        f"{_fmt(low)}</span><span>{_fmt(high)}</span></div></td></tr>"
    )
    return (
        f"<table><caption>{escape(caption)}</caption><tr><th>layer</th>{head}</tr>"
        + "".join(body)
        + key
        + "</table>"
    )


def heatmap_section(deltas: pd.DataFrame, y: str = "delta_m") -> str:
    """The heatmaps of every module, kind and run, as HTML (``deltas``: defined rows)."""
    data = deltas.reset_index(drop=True)
    data = data.assign(run=data["run"].astype(str))
    order = order_runs(data)
    titles = panel_titles(data, order)
    rows = overview_rows(data)
    arrays = {
        "layer": pd.to_numeric(data["layer"], errors="coerce").to_numpy(float, na_value=np.nan),
        "step": pd.to_numeric(data["step"], errors="coerce").to_numpy(float, na_value=np.nan),
        y: data[y].to_numpy(float),
        "delta_d": data["delta_d"].to_numpy(float),
    }
    panels = row_panels(data, rows, order, arrays)
    parts = [
        "<h2 id='heatmaps'>Heatmaps</h2><p class='legend'>Layer × step: each table on its "
        "own colour scale (key underneath; grey: no value); hover a cell for its value. "
        "Columns: training steps.</p>"
    ]
    for r, (module, kind) in enumerate(rows):
        label = kind_label(kind)
        parts.append(f"<h3>module: {escape(module)}{' · ' + escape(label) if label else ''}</h3>")
        tables = [
            _table(panels[r, run], column, f"{titles[run]} · {y_label(column, short=True)}")
            for run in order
            for column in (y, "delta_d")
        ]
        parts.append('<div class="hm">' + "".join(tables) + "</div>")
    return "\n".join(parts)
