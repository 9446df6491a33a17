"""ΔM (or ``y``) and ΔD against training step: the dynamics Figure 2 folds into markers.

Up to :data:`~wdanalysis.plots.common.MANY_LAYERS` layers, one line per weight matrix,
coloured by layer. Beyond (32–80 layers, where one line per layer is spaghetti), the
layers are summarised: split into four contiguous depth groups (first quarter of the
layers, …), each drawn as a bold median line in its own colour of a sequential scale,
with its layers as thin translucent lines behind it (docs/guides/report.md).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Literal

import matplotlib as mpl
import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.colors import Colormap
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from wdanalysis.errors import WDAnalysisError
from wdanalysis.plots.common import (
    MANY_LAYERS,
    axes_grid,
    colourbar,
    cycle,
    layer_colours,
    legend_below,
    light_grid,
    n_layers,
    panel_title,
    panel_titles,
    prepare,
    y_label,
)
from wdanalysis.plots.common import scientific as scientific_axes
from wdanalysis.plots.kinds import identity_frame, kind_label, kinds_of
from wdanalysis.plots.layout import finish
from wdanalysis.table.schema import IDENTITY_COLUMNS

__all__ = ["DEPTH_GROUPS", "STACK_STYLES", "depth_groups", "plot_trajectories"]

#: Line styles that tell kinds of matrices apart (encoder/decoder, self/cross, components).
STACK_STYLES: tuple[str, ...] = ("-", "--", ":", "-.")
#: Contiguous depth groups the layers are summarised in when there are many.
DEPTH_GROUPS = 4


def _known_steps(data: pd.DataFrame) -> pd.DataFrame:
    unknown = int(data["step"].isna().sum())
    if unknown == len(data):
        raise WDAnalysisError(
            "no checkpoint has a known training step, so there is no trajectory to draw",
            hint="name checkpoints with their step (e.g. checkpoint-500) or pass steps explicitly",
        )
    if unknown:
        warnings.warn(
            f"left out {unknown} rows with an unknown step from the trajectories",
            UserWarning,
            stacklevel=3,
        )
    return data.loc[data["step"].notna()]


def depth_groups(layers: pd.Series, groups: int = DEPTH_GROUPS) -> pd.Series:
    """Label each layer index with its contiguous depth group ("layers 0–19", …), the
    layer range split into ``groups`` nearly equal parts; unknown layers: "layer ?"."""
    index = pd.to_numeric(layers, errors="coerce")
    known = np.sort(index.dropna().unique())
    labels = pd.Series("layer ?", index=layers.index, dtype=object)
    for part in np.array_split(known, min(groups, len(known))):
        label = f"layers {int(part[0])}–{int(part[-1])}"
        labels[index.isin(part).to_numpy()] = label
    return labels


def _kind_styles(data: pd.DataFrame) -> tuple[list[str], dict[str, str]]:
    stacks = sorted({kind_label(kind) for kind in kinds_of(data)})
    return stacks, dict(zip(stacks, cycle(STACK_STYLES, len(stacks)), strict=True))


def _kind_of(frame: pd.DataFrame) -> pd.Series:
    columns = [c for c in IDENTITY_COLUMNS if c in frame.columns]
    if not columns:
        return pd.Series("", index=frame.index)
    kinds = identity_frame(frame, columns)
    return kinds.apply(lambda row: " ".join(v for v in row if v), axis=1)


def _weight_lines(axes: tuple[Axes, Axes], frame: pd.DataFrame, colours, styles, ys) -> None:
    """One line per weight matrix (parameter key, and module: the parts of a fused weight
    share its key), coloured by its layer, styled by kind."""
    key = ["parameter", "module"] if "parameter" in frame.columns else ["layer", "module"]
    frame = frame.assign(_kind=_kind_of(frame))
    for _, weight in frame.sort_values("step").groupby(key, sort=False, dropna=False):
        layer = pd.to_numeric(weight["layer"], errors="coerce").iloc[0]
        colour = "C0" if colours is None or pd.isna(layer) else colours[0](colours[1](layer))
        style = {"color": colour, "ls": styles.get(weight["_kind"].iloc[0], "-"), "lw": 1.1}
        for ax, column in zip(axes, ys, strict=True):
            steps = weight["step"].to_numpy(float)
            ax.plot(steps, weight[column].to_numpy(float), marker="o", ms=2.5, **style)


def _summary_lines(axes, frame: pd.DataFrame, palette: dict, styles, ys) -> None:
    """Per depth group and kind: its layers thin and translucent, their median bold."""
    frame = frame.assign(_group=depth_groups(frame["layer"]), _kind=_kind_of(frame))
    key = ["parameter", "module"] if "parameter" in frame.columns else ["layer", "module"]
    for (group, kind), part in frame.groupby(["_group", "_kind"], sort=False):
        style = {"color": palette[group], "ls": styles.get(kind, "-")}
        for ax, column in zip(axes, ys, strict=True):
            for _, weight in part.sort_values("step").groupby(key, sort=False, dropna=False):
                x = weight["step"].to_numpy(float)
                ax.plot(x, weight[column].to_numpy(float), lw=0.6, alpha=0.25, **style)
            median = part.groupby("step")[column].median()
            ax.plot(median.index.to_numpy(float), median.to_numpy(float), lw=2.2, **style)


def _step_ticks(ax: Axes, steps: pd.Series) -> None:
    """Tick exactly at the checkpoints' steps when they are few; otherwise round numbers."""
    known = sorted(int(s) for s in steps.dropna().unique())
    if len(known) <= 6 and len(known) * len(str(max(known))) <= 24:  # labels must not collide
        ax.set_xticks(known)
    else:
        ax.xaxis.set_major_locator(MaxNLocator(nbins=6, integer=True))


def depth_palette(data: pd.DataFrame, cmap: str | Colormap) -> dict[str, tuple]:
    colormap = mpl.colormaps[cmap] if isinstance(cmap, str) else cmap
    groups = list(dict.fromkeys(depth_groups(data["layer"].sort_values())))
    shades = np.linspace(0.0, 0.9, max(len(groups), 2))
    return {group: colormap(shade) for group, shade in zip(groups, shades, strict=False)}


def plot_trajectories(
    deltas: pd.DataFrame,
    module: str | None = None,
    runs: Sequence[str] | None = None,
    *,
    y: str = "delta_m",
    layers: Literal["auto", "each", "summary"] = "auto",
    sharex: bool | str = "col",
    sharey: bool | str = False,
    axes: Sequence[Axes] | None = None,
    figsize: tuple[float, float] | None = None,
    dpi: float | None = None,
    cmap: str | Colormap = "viridis",
    scientific: bool = True,
    title: str | None = None,
) -> Figure:
    """ΔM (or ``y``, top row) and ΔD (bottom row) against training step, one column per run.

    ``layers="each"``: one line per weight matrix, coloured by layer (colourbar).
    ``layers="summary"``: the layers split into four depth groups, each a bold median
    line in its colour with its layers thin behind it (legend). ``"auto"`` (default):
    "each" up to :data:`~wdanalysis.plots.common.MANY_LAYERS` layers. Kinds of matrices
    (encoder/decoder, self/cross-attention, pipeline components) differ in line style.
    ``axes`` takes a 2×len(runs) grid (row-major) to draw into.
    """
    data, order = prepare(deltas, module, runs, y)
    data = _known_steps(data)
    order = [run for run in order if (data["run"] == run).any()]
    figure, grid = axes_grid(2, len(order), axes, figsize, dpi, sharex, sharey)
    summary = layers == "summary" or (layers == "auto" and n_layers(data) > MANY_LAYERS)
    if layers not in ("auto", "each", "summary"):
        raise ValueError(f"layers must be 'auto', 'each' or 'summary', got {layers!r}")
    colours = None if summary else layer_colours(data, cmap)
    palette = depth_palette(data, cmap) if summary else {}
    stacks, styles = _kind_styles(data)
    titles = panel_titles(data, order)
    for column, run in enumerate(order):
        pair = (grid[0, column], grid[1, column])
        rows = data.loc[data["run"] == run]
        if summary:
            _summary_lines(pair, rows, palette, styles, (y, "delta_d"))
        else:
            _weight_lines(pair, rows, colours, styles, (y, "delta_d"))
        panel_title(pair[0], titles[run])
        pair[1].set_xlabel("training step")
        for ax in pair:
            _step_ticks(ax, data["step"])
            if scientific:
                scientific_axes(ax, axes=("y",))  # steps stay plain integers
            light_grid(ax)
    grid[0, 0].set_ylabel(y_label(y, short=True))
    grid[1, 0].set_ylabel(y_label("delta_d", short=True))
    handles = [Line2D([], [], color=c, lw=2.2, label=g) for g, c in palette.items()]
    if colours is not None:
        colourbar(figure, grid, colours)
    if len(stacks) > 1:
        handles += [Line2D([], [], color="0.3", ls=styles[s], label=s or "(none)") for s in stacks]
    legend_below(figure, grid, handles, title="depth group (bold: median)" if summary else "kind")
    if title:
        figure.suptitle(title)
    return finish(figure)
