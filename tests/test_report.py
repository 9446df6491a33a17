"""write_report: the files ``wdanalysis compare --out DIR`` gets besides deltas.csv."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.image as mpimg  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
from builders import synthetic_deltas  # noqa: E402

from wdanalysis.errors import WDAnalysisError  # noqa: E402
from wdanalysis.plots.report import ReportResult, write_report  # noqa: E402
from wdanalysis.stats.fit_table import format_fit_table  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
REQUIRED_FIT_COLUMNS = [
    "method",
    "run",
    "module",
    "step",
    "n",
    "slope",
    "intercept",
    "pearson_r",
    "pearson_r_boot_low",
    "pearson_r_boot_high",
    "slope_boot_low",
    "slope_boot_high",
    "within_step_r",
    "spearman_rho",
]
FIGURES = ["figure2", "trajectories"]  # every module on one page each; heatmaps in index.html


def make_deltas(modules=("q_proj",), steps=(10, 20), layers=4, seed=0) -> pd.DataFrame:
    spec = (("FT", -0.6), ("LoRA", 0.8), ("DoRA", -0.3))
    return synthetic_deltas(spec, steps, layers, modules, seed=seed, spread=1.0, n_vectors=8)


def assert_written(path) -> None:
    assert path.is_file() and path.stat().st_size > 0
    if path.suffix == ".png":
        assert path.read_bytes()[:8] == PNG_MAGIC
    if path.suffix == ".svg":
        assert b"<svg" in path.read_bytes()[:2000]


def test_single_module_report(tmp_path):
    before = plt.get_fignums()
    result = write_report(make_deltas(), tmp_path, dpi=50)
    assert isinstance(result, ReportResult)
    names = sorted(p.name for p in result.paths)
    figures = [f"{stem}.{fmt}" for stem in FIGURES for fmt in ("png", "svg")]
    assert names == sorted(["fits.csv", "index.html", *figures])
    assert result.paths[-1] == result.html == tmp_path / "index.html"
    for path in result.paths:
        assert path.parent == tmp_path
        assert_written(path)
    # exactly these files, no temporary leftovers, no deltas.csv (the CLI writes that)
    assert sorted(p.name for p in tmp_path.iterdir()) == names
    assert result.fit_table == format_fit_table(result.fits)
    assert result.notes == []
    assert plt.get_fignums() == before


def test_fits_csv_columns_and_empty_step_for_pooled(tmp_path):
    result = write_report(make_deltas(), tmp_path, dpi=50)
    fits = pd.read_csv(result.fits_csv)
    assert set(REQUIRED_FIT_COLUMNS) <= set(fits.columns)
    pooled = fits[fits["scope"] == "pooled"]
    assert pooled["step"].isna().all() and len(pooled) == 3
    assert sorted(fits.loc[fits["scope"] == "step", "step"].unique()) == [10, 20]
    header, first = result.fits_csv.read_text().splitlines()[:2]
    step_index = header.split(",").index("step")
    assert first.split(",")[step_index] == ""  # "step empty for the pooled fit"
    np.testing.assert_allclose(fits["slope"], result.fits["slope"])


def test_several_modules_share_one_page_per_figure(tmp_path):
    result = write_report(make_deltas(modules=("query", "value")), tmp_path, dpi=50)
    assert set(result.figures) == {""}  # "": every module
    for stem in FIGURES:
        for suffix in ("png", "svg"):
            assert_written(tmp_path / f"{stem}.{suffix}")
    assert not list(tmp_path.glob("*_query.*")) and not list(tmp_path.glob("heatmap*"))
    assert set(pd.read_csv(result.fits_csv)["module"]) == {"query", "value"}
    page = (tmp_path / "index.html").read_text()
    assert "module: query" in page and "module: value" in page  # the heatmap tables


def test_figures_all_adds_one_file_per_module_and_kind(tmp_path):
    result = write_report(
        make_deltas(modules=("query", "value")), tmp_path, dpi=30, formats="png", figures="all"
    )
    assert set(result.figures) == {"", "query", "value"}
    for module in ("query", "value"):
        for stem in ("figure2", "trajectories", "heatmap"):
            assert_written(tmp_path / f"{stem}_{module}.png")
    assert_written(tmp_path / "figure2.png")
    with pytest.raises(ValueError, match="figures must be"):
        write_report(make_deltas(), tmp_path / "bad", figures="some")


def test_module_names_are_made_file_safe(tmp_path):
    result = write_report(
        make_deltas(modules=("attn/q", "attn/v")), tmp_path, dpi=30, formats="png", figures="all"
    )
    assert (tmp_path / "figure2_attn_q.png").is_file()
    assert all(path.parent == tmp_path for path in result.paths)


def test_dpi_sets_png_resolution(tmp_path):
    low = write_report(make_deltas(), tmp_path / "low", dpi=50)
    high = write_report(make_deltas(), tmp_path / "high", dpi=100)
    low_png = mpimg.imread(low.figures[""][0])
    high_png = mpimg.imread(high.figures[""][0])
    assert high_png.shape[0] == pytest.approx(2 * low_png.shape[0], abs=2)


def test_pdf_vector_copy(tmp_path):
    result = write_report(make_deltas(), tmp_path, dpi=50, vector_format="pdf")
    pdf = tmp_path / "figure2.pdf"
    assert pdf in result.paths and pdf.read_bytes()[:5] == b"%PDF-"
    with pytest.raises(ValueError, match="vector_format"):
        write_report(make_deltas(), tmp_path, vector_format="eps")


def test_unknown_steps_skip_trajectories_with_note(tmp_path):
    deltas = make_deltas()
    deltas["step"] = pd.array([pd.NA] * len(deltas), dtype="Int64")
    result = write_report(deltas, tmp_path, dpi=30, formats="png", figures="all")
    assert (tmp_path / "figure2.png").is_file() and (tmp_path / "figure2_q_proj.png").is_file()
    assert (tmp_path / "heatmap_q_proj.png").is_file()  # the heatmap skips unknown steps
    assert not list(tmp_path.glob("trajectories*"))
    assert any("no known training step" in note for note in result.notes)


def test_nan_rows_warn_once(tmp_path):
    deltas = make_deltas()
    deltas.loc[0, "delta_d"] = np.nan
    with pytest.warns(UserWarning, match="dropped 1 of") as caught:
        write_report(deltas, tmp_path, dpi=50)
    assert sum("dropped" in str(w.message) for w in caught) == 1


def test_bad_input_is_a_user_error(tmp_path):
    with pytest.raises(WDAnalysisError, match="lacks column"):
        write_report(make_deltas().drop(columns=["module"]), tmp_path)
    assert list(tmp_path.iterdir()) == []  # nothing half-written


def test_figure_names_do_not_depend_on_the_number_of_modules(tmp_path):
    one = write_report(
        make_deltas(modules=("query",), layers=3), tmp_path / "one", dpi=20, formats="png"
    )
    two = write_report(
        make_deltas(modules=("query", "value"), layers=3), tmp_path / "two", dpi=20, formats="png"
    )
    names_one = {p.name for p in one.figures[""]}
    assert names_one == {p.name for p in two.figures[""]} == {"figure2.png", "trajectories.png"}


def test_formats_png_svg_pdf_and_only_png(tmp_path):
    result = write_report(make_deltas(), tmp_path / "all", dpi=30, formats="png,svg,pdf")
    suffixes = {p.suffix for p in result.figures[""]}
    assert suffixes == {".png", ".svg", ".pdf"}
    for path in result.figures[""]:
        assert_written(path)
        if path.suffix == ".pdf":
            assert path.read_bytes()[:5] == b"%PDF-"
    only = write_report(make_deltas(), tmp_path / "png", dpi=30, formats=["png"])
    assert {p.suffix for p in only.figures[""]} == {".png"}
    with pytest.raises(ValueError, match="unknown figure format.*eps"):
        write_report(make_deltas(), tmp_path / "bad", formats="png,eps")


def test_vector_files_are_identical_on_rerun(tmp_path):
    """The layout is computed once and frozen for the other formats: still reproducible."""
    a = write_report(make_deltas(), tmp_path / "a", dpi=30, formats="svg,pdf", html=False)
    b = write_report(make_deltas(), tmp_path / "b", dpi=30, formats="svg,pdf", html=False)
    for left, right in zip(a.figures[""], b.figures[""], strict=True):
        assert left.read_bytes() == right.read_bytes(), left.name


def test_parallel_workers_write_the_same_files(tmp_path, capsys):
    deltas = make_deltas(modules=("query", "value"), layers=3)
    serial = write_report(deltas, tmp_path / "serial", dpi=30, formats="svg", workers=1)
    parallel = write_report(
        deltas, tmp_path / "parallel", dpi=30, formats="svg", workers=2, progress=True
    )
    assert [p.name for p in serial.paths] == [p.name for p in parallel.paths]
    for left, right in zip(serial.paths[1:-1], parallel.paths[1:-1], strict=True):
        assert left.read_bytes() == right.read_bytes(), left.name
    assert "figures" in capsys.readouterr().err  # the tqdm bar


def test_y_parameter_labels_the_figures_and_fits(tmp_path):
    deltas = make_deltas()
    deltas["delta_m_learned"] = deltas["delta_m"] * 0.5
    result = write_report(deltas, tmp_path, dpi=30, formats="svg", y="delta_m_learned")
    assert (result.fits["y"] == "delta_m_learned").all()
    svg = (tmp_path / "figure2.svg").read_text()
    assert "ΔM learned" in svg and "magnitude change" not in svg
