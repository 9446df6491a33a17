"""The report's overview pages (Figure 2 and trajectories of every module, drawn by
plots.facets) and the heatmap tables of index.html."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import re  # noqa: E402
from html import unescape  # noqa: E402

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
from builders import synthetic_deltas  # noqa: E402
from matplotlib.collections import PathCollection  # noqa: E402

from wdanalysis.plots.facets import Box, nice_ticks, tick_labels  # noqa: E402
from wdanalysis.plots.figures import FIT_GID  # noqa: E402
from wdanalysis.plots.heatmap import heatmap_grid  # noqa: E402
from wdanalysis.plots.html_heatmap import grid_of, heatmap_section  # noqa: E402
from wdanalysis.plots.kinds import kinds_of, of_kind  # noqa: E402
from wdanalysis.plots.overview import (  # noqa: E402
    TRAJECTORY_GID,
    _line_fit,
    overview_rows,
    plot_figure2_overview,
    plot_trajectories_overview,
    row_panels,
)
from wdanalysis.stats.fits import fit_lines, fit_one  # noqa: E402

SPEC = (("FT", -0.6), ("LoRA", 0.8), ("DoRA", -0.3))


def _texts(figure) -> list[str]:
    return [t.get_text() for t in figure.axes[0].texts]


def test_tick_labels_share_one_power_of_ten():
    (low, high), ticks = nice_ticks(1.1e-4, 4.9e-4)
    assert low < 1.1e-4 and high > 4.9e-4 and all(low <= t <= high for t in ticks)
    assert len(ticks) >= 2
    labels = tick_labels(ticks)
    assert labels[-1].endswith("×10⁻⁴") and sum("×10" in label for label in labels) == 1
    mantissas = [float(label.split("×")[0].replace("−", "-")) for label in labels]
    np.testing.assert_allclose(np.array(mantissas) * 1e-4, ticks, rtol=1e-9)
    assert tick_labels([0.0, 0.5, 1.0]) == ["0", "0.5", "1"]
    assert tick_labels([-20.0, 0.0, 20.0]) == ["−20", "0", "20"]


def test_box_maps_data_to_page_and_clips_lines_inside():
    box = Box(1.0, 2.0, 3.0, 1.5, (0.0, 10.0), (-1.0, 1.0))
    np.testing.assert_allclose(box.x([0, 5, 10]), [1.0, 2.5, 4.0])
    np.testing.assert_allclose(box.y([-1, 0, 1]), [3.5, 2.75, 2.0])  # up the data = up the page
    segment = box.clip_line((0.0, 10.0), 0.5, -2.0)  # leaves the box at x = 2 and x = 6
    np.testing.assert_allclose(segment[:, 0], box.x([2.0, 6.0]))
    np.testing.assert_allclose(segment[:, 1], box.y([-1.0, 1.0]))
    assert box.clip_line((0.0, 10.0), 0.0, 5.0) is None  # a flat line above the box


@pytest.mark.parametrize(
    ("x", "y"),
    [
        (np.array([1.0, 2.0, 4.0, 7.0]), np.array([3.0, 1.0, 5.0, 6.0])),
        (np.array([1.0, 1.0, 1.0]), np.array([1.0, 2.0, 3.0])),  # ΔD constant: undefined
        (np.array([1.0, 2.0, 3.0]), np.array([2.0, 2.0, 2.0])),  # y constant: r undefined
        (np.array([1.0]), np.array([2.0])),
    ],
)
def test_panel_fit_is_the_fits_table_fit(x, y):
    slope, intercept, r = _line_fit(x, y)
    expected = fit_one(x, y)
    for got, key in ((slope, "slope"), (intercept, "intercept"), (r, "pearson_r")):
        assert np.isnan(got) == np.isnan(expected[key]), key
        if not np.isnan(got):
            assert got == pytest.approx(expected[key], rel=1e-12, abs=1e-15), key


def test_figure2_overview_has_a_panel_per_module_and_run_with_its_fit():
    deltas = synthetic_deltas(SPEC, (100, 200), 6, ("q_proj", "v_proj"), seed=3)
    figure = plot_figure2_overview(deltas)
    texts = _texts(figure)
    fits = fit_lines(deltas, per_step=False, n_boot=0)
    for _, fit in fits.iterrows():  # each title carries the pooled r of fits.csv
        title = f"{fit['method']} (r = {fit['pearson_r']:.2f})".replace("-", "−")
        assert title in texts, title
    assert sum("(r = " in t for t in texts) == 6  # 2 modules × 3 runs
    assert {"q_proj", "v_proj"} <= {t.split("\n")[0] for t in texts}  # the rows' names
    points = [c for c in figure.axes[0].collections if isinstance(c, PathCollection)]
    assert sum(len(c.get_offsets()) for c in points) == len(deltas)
    (fit,) = [c for c in figure.axes[0].collections if c.get_gid() == FIT_GID]
    assert len(fit.get_segments()) == 6  # one fit line per panel
    assert len(figure.axes) == 1  # the whole page is one Axes: cheap to draw


def test_figure2_overview_colours_steps_at_80_layers():
    deltas = synthetic_deltas(SPEC[:2], (10, 20, 30, 40), 80, ("q_proj",), seed=1)
    figure = plot_figure2_overview(deltas)
    texts = _texts(figure)
    assert "training step" in texts and "layer" not in texts  # colour key = steps
    points = [c for c in figure.axes[0].collections if isinstance(c, PathCollection)]
    assert len(points) == 4  # one collection per step for the whole page, one colour each
    for collection in points:
        assert len(np.unique(collection.get_array())) == 1


def test_trajectories_overview_lines_and_depth_groups():
    few = synthetic_deltas(SPEC, (100, 200, 300), 4, ("q_proj", "v_proj"), seed=2)
    figure = plot_trajectories_overview(few)
    (lines,) = [c for c in figure.axes[0].collections if c.get_gid() == TRAJECTORY_GID]
    paths = lines.get_segments()
    assert len(paths) == 3 * 2 * 2 * 4  # run × module × (ΔM, ΔD) × layer
    assert all(len(path) == 3 for path in paths)  # one vertex per step
    assert "FT · ΔM (magnitude)" in _texts(figure) and "LoRA · ΔD (direction)" in _texts(figure)
    many = synthetic_deltas(SPEC[:1], (10, 20), 40, ("q_proj",), seed=2)
    legend = plot_trajectories_overview(many).legends[0]
    assert [t.get_text() for t in legend.get_texts()] == [
        "layers 0–9",
        "layers 10–19",
        "layers 20–29",
        "layers 30–39",
    ]


def test_heatmap_grid_on_arrays_matches_the_pandas_one():
    deltas = synthetic_deltas(SPEC[:1], (10, 20, 30), 5, ("q_proj",), stacks=("a", "b"))
    deltas.loc[deltas.index[:3], "step"] = pd.NA  # unknown steps: left out
    deltas = deltas.drop(index=deltas.index[7])  # a missing cell: NaN
    expected, layers, steps = heatmap_grid(deltas, "delta_m")  # two stacks: their mean
    got, got_layers, got_steps = grid_of(
        pd.to_numeric(deltas["layer"]).to_numpy(float),
        pd.to_numeric(deltas["step"]).to_numpy(float, na_value=np.nan),
        deltas["delta_m"].to_numpy(float),
    )
    assert (got_layers, got_steps) == (layers, steps)
    np.testing.assert_allclose(got, expected, rtol=1e-12, equal_nan=True)


def test_heatmap_section_cells_carry_the_table_values():
    deltas = synthetic_deltas(SPEC[:2], (10, 20), 3, ("q_proj",), seed=4)
    page = heatmap_section(deltas)
    titles = re.findall(r'title="layer (\d+), step (\d+): ([^"]+)"', page)
    assert len(titles) == 2 * 2 * 3 * 2  # run × quantity × layer × step
    lora = deltas[(deltas["method"] == "LoRA") & (deltas["layer"] == 2) & (deltas["step"] == 20)]
    shown = [float(unescape(v).replace("−", "-")) for layer, step, v in titles]
    assert any(v == pytest.approx(lora["delta_m"].iloc[0], rel=1e-2) for v in shown)
    assert any(v == pytest.approx(lora["delta_d"].iloc[0], rel=1e-2) for v in shown)
    colours = re.findall(r"background:(#[0-9a-f]{6})", page)
    assert len(set(colours)) > 4  # painted on a scale, not one colour


def _t5_like() -> pd.DataFrame:
    """Two stacks (one module with decoder self- and cross-attention), an empty identity
    cell as CSV gives it back (NaN), rows interleaved so table order matters."""
    deltas = synthetic_deltas(SPEC[:2], (10, 20), 3, ("q", "o"), ("encoder", "decoder"), seed=4)
    deltas["attention"] = deltas["stack"].map({"decoder": "self"})  # NaN in the encoder
    cross = deltas.loc[deltas["stack"] == "decoder"].assign(attention="cross")
    deltas = pd.concat([deltas, cross]).sample(frac=1.0, random_state=0)
    deltas.loc[deltas["module"] == "o", "attention"] = np.nan  # one module: no kind split
    return deltas.reset_index(drop=True)


@pytest.mark.parametrize("pool", [False, True])
def test_overview_rows_and_panels_are_the_kinds_of_each_module(pool):
    data = _t5_like()
    expected = []
    for module in dict.fromkeys(data["module"].astype(str)):
        part = data.loc[data["module"].astype(str) == module]
        expected += [(module, kind) for kind in kinds_of(part, pool)]
    rows = overview_rows(data, pool)
    assert rows == expected
    assert len(rows) == (2 if pool else 5)  # q: enc, dec self, dec cross; o: enc, dec
    order = list(dict.fromkeys(data["run"].astype(str)))
    arrays = {"i": np.arange(len(data))}
    panels = row_panels(data.assign(run=data["run"].astype(str)), rows, order, arrays)
    for r, (module, kind) in enumerate(rows):
        part = of_kind(data.loc[data["module"] == module], kind)
        for run in order:
            want = part.index[part["run"].astype(str) == run].to_numpy()
            np.testing.assert_array_equal(panels[r, run]["i"], want)
