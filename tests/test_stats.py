"""Statistics of wdanalysis.stats.fits checked against independent closed forms and known data."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pandas as pd
import pytest
from builders import synthetic_deltas
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from scipy import stats as sps

from wdanalysis.errors import WDAnalysisError
from wdanalysis.stats import (
    compare_correlations,
    fit_lines,
    fit_one,
    format_fit_table,
    select_module,
)

Z975 = 1.959963984540054  # standard normal 97.5% quantile


def make_deltas(
    spec=(("FT", -0.62), ("LoRA", 0.83), ("DoRA", -0.31)),
    steps=(100, 200, 300),
    layers=12,
    modules=("q_proj",),
    seed=0,
) -> pd.DataFrame:
    """A deltas table whose ΔM–ΔD correlation per run is ``rho`` in expectation."""
    return synthetic_deltas(spec, steps, layers, modules, seed=seed)


def closed_form(x: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """Textbook OLS and correlation formulas, written out with numpy only."""
    n = len(x)
    xm, ym = x.mean(), y.mean()
    sxx, syy, sxy = ((x - xm) ** 2).sum(), ((y - ym) ** 2).sum(), ((x - xm) * (y - ym)).sum()
    slope = sxy / sxx
    intercept = ym - slope * xm
    s2 = ((y - intercept - slope * x) ** 2).sum() / (n - 2)
    r = sxy / math.sqrt(sxx * syy)
    z = math.atanh(r) if abs(r) < 1 else math.copysign(math.inf, r)
    ranks = [np.argsort(np.argsort(v)).astype(float) for v in (x, y)]
    return {
        "slope": slope,
        "intercept": intercept,
        "slope_se": math.sqrt(s2 / sxx),
        "intercept_se": math.sqrt(s2 * (1 / n + xm**2 / sxx)),
        "pearson_r": r,
        "t": r * math.sqrt((n - 2) / (1 - r**2)) if abs(r) < 1 else math.inf,
        "pearson_ci_low": math.tanh(z - Z975 / math.sqrt(n - 3)),
        "pearson_ci_high": math.tanh(z + Z975 / math.sqrt(n - 3)),
        "spearman_rho": np.corrcoef(*ranks)[0, 1],
    }


# --------------------------------------------------------------------------- fit_one


def test_fit_one_matches_closed_forms():
    rng = np.random.default_rng(1)
    x = rng.normal(size=40) * 1e-4
    y = -3.0 * x + rng.normal(size=40) * 1e-4
    got, want = fit_one(x, y), closed_form(x, y)
    for key in ("slope", "intercept", "pearson_r", "spearman_rho"):
        assert got[key] == pytest.approx(want[key], rel=1e-9, abs=1e-15), key
    for key in ("slope_se", "intercept_se"):  # the textbook SEs: points taken as independent
        assert got[f"{key}_iid"] == pytest.approx(want[key], rel=1e-9, abs=1e-15), key
    assert got["pearson_r_fisher_low_iid"] == pytest.approx(want["pearson_ci_low"], rel=1e-9)
    assert got["pearson_r_fisher_high_iid"] == pytest.approx(want["pearson_ci_high"], rel=1e-9)
    t = sps.t.ppf(0.975, 38)
    assert got["slope_ci_low_iid"] == pytest.approx(want["slope"] - t * want["slope_se"])
    assert got["slope_ci_high_iid"] == pytest.approx(want["slope"] + t * want["slope_se"])
    intercept_low = want["intercept"] - t * want["intercept_se"]
    assert got["intercept_ci_low_iid"] == pytest.approx(intercept_low)
    assert got["pearson_p_iid"] == pytest.approx(2 * sps.t.sf(abs(want["t"]), 38), rel=1e-6)
    assert got["note"] == ""


def test_anscombe_quartet_known_values():
    """Anscombe (1973): all four sets give y = 3.00 + 0.500 x and r = 0.816."""
    x = np.array([10, 8, 13, 9, 11, 14, 6, 4, 12, 7, 5], dtype=float)
    y = np.array([8.04, 6.95, 7.58, 8.81, 8.33, 9.96, 7.24, 4.26, 10.84, 4.82, 5.68])
    got = fit_one(x, y)
    assert got["slope"] == pytest.approx(0.5001, abs=1e-4)
    assert got["intercept"] == pytest.approx(3.0001, abs=1e-4)
    assert got["pearson_r"] == pytest.approx(0.8164, abs=1e-4)
    assert got["slope_se_iid"] == pytest.approx(0.1179, abs=1e-4)


def test_perfect_line():
    x = np.arange(10.0)
    got = fit_one(x, 2 * x + 1)
    assert got["slope"] == pytest.approx(2.0)
    assert got["intercept"] == pytest.approx(1.0)
    assert got["pearson_r"] == pytest.approx(1.0)
    assert got["spearman_rho"] == pytest.approx(1.0)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(st.floats(-1e3, 1e3), st.floats(-1e3, 1e3)),
        min_size=4,
        max_size=40,
    )
)
def test_fit_one_property(points):
    x, y = (np.array(v, dtype=float) for v in zip(*points, strict=True))
    assume(np.ptp(x) > 1e-3 and np.ptp(y) > 1e-3)
    got, want = fit_one(x, y), closed_form(x, y)
    assert got["slope"] == pytest.approx(want["slope"], rel=1e-6, abs=1e-9)
    assert got["pearson_r"] == pytest.approx(want["pearson_r"], rel=1e-6, abs=1e-9)
    assert -1 <= got["pearson_r"] <= 1
    if abs(got["pearson_r"]) > 1e-9:
        assert np.sign(got["slope"]) == np.sign(got["pearson_r"])


# --------------------------------------------------------------------------- edge cases


def test_single_point_all_nan_with_reason():
    got = fit_one(np.array([1.0]), np.array([2.0]))
    assert math.isnan(got["slope"]) and math.isnan(got["pearson_r"])
    assert "at least 2" in got["note"]


def test_two_points_exact_line_without_uncertainty():
    got = fit_one(np.array([0.0, 1.0]), np.array([1.0, 3.0]))
    assert got["slope"] == pytest.approx(2.0)
    assert got["intercept"] == pytest.approx(1.0)
    assert got["pearson_r"] == pytest.approx(1.0)
    for key in (
        "slope_se_iid",
        "slope_ci_low_iid",
        "pearson_p_iid",
        "pearson_r_fisher_low_iid",
        "spearman_p_iid",
    ):
        assert math.isnan(got[key]), key
    assert "2 points" in got["note"]


def test_three_points_have_se_but_no_fisher_ci():
    got = fit_one(np.array([0.0, 1.0, 2.0]), np.array([0.0, 2.0, 1.0]))
    assert np.isfinite(got["slope_se_iid"]) and np.isfinite(got["pearson_p_iid"])
    assert math.isnan(got["pearson_r_fisher_low_iid"])
    assert math.isnan(got["pearson_r_fisher_high_iid"])
    assert "CI" in got["note"]


def test_constant_delta_d():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no scipy warning leaks out either
        got = fit_one(np.full(5, 1e-4), np.arange(5.0))
    assert math.isnan(got["slope"]) and math.isnan(got["pearson_r"])
    assert "ΔD is constant" in got["note"]


def test_constant_delta_m():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = fit_one(np.arange(5.0), np.full(5, 3.0))
    assert got["slope"] == 0.0
    assert math.isnan(got["pearson_r"])
    assert "ΔM is constant" in got["note"]


# --------------------------------------------------------------------------- fit_lines


def test_fit_lines_pooled_and_per_step_rows():
    deltas = make_deltas()
    fits = fit_lines(deltas)
    assert list(fits.columns[:3]) == ["method", "run", "module"]
    for column in ("step", "n", "slope", "intercept", "pearson_r", "spearman_rho"):
        assert column in fits.columns
    pooled = fits.loc[fits["scope"] == "pooled"]
    assert list(pooled["method"]) == ["FT", "LoRA", "DoRA"]  # input order kept
    assert pooled["step"].isna().all()
    assert fits["step"].dtype == "Int64"
    assert (pooled["n"] == 36).all()
    per_step = fits.loc[fits["scope"] == "step"]
    assert len(per_step) == 9 and (per_step["n"] == 12).all()
    assert sorted(per_step.loc[per_step["method"] == "FT", "step"]) == [100, 200, 300]
    ft = deltas.loc[deltas["method"] == "FT"]
    want = closed_form(ft["delta_d"].to_numpy(float), ft["delta_m"].to_numpy(float))
    row = pooled.iloc[0]
    assert row["slope"] == pytest.approx(want["slope"], rel=1e-9)
    assert row["pearson_r"] == pytest.approx(want["pearson_r"], rel=1e-9)


def test_fit_lines_recovers_paper_signs():
    fits = fit_lines(make_deltas(layers=40, steps=(1, 2, 3, 4, 5)), per_step=False)
    r = dict(zip(fits["method"], fits["pearson_r"], strict=True))
    assert r["FT"] < 0 < r["LoRA"] and r["DoRA"] < 0
    for method, rho in (("FT", -0.62), ("LoRA", 0.83), ("DoRA", -0.31)):
        row = fits.loc[fits["method"] == method].iloc[0]
        assert row["pearson_r_boot_low"] < rho < row["pearson_r_boot_high"]
        assert row["slope_boot_low"] < row["slope"] < row["slope_boot_high"]
        assert row["pearson_r_fisher_low_iid"] < rho < row["pearson_r_fisher_high_iid"]


def test_fit_lines_per_step_false_and_custom_by():
    deltas = make_deltas(modules=("q_proj", "v_proj"))
    fits = fit_lines(deltas, by=("run", "module"), per_step=False)
    assert len(fits) == 6 and (fits["scope"] == "pooled").all()
    assert "method" not in fits.columns


def test_fit_lines_drops_nan_rows_with_warning_naming_run():
    deltas = make_deltas()
    deltas.loc[[0, 1], "delta_d"] = np.nan
    deltas.loc[2, "delta_m"] = np.inf
    with pytest.warns(UserWarning, match=r"dropped 3 of 108 rows.*3 in run 'ft-run'"):
        fits = fit_lines(deltas)
    assert fits.loc[fits["scope"] == "pooled", "n"].tolist() == [33, 36, 36]


def test_fit_lines_all_nan_raises():
    deltas = make_deltas()
    deltas["delta_d"] = np.nan
    with pytest.raises(WDAnalysisError, match="nothing is left"):
        fit_lines(deltas)


def test_fit_lines_unknown_step_only_in_pooled():
    deltas = make_deltas()
    deltas.loc[deltas["step"] == 300, "step"] = pd.NA
    fits = fit_lines(deltas)
    ft = fits.loc[fits["method"] == "FT"]
    assert ft.loc[ft["scope"] == "pooled", "n"].item() == 36
    assert sorted(ft.loc[ft["scope"] == "step", "step"]) == [100, 200]


def test_fit_lines_tiny_groups_do_not_crash():
    deltas = make_deltas(layers=1, steps=(1,))  # one point per run
    fits = fit_lines(deltas)
    assert fits["slope"].isna().all()
    assert fits["note"].str.contains("at least 2").all()


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda f: f.drop(columns=["delta_d"]), "lacks column.*delta_d"),
        (lambda f: f.iloc[0:0], "empty"),
        (lambda f: f.assign(delta_m=f["delta_m"].astype(str)), "must be numeric"),
    ],
)
def test_fit_lines_validates_input(mutate, message):
    with pytest.raises(WDAnalysisError, match=message):
        fit_lines(mutate(make_deltas()))


def test_fit_lines_rejects_non_frame():
    with pytest.raises(TypeError, match="DataFrame"):
        fit_lines([1, 2, 3])


# --------------------------------------------------------------------------- module selection


def test_select_module_aliases_and_errors():
    deltas = make_deltas(modules=("q_proj", "v_proj"))
    assert set(select_module(deltas, "query")["module"]) == {"q_proj"}
    assert set(select_module(deltas, "value")["module"]) == {"v_proj"}
    assert set(select_module(deltas, "v_proj")["module"]) == {"v_proj"}
    with pytest.raises(WDAnalysisError, match="2 modules.*module="):
        select_module(deltas, None)
    with pytest.raises(WDAnalysisError, match="not in the deltas"):
        select_module(deltas, "key")


# --------------------------------------------------------------------------- compare_correlations


def test_compare_correlations_matches_hand_fisher_z():
    deltas = make_deltas()
    fits = fit_lines(deltas)
    got = compare_correlations(fits, "ft-run", "lora-run")
    pooled = fits.loc[fits["scope"] == "pooled"].set_index("run")
    r_a, r_b = pooled.loc["ft-run", "pearson_r"], pooled.loc["lora-run", "pearson_r"]
    z = (math.atanh(r_a) - math.atanh(r_b)) / math.sqrt(2 / 33)
    assert got["z"] == pytest.approx(z)
    assert got["p_value"] == pytest.approx(math.erfc(abs(z) / math.sqrt(2)))
    assert got["p_value"] < 1e-6  # FT and LoRA clearly differ
    assert (got["method_a"], got["method_b"]) == ("FT", "LoRA")
    # the same from the raw deltas, naming runs by method
    again = compare_correlations(deltas, "FT", "LoRA")
    assert again["z"] == pytest.approx(z)


def test_compare_correlations_same_population_not_significant():
    deltas = make_deltas(spec=(("A", 0.5), ("B", 0.5)), layers=30, seed=3)
    assert compare_correlations(deltas, "A", "B")["p_value"] > 0.01


def test_compare_correlations_errors_and_small_n():
    deltas = make_deltas(modules=("q_proj", "v_proj"))
    with pytest.raises(WDAnalysisError, match="pick one"):
        compare_correlations(deltas, "FT", "LoRA")
    with pytest.raises(WDAnalysisError, match="no run or method called 'XX'"):
        compare_correlations(deltas, "FT", "XX", module="query")
    small = make_deltas(layers=3, steps=(1,))
    got = compare_correlations(small, "FT", "LoRA")
    assert math.isnan(got["z"]) and "at least 4" in got["note"]


# --------------------------------------------------------------------------- format_fit_table


def test_format_fit_table_content():
    fits = fit_lines(make_deltas())
    text = format_fit_table(fits)
    lines = text.splitlines()
    assert len(lines) == 5  # header + one row per pooled fit + the legend
    header = lines[0].split()
    for column in ("method", "run", "module", "n", "slope", "r", "within", "ρ", "CI]"):
        assert column in header
    assert lines[1].startswith("FT") and "−" in lines[1]  # unicode minus for negative r
    assert "3/3" in text or "2/3" in text  # slope-sign consistency over steps
    widths = {len(line) for line in lines[:4]}
    assert len(widths) == 1  # aligned columns
    ft = fits.iloc[0]
    interval = f"[{ft['pearson_r_boot_low']:+.2f}, {ft['pearson_r_boot_high']:+.2f}]"
    assert interval.replace("-", "−") in lines[1]  # the layer-bootstrap interval of r
    assert f"{ft['within_step_r']:+.2f}".replace("-", "−") in lines[1]
    legend = lines[-1]
    assert legend.startswith("legend:") and "layer bootstrap (2000" in legend and "seed 0" in legend


def test_format_fit_table_undefined_values():
    text = format_fit_table(fit_lines(make_deltas(layers=1, steps=(1,))))
    assert "—" in text and "at least 2" in text


def test_format_fit_table_rejects_other_tables():
    with pytest.raises(WDAnalysisError, match="not a fits table"):
        format_fit_table(make_deltas())


def test_format_fit_table_of_fits_read_back_from_csv(tmp_path):
    fits = fit_lines(make_deltas())
    fits.to_csv(tmp_path / "fits.csv", index=False)
    again = format_fit_table(pd.read_csv(tmp_path / "fits.csv"))
    assert again == format_fit_table(fits)
    assert "nan" not in again
