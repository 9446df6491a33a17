"""Figures of the weight-decomposition analysis: the paper's Figure 2 and a trajectory view.

Both functions follow the seaborn/pandas manner: a tidy deltas table in, a
:class:`matplotlib.figure.Figure` out, optional ``axes=`` to draw into the caller's own
layout. Figures are built with :class:`~matplotlib.figure.Figure`, not ``pyplot``, so that
nothing registers in pyplot's global figure list: a CLI that draws hundreds of figures
leaks no memory, tests run headless, and in Jupyter the returned figure still displays
when it is the last expression of a cell (or via ``IPython.display.display(fig)``).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import matplotlib as mpl
import numpy as np
import pandas as pd
from matplotlib import patheffects
from matplotlib.axes import Axes
from matplotlib.colors import BoundaryNorm, Colormap, Normalize
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from wdanalysis.errors import WDAnalysisError
from wdanalysis.plots.kinds import identity_frame, kind_label, kinds_of, of_kind, pooled_fit
from wdanalysis.stats.fits import drop_undefined, fit_lines, select_module, validate_deltas
from wdanalysis.table.schema import IDENTITY_COLUMNS, with_y

__all__ = [
    "PAPER_ORDER",
    "STEP_MARKERS",
    "order_runs",
    "plot_figure2",
    "plot_trajectories",
]

#: Panel order of the paper; other methods follow in input order.
PAPER_ORDER: tuple[str, ...] = ("FT", "LoRA", "DoRA")
#: One marker per step (recycled past ten steps, with a warning).
STEP_MARKERS: tuple[str, ...] = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">")
#: Line styles that tell kinds of matrices apart (encoder/decoder, self/cross, components).
STACK_STYLES: tuple[str, ...] = ("-", "--", ":", "-.")

X_LABEL = "ΔD (direction change)"
Y_LABEL = "ΔM (magnitude change)"
Y_LABEL_LEARNED = "ΔM learned (decay's shrinkage removed)"
FIT_GID = "fit-line"


# --------------------------------------------------------------------------- data preparation


def order_runs(deltas: pd.DataFrame, runs: Sequence[str] | None = None) -> list[str]:
    """Runs in panel order: as given, else FT, LoRA, DoRA first (as in the paper), then input order.

    ``runs`` may name runs or method labels; a method label stands for all its runs.
    """
    present = list(dict.fromkeys(deltas["run"].astype(str)))
    if runs is not None:
        chosen: list[str] = []
        for name in runs:
            by_method = deltas.loc[deltas["method"].astype(str) == str(name), "run"]
            hits = [str(name)] if str(name) in present else list(dict.fromkeys(by_method))
            if not hits:
                raise WDAnalysisError(
                    f"no run or method called {name!r}; runs present: {', '.join(present)}"
                )
            chosen += [run for run in hits if run not in chosen]
        return chosen
    method_of = deltas.groupby("run", sort=False)["method"].first()
    rank = {m.lower(): i for i, m in enumerate(PAPER_ORDER)}
    return sorted(present, key=lambda run: rank.get(str(method_of[run]).lower(), len(rank)))


def _prepare(
    deltas: pd.DataFrame, module: str | None, runs: Sequence[str] | None
) -> tuple[pd.DataFrame, list[str]]:
    """Validate, drop undefined rows, select one module and fix the panel order."""
    validate_deltas(deltas)
    data = select_module(drop_undefined(deltas), module)
    data = data.assign(run=data["run"].astype(str))
    order = order_runs(data, runs)
    return data.loc[data["run"].isin(order)], order


def _panel_titles(data: pd.DataFrame, order: list[str]) -> dict[str, str]:
    """Method name per panel; the run name is added only where two runs share a method."""
    method_of = data.groupby("run", sort=False)["method"].first().astype(str)
    counts = method_of.loc[order].value_counts()
    return {
        run: method_of[run] if counts[method_of[run]] == 1 else f"{method_of[run]} · {run}"
        for run in order
    }


def _layer_colours(data: pd.DataFrame, cmap: str | Colormap) -> tuple[Colormap, Normalize] | None:
    """A discrete norm over the layer indices (one colour band per layer), or None if unknown."""
    layers = pd.to_numeric(data["layer"], errors="coerce").dropna()
    if layers.empty:
        return None
    low, high = int(layers.min()), int(layers.max())
    colormap = mpl.colormaps[cmap] if isinstance(cmap, str) else cmap
    colormap = colormap.with_extremes(bad="0.55")  # a row without a layer shows grey
    norm = BoundaryNorm(np.arange(low - 0.5, high + 1.5), colormap.N)
    return colormap, norm


def _steps(data: pd.DataFrame) -> list:
    """Known steps ascending, then <NA> if some checkpoint had an unknown step."""
    steps = sorted(int(s) for s in data["step"].dropna().unique())
    if data["step"].isna().any():
        steps.append(pd.NA)
    if len(steps) > len(STEP_MARKERS):
        warnings.warn(
            f"{len(steps)} steps but only {len(STEP_MARKERS)} distinct markers: markers repeat; "
            "select fewer steps for a readable figure",
            UserWarning,
            stacklevel=3,
        )
    return steps


def _at_step(frame: pd.DataFrame, step) -> pd.DataFrame:
    return frame.loc[frame["step"].isna()] if step is pd.NA else frame.loc[frame["step"] == step]


def _step_label(step) -> str:
    return "unknown" if step is pd.NA else str(step)


# --------------------------------------------------------------------------- figure scaffolding


def _axes_grid(
    nrows: int,
    ncols: int,
    axes,
    figsize: tuple[float, float] | None,
    dpi: float | None,
    sharex: bool | str,
    sharey: bool | str,
) -> tuple[Figure, np.ndarray]:
    """A fresh constrained-layout figure, or the caller's axes checked for the right count."""
    if axes is not None:
        grid = np.asarray(axes, dtype=object).reshape(-1)
        if grid.size != nrows * ncols:
            raise ValueError(f"need {nrows * ncols} axes (one per panel), got {grid.size}")
        return grid[0].get_figure(), grid.reshape(nrows, ncols)
    size = figsize or (3.3 * ncols + 1.1, 3.0 * nrows + 0.9)
    figure = Figure(figsize=size, dpi=dpi or 100, layout="constrained")
    grid = figure.subplots(nrows, ncols, sharex=sharex, sharey=sharey, squeeze=False)
    return figure, grid


def _scientific(ax: Axes, axes: Sequence[str] = ("x", "y")) -> None:
    """×10⁻ⁿ multipliers instead of long decimals: ΔM and ΔD are often ~1e-4."""
    for axis in axes:
        try:
            ax.ticklabel_format(
                axis=axis, style="sci", scilimits=(-2, 3), useMathText=True, useOffset=False
            )
        except AttributeError:  # a non-scalar formatter (e.g. log axis) keeps its own
            pass


def _colourbar(figure: Figure, axes: np.ndarray, colours, label: str = "layer") -> None:
    colormap, norm = colours
    mappable = mpl.cm.ScalarMappable(norm=norm, cmap=colormap)
    bar = figure.colorbar(mappable, ax=list(axes.ravel()), label=label, fraction=0.05, pad=0.02)
    bar.ax.yaxis.set_major_locator(MaxNLocator(nbins=8, integer=True))
    bar.ax.minorticks_off()


def _legend(figure: Figure, axes: np.ndarray, handles: list, title: str) -> None:
    """Below the panels when we own the layout (never over data), else in the last panel."""
    if not handles:
        return
    if isinstance(figure.get_layout_engine(), mpl.layout_engine.ConstrainedLayoutEngine):
        figure.legend(
            handles=handles,
            loc="outside lower center",
            ncols=min(len(handles), 7),
            title=title,
            frameon=False,
            handletextpad=0.3,
            columnspacing=1.2,
        )
    else:
        axes.ravel()[-1].legend(handles=handles, title=title, fontsize="small", loc="best")


# --------------------------------------------------------------------------- Figure 2


def _format_r(r: float) -> str:
    return "r = n/a" if not np.isfinite(r) else f"r = {r:.2f}".replace("-", "−")


def _scatter_panel(ax: Axes, frame: pd.DataFrame, steps: list, colours, size: float) -> None:
    """One scatter collection per step (its marker), coloured by layer."""
    for step, marker in zip(steps, _cycle(STEP_MARKERS, len(steps)), strict=True):
        at = _at_step(frame, step)
        if at.empty:
            continue
        style = {"marker": marker, "s": size, "edgecolors": "0.15", "linewidths": 0.4}
        if colours is None:
            ax.scatter(at["delta_d"], at["delta_m"], color="C0", **style)
        else:
            layer = pd.to_numeric(at["layer"], errors="coerce").to_numpy(float, na_value=np.nan)
            ax.scatter(
                at["delta_d"], at["delta_m"], c=layer, cmap=colours[0], norm=colours[1], **style
            )


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


def _cycle(items: Sequence[str], n: int) -> list[str]:
    return [items[i % len(items)] for i in range(n)]


def plot_figure2(
    deltas: pd.DataFrame,
    module: str | None = None,
    runs: Sequence[str] | None = None,
    *,
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
    y: str = "delta_m",
) -> Figure:
    """The paper's Figure 2: ΔM against ΔD, one panel per run, with the fitted line.

    Where the module comes in several kinds (T5's encoder self-, decoder self- and
    cross-attention; SDXL's two text encoders; a UNet's ``attn1``/``attn2``), each kind has
    its own row of panels and its own fit; ``pool=True`` draws the paper's one cloud of
    points per run instead.

    Colour = layer (colourbar), marker = step (legend below the panels), black line = least
    squares ΔM-on-ΔD fit across the data's ΔD range; each panel is titled with its method
    and pooled Pearson r. ``module`` picks the weight ("query" = paper Fig. 2, "value" =
    Fig. 6; exact names like "q_proj" work too) and is required when several are present.
    ``fits`` (from :func:`wdanalysis.stats.fits.fit_lines`) avoids refitting. Panels follow
    ``runs`` if given, else FT, LoRA, DoRA, then other methods in input order. With
    ``axes=`` the panels are drawn into the caller's axes (one per run) and the legend goes
    into the last one; ``y="delta_m_learned"``: ΔM less the decay's shrinkage. Returns it.
    """
    data, order = _prepare(with_y(deltas, y), module, runs)
    if fits is None:
        fits = fit_lines(data, per_step=False, pool=pool)
    kinds = kinds_of(data, pool)
    figure, grid = _axes_grid(len(kinds), len(order), axes, figsize, dpi, sharex, sharey)
    colours = _layer_colours(data, cmap)
    steps = _steps(data)
    titles = _panel_titles(data, order)
    for row, kind in enumerate(kinds):
        label = f" · {kind_label(kind)}" if kind_label(kind) else ""
        for ax, run in zip(grid[row], order, strict=True):
            frame = of_kind(data.loc[data["run"] == run], kind)
            fit = pooled_fit(fits, run, frame) if len(frame) else None
            _scatter_panel(ax, frame, steps, colours, marker_size)
            _fit_line(ax, frame, fit)
            r = np.nan if fit is None else float(fit["pearson_r"])
            ax.set_title(f"{titles[run]}{label} ({_format_r(r)})")
            ax.set_xlabel(X_LABEL)
            if scientific:
                _scientific(ax)
            ax.grid(True, lw=0.4, alpha=0.4)
        grid[row, 0].set_ylabel(Y_LABEL if y == "delta_m" else Y_LABEL_LEARNED)
    if colours is not None:
        _colourbar(figure, grid, colours)
    handles = [
        Line2D([], [], ls="", marker=m, mfc="0.7", mec="0.15", ms=6.5, label=_step_label(s))
        for s, m in zip(steps, _cycle(STEP_MARKERS, len(steps)), strict=True)
    ]
    handles.append(Line2D([], [], color="black", lw=1.6, label="least-squares fit"))
    _legend(figure, grid, handles, title="training step")
    if title:
        figure.suptitle(title)
    return figure


# --------------------------------------------------------------------------- trajectories


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


def _trajectory_lines(
    ax_m: Axes, ax_d: Axes, frame: pd.DataFrame, colours, styles: dict[str, str]
) -> None:
    """One line per weight matrix (parameter key, and module: the parts of a fused weight
    share its key), coloured by its layer, styled by kind."""
    key = ["parameter", "module"] if "parameter" in frame.columns else ["layer", "module"]
    columns = [c for c in IDENTITY_COLUMNS if c in frame.columns]
    for _, weight in frame.sort_values("step").groupby(key, sort=False, dropna=False):
        layer = pd.to_numeric(weight["layer"], errors="coerce").iloc[0]
        colour = "C0" if colours is None or pd.isna(layer) else colours[0](colours[1](layer))
        kind = kind_label(identity_frame(weight, columns).iloc[0].to_dict()) if columns else ""
        style = {"color": colour, "ls": styles.get(kind, "-"), "lw": 1.1, "marker": "o", "ms": 2.5}
        ax_m.plot(weight["step"].to_numpy(float), weight["delta_m"].to_numpy(float), **style)
        ax_d.plot(weight["step"].to_numpy(float), weight["delta_d"].to_numpy(float), **style)


def _step_ticks(ax: Axes, steps: pd.Series) -> None:
    """Tick exactly at the checkpoints' steps when they are few; otherwise round numbers."""
    known = sorted(int(s) for s in steps.dropna().unique())
    if len(known) <= 6 and len(known) * len(str(max(known))) <= 24:  # labels must not collide
        ax.set_xticks(known)
    else:
        ax.xaxis.set_major_locator(MaxNLocator(nbins=6, integer=True))


def plot_trajectories(
    deltas: pd.DataFrame,
    module: str | None = None,
    runs: Sequence[str] | None = None,
    *,
    sharex: bool | str = "col",
    sharey: bool | str = False,
    axes: Sequence[Axes] | None = None,
    figsize: tuple[float, float] | None = None,
    dpi: float | None = None,
    cmap: str | Colormap = "viridis",
    scientific: bool = True,
    title: str | None = None,
) -> Figure:
    """ΔM (top row) and ΔD (bottom row) against training step, one column per run.

    Each line is one weight matrix, coloured by layer; kinds of matrices (encoder/decoder,
    self/cross-attention, pipeline components) differ in line style. Figure 2 collapses
    time into markers; this view shows the dynamics (does direction change saturate while
    magnitude keeps growing?).
    ``axes`` takes a 2×len(runs) grid (row-major) to draw into.
    """
    data, order = _prepare(deltas, module, runs)
    data = _known_steps(data)
    order = [run for run in order if (data["run"] == run).any()]
    figure, grid = _axes_grid(2, len(order), axes, figsize, dpi, sharex, sharey)
    colours = _layer_colours(data, cmap)
    stacks = sorted({kind_label(kind) for kind in kinds_of(data)})
    styles = dict(zip(stacks, _cycle(STACK_STYLES, len(stacks)), strict=True))
    titles = _panel_titles(data, order)
    for column, run in enumerate(order):
        ax_m, ax_d = grid[0, column], grid[1, column]
        _trajectory_lines(ax_m, ax_d, data.loc[data["run"] == run], colours, styles)
        ax_m.set_title(titles[run])
        ax_d.set_xlabel("training step")
        for ax in (ax_m, ax_d):
            _step_ticks(ax, data["step"])
            if scientific:
                _scientific(ax, axes=("y",))  # steps stay plain integers
            ax.grid(True, lw=0.4, alpha=0.4)
    grid[0, 0].set_ylabel("ΔM (magnitude)")
    grid[1, 0].set_ylabel("ΔD (direction)")
    if colours is not None:
        _colourbar(figure, grid, colours)
    if len(stacks) > 1:
        handles = [Line2D([], [], color="0.3", ls=styles[s], label=s or "(none)") for s in stacks]
        _legend(figure, grid, handles, title="kind")
    if title:
        figure.suptitle(title)
    return figure
