"""Figure content checks: panels, points, fit lines, legends, files (headless, Agg)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import warnings  # noqa: E402

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
from builders import synthetic_deltas  # noqa: E402
from matplotlib.collections import PathCollection  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from wdanalysis.errors import WDAnalysisError  # noqa: E402
from wdanalysis.plots.common import y_label  # noqa: E402
from wdanalysis.plots.figures import (  # noqa: E402
    FIT_GID,
    X_LABEL,
    Y_LABEL,
    order_runs,
    plot_figure2,
    plot_heatmap,
    plot_trajectories,
)
from wdanalysis.plots.heatmap import HEATMAP_GID  # noqa: E402
from wdanalysis.stats import fit_lines  # noqa: E402
from wdanalysis.storage.atomic_write import save_figure_atomic  # noqa: E402

STEPS = (100, 200, 300)
LAYERS = 6


def make_deltas(
    spec=(("LoRA", 0.83), ("DoRA", -0.31), ("FT", -0.62)),  # deliberately not paper order
    steps=STEPS,
    layers=LAYERS,
    modules=("q_proj",),
    stacks=("",),
    seed=0,
) -> pd.DataFrame:
    return synthetic_deltas(spec, steps, layers, modules, stacks, seed)


def panels(figure: Figure) -> list:
    """Data axes only: colourbars are axes too, labelled '<colorbar>' by matplotlib."""
    return [ax for ax in figure.axes if ax.get_label() != "<colorbar>"]


def colourbars(figure: Figure) -> list:
    return [ax for ax in figure.axes if ax.get_label() == "<colorbar>"]


def scatter_offsets(ax) -> np.ndarray:
    offsets = [c.get_offsets() for c in ax.collections if isinstance(c, PathCollection)]
    return np.concatenate(offsets) if offsets else np.empty((0, 2))


def fit_lines_in(ax) -> list:
    return [line for line in ax.get_lines() if line.get_gid() == FIT_GID]


@pytest.fixture(autouse=True)
def no_pyplot_leak():
    """The API must not register figures with pyplot (no global state, nothing to close)."""
    before = plt.get_fignums()
    yield
    assert plt.get_fignums() == before


# --------------------------------------------------------------------------- Figure 2


def test_figure2_panels_points_titles_in_paper_order():
    deltas = make_deltas()
    figure = plot_figure2(deltas)
    axes = panels(figure)
    assert len(axes) == 3
    fits = fit_lines(deltas, per_step=False).set_index("method")
    for ax, method in zip(axes, ("FT", "LoRA", "DoRA"), strict=True):
        r = fits.loc[method, "pearson_r"]
        assert ax.get_title() == f"{method} (r = {r:.2f})".replace("-", "−")
        points = scatter_offsets(ax)
        assert len(points) == len(STEPS) * LAYERS
        expected = deltas.loc[deltas["method"] == method, ["delta_d", "delta_m"]].to_numpy(float)
        np.testing.assert_allclose(np.sort(points, axis=0), np.sort(expected, axis=0))
        assert ax.get_xlabel() == X_LABEL
    assert axes[0].get_ylabel() == Y_LABEL


def test_figure2_fit_line_spans_data_range_with_fitted_slope():
    deltas = make_deltas()
    figure = plot_figure2(deltas)
    fits = fit_lines(deltas, per_step=False).set_index("method")
    for ax, method in zip(panels(figure), ("FT", "LoRA", "DoRA"), strict=True):
        (line,) = fit_lines_in(ax)
        x, y = (np.asarray(v, dtype=float) for v in line.get_data())
        data = deltas.loc[deltas["method"] == method, "delta_d"]
        assert x.min() == pytest.approx(data.min()) and x.max() == pytest.approx(data.max())
        slope = (y[-1] - y[0]) / (x[-1] - x[0])
        assert slope == pytest.approx(fits.loc[method, "slope"], rel=1e-9)
        assert np.sign(slope) == (1 if method == "LoRA" else -1)


def test_figure2_one_collection_per_step_and_layer_colours():
    figure = plot_figure2(make_deltas())
    ax = panels(figure)[0]
    collections = [c for c in ax.collections if isinstance(c, PathCollection)]
    assert len(collections) == len(STEPS)  # one marker per step
    np.testing.assert_array_equal(collections[0].get_array(), np.arange(LAYERS))
    (bar,) = colourbars(figure)
    assert bar.get_ylabel() == "layer"


def test_figure2_legend_lists_steps_and_fit():
    figure = plot_figure2(make_deltas())
    (legend,) = figure.legends
    labels = [text.get_text() for text in legend.get_texts()]
    assert labels == [*map(str, STEPS), "least-squares fit"]
    assert legend.get_title().get_text() == "training step"


def test_figure2_legend_and_colourbar_do_not_overlap_panels():
    figure = plot_figure2(make_deltas())
    figure.draw_without_rendering()
    renderer = figure._get_renderer()
    legend_box = figure.legends[0].get_window_extent(renderer)
    bar_box = colourbars(figure)[0].get_window_extent(renderer)
    for ax in panels(figure):
        box = ax.get_tightbbox(renderer)  # includes tick labels and axis labels
        assert not box.overlaps(legend_box)
        assert not ax.get_window_extent(renderer).overlaps(bar_box)


def test_figure2_scientific_tick_labels_for_tiny_values():
    figure = plot_figure2(make_deltas())
    figure.draw_without_rendering()
    ax = panels(figure)[0]
    assert ax.yaxis.get_offset_text().get_text() == "×10⁻³"  # plain text, no mathtext
    assert ax.xaxis.get_offset_text().get_text() == "×10⁻⁴"
    plain = plot_figure2(make_deltas(), scientific=False)
    plain.draw_without_rendering()
    assert panels(plain)[0].yaxis.get_offset_text().get_text() == ""


def test_figure2_runs_selection_and_order():
    deltas = make_deltas()
    figure = plot_figure2(deltas, runs=["DoRA", "ft-run"])
    assert [ax.get_title().split()[0] for ax in panels(figure)] == ["DoRA", "FT"]
    assert order_runs(deltas) == ["ft-run", "lora-run", "dora-run"]
    with pytest.raises(WDAnalysisError, match="no run or method called 'nope'"):
        plot_figure2(deltas, runs=["nope"])


def test_figure2_other_methods_keep_input_order_after_paper_ones():
    deltas = make_deltas(spec=(("mine", 0.2), ("DoRA", -0.3), ("alt", 0.1), ("FT", -0.6)))
    assert order_runs(deltas) == ["ft-run", "dora-run", "mine-run", "alt-run"]


def test_figure2_runs_sharing_a_method_get_run_names():
    a, b = make_deltas(spec=(("FT", -0.6),)), make_deltas(spec=(("FT", -0.5),), seed=1)
    b["run"] = "ft-seed1"
    figure = plot_figure2(pd.concat([a, b], ignore_index=True))
    titles = [ax.get_title() for ax in panels(figure)]
    assert titles[0].startswith("FT · ft-run (r = ") and titles[1].startswith("FT · ft-seed1")


def test_figure2_module_selection():
    deltas = make_deltas(modules=("q_proj", "v_proj"))
    with pytest.raises(WDAnalysisError, match="pick one with module="):
        plot_figure2(deltas)
    figure = plot_figure2(deltas, module="value")
    assert len(scatter_offsets(panels(figure)[0])) == len(STEPS) * LAYERS


def test_figure2_shared_axes_figsize_dpi():
    figure = plot_figure2(make_deltas(), sharex=True, sharey=True, figsize=(9, 3), dpi=80)
    axes = panels(figure)
    assert axes[0].get_shared_y_axes().joined(axes[0], axes[2])
    assert axes[0].get_shared_x_axes().joined(axes[0], axes[1])
    assert tuple(figure.get_size_inches()) == (9, 3)
    assert figure.dpi == 80
    independent = panels(plot_figure2(make_deltas()))
    assert not independent[0].get_shared_y_axes().joined(independent[0], independent[1])


def test_figure2_into_callers_axes():
    figure = Figure(figsize=(10, 3))
    axes = figure.subplots(1, 3)
    returned = plot_figure2(make_deltas(), axes=axes)
    assert returned is figure
    assert all(len(scatter_offsets(ax)) == len(STEPS) * LAYERS for ax in axes)
    assert axes[-1].get_legend() is not None
    with pytest.raises(ValueError, match="need 3 axes"):
        plot_figure2(make_deltas(), axes=axes[:2])


def test_figure2_nan_rows_and_undefined_fit():
    deltas = make_deltas()
    deltas.loc[0, "delta_d"] = np.nan  # first row belongs to the LoRA run
    deltas.loc[deltas["method"] == "DoRA", "delta_d"] = 1e-4  # constant ΔD: no line
    with pytest.warns(UserWarning, match="dropped 1 of .*'lora-run'"):
        figure = plot_figure2(deltas)
    ft, lora, dora = panels(figure)
    assert dora.get_title() == "DoRA (r = n/a)"
    assert fit_lines_in(dora) == []
    assert len(fit_lines_in(lora)) == 1
    assert len(scatter_offsets(lora)) == len(STEPS) * LAYERS - 1
    assert len(scatter_offsets(ft)) == len(STEPS) * LAYERS


def test_figure2_unknown_layers_and_steps():
    deltas = make_deltas()
    deltas["layer"] = pd.array([pd.NA] * len(deltas), dtype="Int64")
    deltas.loc[deltas["step"] == 300, "step"] = pd.NA
    figure = plot_figure2(deltas)
    assert colourbars(figure) == []  # nothing to colour by
    labels = [t.get_text() for t in figure.legends[0].get_texts()]
    assert labels == ["100", "200", "unknown", "least-squares fit"]


def test_figure2_many_steps_warn_about_repeated_markers():
    with pytest.warns(UserWarning, match="markers repeat"):
        plot_figure2(make_deltas(steps=tuple(range(12)), layers=2), colour_by="layer")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # auto: colour = step, nothing repeats
        figure = plot_figure2(make_deltas(steps=tuple(range(12)), layers=2))
    assert colourbars(figure)[0].get_ylabel() == "training step"


def test_figure2_written_png_and_svg(tmp_path):
    figure = plot_figure2(make_deltas())
    png = save_figure_atomic(figure, tmp_path / "figure2.png", dpi=100)
    svg = save_figure_atomic(figure, tmp_path / "figure2.svg")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert svg.stat().st_size > 10_000 and b"<svg" in svg.read_bytes()[:1000]


# --------------------------------------------------------------------------- trajectories


def test_trajectories_grid_and_lines():
    deltas = make_deltas()
    figure = plot_trajectories(deltas)
    axes = panels(figure)
    assert len(axes) == 6  # ΔM and ΔD rows × three runs
    top, bottom = axes[:3], axes[3:]
    assert [ax.get_title() for ax in top] == ["FT", "LoRA", "DoRA"]
    for ax in axes:
        lines = ax.get_lines()
        assert len(lines) == LAYERS
        np.testing.assert_array_equal(lines[0].get_xdata(), STEPS)
    ft = deltas.loc[(deltas["method"] == "FT") & (deltas["layer"] == 0)].sort_values("step")
    np.testing.assert_allclose(top[0].get_lines()[0].get_ydata(), ft["delta_m"])
    np.testing.assert_allclose(bottom[0].get_lines()[0].get_ydata(), ft["delta_d"])
    assert bottom[0].get_xlabel() == "training step"
    assert len(colourbars(figure)) == 1
    assert figure.legends == []  # a single stack needs no line-style legend


def test_trajectories_stacks_get_line_styles_and_legend():
    deltas = make_deltas(stacks=("encoder", "decoder"))
    figure = plot_trajectories(deltas)
    ax = panels(figure)[0]
    assert len(ax.get_lines()) == 2 * LAYERS
    assert {line.get_linestyle() for line in ax.get_lines()} == {"-", "--"}
    labels = [t.get_text() for t in figure.legends[0].get_texts()]
    assert labels == ["decoder", "encoder"]


def test_trajectories_without_steps_is_a_clear_error():
    deltas = make_deltas()
    deltas["step"] = pd.array([pd.NA] * len(deltas), dtype="Int64")
    with pytest.raises(WDAnalysisError, match="no checkpoint has a known training step"):
        plot_trajectories(deltas)


def test_trajectories_into_callers_axes(tmp_path):
    figure = Figure()
    axes = figure.subplots(2, 1)
    assert plot_trajectories(make_deltas(spec=(("FT", -0.6),)), axes=axes) is figure
    path = save_figure_atomic(figure, tmp_path / "t.png")
    assert path.stat().st_size > 0


def test_table_read_back_from_csv_plots_the_same(tmp_path):
    """deltas.csv read with pandas gives float steps/layers and NaN stacks: still works."""
    deltas = make_deltas(stacks=("",))
    deltas.to_csv(tmp_path / "deltas.csv", index=False)
    again = pd.read_csv(tmp_path / "deltas.csv")
    figure = plot_figure2(again)
    labels = [t.get_text() for t in figure.legends[0].get_texts()]
    assert labels == [*map(str, STEPS), "least-squares fit"]
    assert len(panels(plot_trajectories(again))) == 6
    fits = fit_lines(again)
    assert fits["step"].dtype == "Int64"
    np.testing.assert_allclose(fits["slope"], fit_lines(deltas)["slope"])


# --------------------------------------------------------------------------- many layers


def test_figure2_at_48_layers_colours_by_step():
    deltas = make_deltas(layers=48, steps=tuple(range(100, 900, 100)))
    figure = plot_figure2(deltas)
    ax = panels(figure)[0]
    collections = [c for c in ax.collections if isinstance(c, PathCollection)]
    assert len(collections) == 8  # one per step, each a single step colour
    for rank, collection in enumerate(collections):
        np.testing.assert_array_equal(collection.get_array(), np.full(48, rank))
    (bar,) = colourbars(figure)
    assert bar.get_ylabel() == "training step"
    assert [t.get_text() for t in bar.get_yticklabels()][:2] == ["100", "200"]
    assert len(scatter_offsets(ax)) == 48 * 8
    layer_view = plot_figure2(deltas, colour_by="layer")
    assert colourbars(layer_view)[0].get_ylabel() == "layer"


def test_trajectories_at_48_layers_summarise_depth_groups():
    deltas = make_deltas(layers=48, steps=(100, 200, 300, 400))
    figure = plot_trajectories(deltas)
    top = panels(figure)[0]
    bold = [line for line in top.get_lines() if line.get_linewidth() > 2]
    assert len(bold) == 4  # one median per depth group
    ft = deltas.loc[(deltas["method"] == "FT") & (deltas["layer"] < 12)]
    np.testing.assert_allclose(bold[0].get_ydata(), ft.groupby("step")["delta_m"].median())
    labels = [t.get_text() for t in figure.legends[0].get_texts()]
    assert labels == ["layers 0–11", "layers 12–23", "layers 24–35", "layers 36–47"]
    assert colourbars(figure) == []
    assert len(top.get_lines()) == 48 + 4  # every layer still drawn, thin


# --------------------------------------------------------------------------- heatmap


def meshes(figure: Figure) -> list:
    return [c for ax in panels(figure) for c in ax.collections if c.get_gid() == HEATMAP_GID]


def test_heatmap_cells_are_the_tables_values():
    deltas = make_deltas(stacks=("encoder", "decoder"))
    deltas = deltas.drop(index=deltas.index[5])  # one missing cell shows as masked
    figure = plot_heatmap(deltas)
    grid = meshes(figure)
    assert len(grid) == 3 * 4  # runs × (ΔM, ΔD) × two stacks
    row = 0
    for stack in ("encoder", "decoder"):
        for column in ("delta_m", "delta_d"):
            for run in ("ft-run", "lora-run", "dora-run"):
                rows = deltas[(deltas["run"] == run) & (deltas["stack"] == stack)]
                want = rows.pivot(index="layer", columns="step", values=column)
                got = grid[row].get_array().reshape(want.shape)
                np.testing.assert_array_equal(np.ma.getmaskarray(got), want.isna().to_numpy())
                np.testing.assert_allclose(got.filled(np.nan), want.to_numpy(float))
                row += 1
    ft_m = panels(figure)[0]
    assert ft_m.get_title() == "FT · encoder"
    assert "ΔM" in ft_m.get_ylabel() and "layer" in ft_m.get_ylabel()
    assert [t.get_text() for t in ft_m.get_xticklabels()] == [str(s) for s in STEPS]


def test_heatmap_signed_values_get_a_diverging_scale_centred_on_zero():
    from matplotlib.colors import TwoSlopeNorm

    deltas = make_deltas(spec=(("FT", -0.6),))
    deltas["delta_m"] -= deltas["delta_m"].mean()
    mesh = meshes(plot_heatmap(deltas))[0]
    assert isinstance(mesh.norm, TwoSlopeNorm) and mesh.norm.vcenter == 0


def test_y_parameter_sets_the_column_and_the_axis_labels():
    deltas = make_deltas()
    deltas["delta_m_learned"] = -deltas["delta_m"]
    figure = plot_figure2(deltas, y="delta_m_learned")
    ax = panels(figure)[0]
    assert ax.get_ylabel() == y_label("delta_m_learned") == "ΔM learned (decay's shrinkage removed)"
    ft = deltas[deltas["method"] == "FT"]
    np.testing.assert_allclose(
        np.sort(scatter_offsets(ax)[:, 1]), np.sort(ft["delta_m_learned"].to_numpy())
    )
    (line,) = fit_lines_in(ax)
    want = fit_lines(ft, per_step=False, y="delta_m_learned")["slope"].item()
    slope = np.diff(line.get_ydata()) / np.diff(line.get_xdata())
    assert slope.item() == pytest.approx(want, rel=1e-9)
    trajectories = plot_trajectories(deltas, y="delta_m_learned")
    assert panels(trajectories)[0].get_ylabel() == y_label("delta_m_learned", short=True)
    np.testing.assert_allclose(
        panels(trajectories)[0].get_lines()[0].get_ydata(),
        ft[ft["layer"] == 0].sort_values("step")["delta_m_learned"],
    )
    heat = plot_heatmap(deltas, y="delta_m_learned")
    assert panels(heat)[0].get_ylabel().startswith(y_label("delta_m_learned", short=True))
    assert Y_LABEL in panels(plot_figure2(deltas))[0].get_ylabel()
