"""fits.csv's default statistics respect layers × steps (issue 31, item 1).

The layer-bootstrap interval of every fit is recomputed here from scratch (each resampled
table built explicitly, numpy's own fits), the within-step r by a plain loop; the y
column, the seed and the legend are checked, and the pooled rows agree with the README
analysis' :func:`~wdanalysis.stats.resampling.cluster_bootstrap`.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from builders import synthetic_deltas

from wdanalysis.errors import WDAnalysisError
from wdanalysis.stats import fit_lines, format_fit_table
from wdanalysis.stats.resampling import cluster_bootstrap, within_step_correlation

N_BOOT = 200


def make_deltas(layers=5, steps=(100, 200, 300), stacks=("",), seed=0) -> pd.DataFrame:
    spec = (("FT", -0.6), ("LoRA", 0.8))
    return synthetic_deltas(spec, steps, layers, ("q_proj",), stacks, seed=seed)


def naive_interval(frame: pd.DataFrame, counts: np.ndarray, y: str = "delta_m") -> dict:
    """Percentile interval from resampled tables built row by row (whole layers kept)."""
    rows_of = [
        np.flatnonzero(frame["parameter"].to_numpy() == name)
        for name in dict.fromkeys(frame["parameter"])
    ]
    x_all, v_all = frame["delta_d"].to_numpy(float), frame[y].to_numpy(float)
    slopes, rs = [], []
    for draw in counts:
        rows = np.concatenate([rows_of[i] for i, c in enumerate(draw) for _ in range(c)])
        x, v = x_all[rows], v_all[rows]
        slopes.append(np.polyfit(x, v, 1)[0])
        rs.append(np.corrcoef(x, v)[0, 1])
    return {
        "slope_boot_low": np.percentile(slopes, 2.5),
        "slope_boot_high": np.percentile(slopes, 97.5),
        "pearson_r_boot_low": np.percentile(rs, 2.5),
        "pearson_r_boot_high": np.percentile(rs, 97.5),
    }


def assert_interval(row: pd.Series, want: dict) -> None:
    for key, value in want.items():
        assert row[key] == pytest.approx(value, rel=1e-9), key


def test_pooled_and_step_intervals_match_an_explicit_whole_layer_resampling():
    deltas = make_deltas()
    fits = fit_lines(deltas, n_boot=N_BOOT, seed=7)
    pooled_rng = np.random.default_rng(7)  # pooled rows: one stream, groups in order
    step_rng = np.random.default_rng([7, 1])  # step rows: a second stream of the seed
    for _, row in fits.iterrows():
        run = deltas[deltas["run"] == row["run"]]
        if row["scope"] == "pooled":
            frame, rng = run, pooled_rng
        else:
            frame, rng = run[run["step"] == row["step"]], step_rng
        k = frame["parameter"].nunique()
        counts = rng.multinomial(k, np.full(k, 1 / k), size=N_BOOT)
        assert_interval(row, naive_interval(frame, counts))
        assert row["n_clusters"] == k == 5 and row["n_boot"] == N_BOOT
        assert row["boot_seed"] == 7


def test_within_step_r_matches_a_loop_and_equals_r_at_a_single_step():
    deltas = make_deltas(layers=6)
    deltas["delta_m"] += deltas["step"].astype(float) * 1e-3  # a trend centring removes
    fits = fit_lines(deltas, n_boot=0)
    for _, row in fits[fits["scope"] == "pooled"].iterrows():
        run = deltas[deltas["run"] == row["run"]]
        xs, ys = [], []
        for _, at in run.groupby("step"):
            xs += list(at["delta_d"] - at["delta_d"].mean())
            ys += list(at["delta_m"] - at["delta_m"].mean())
        x, y = np.array(xs), np.array(ys)
        assert row["within_step_r"] == pytest.approx(x @ y / math.sqrt(x @ x * (y @ y)))
        assert abs(row["within_step_r"] - row["pearson_r"]) > 0.05  # the trend moved r
    steps = fits[fits["scope"] == "step"]
    np.testing.assert_allclose(steps["within_step_r"], steps["pearson_r"], rtol=1e-9)


def test_pooled_rows_are_the_readme_analysis_numbers():
    """Same seed, same groups in the same order: cluster_bootstrap's and within-step r's."""
    deltas = make_deltas(layers=7, stacks=("encoder", "decoder"))
    fits = fit_lines(deltas)
    pooled = fits[fits["scope"] == "pooled"].reset_index(drop=True)
    boot = cluster_bootstrap(deltas, n_boot=2000, seed=0)
    within = within_step_correlation(deltas)
    assert list(pooled["stack"]) == list(boot["stack"])
    for column in ("slope_boot_low", "slope_boot_high", "pearson_r_boot_low"):
        np.testing.assert_allclose(pooled[column], boot[column], rtol=1e-12)
    np.testing.assert_allclose(pooled["within_step_r"], within["within_step_r"], rtol=1e-12)


def test_deterministic_and_seed_recorded():
    deltas = make_deltas()
    a, b = fit_lines(deltas), fit_lines(deltas)
    pd.testing.assert_frame_equal(a, b)
    other = fit_lines(deltas, seed=1)
    assert (other["boot_seed"] == 1).all() and (a["boot_seed"] == 0).all()
    assert not np.allclose(other["slope_boot_low"], a["slope_boot_low"])


def test_few_layers_leave_the_interval_empty_with_a_note():
    fits = fit_lines(make_deltas(layers=2))
    assert fits["slope_boot_low"].isna().all() and fits["pearson_r_boot_high"].isna().all()
    assert fits["note"].str.contains("at least 3 layers").all()
    assert (fits["n_clusters"] == 2).all()
    text = format_fit_table(fits)
    assert "at least 3 layers" in text


def test_no_bootstrap_on_request_and_bad_n_boot():
    fits = fit_lines(make_deltas(), n_boot=0)
    assert fits["slope_boot_low"].isna().all() and fits["n_clusters"].isna().all()
    assert not fits["note"].str.contains("layers").any()
    assert "no layer bootstrap" in format_fit_table(fits).splitlines()[-1]
    with pytest.raises(WDAnalysisError, match="n_boot"):
        fit_lines(make_deltas(), n_boot=10)


def test_fisher_z_is_only_an_extra_iid_column():
    fits = fit_lines(make_deltas())
    assert "pearson_ci_low" not in fits.columns
    fisher = [c for c in fits.columns if "fisher" in c]
    assert fisher == ["pearson_r_fisher_low_iid", "pearson_r_fisher_high_iid"]
    header = format_fit_table(fits).splitlines()[0]
    assert "fisher" not in header.lower()


def test_y_parameter_fits_another_column():
    deltas = make_deltas()
    rng = np.random.default_rng(3)
    deltas["delta_m_learned"] = deltas["delta_d"] * 2.0 + rng.normal(0, 1e-5, len(deltas))
    got = fit_lines(deltas, y="delta_m_learned", n_boot=N_BOOT)
    want = fit_lines(deltas.assign(delta_m=deltas["delta_m_learned"]), n_boot=N_BOOT)
    assert (got["y"] == "delta_m_learned").all() and (want["y"] == "delta_m").all()
    numbers = got.select_dtypes("number").columns
    pd.testing.assert_frame_equal(got[numbers], want[numbers])
    assert (got.loc[got["scope"] == "pooled", "slope"] > 1.5).all()
    assert "of delta_m_learned on ΔD" in format_fit_table(got).splitlines()[-1]
    with pytest.raises(WDAnalysisError, match="not a column"):
        fit_lines(deltas, y="delta_x")
    deltas.loc[0, "delta_m_learned"] = np.nan  # NaNs of y are dropped and named
    with pytest.warns(UserWarning, match="delta_m_learned"):
        fit_lines(deltas, y="delta_m_learned", n_boot=0)


def test_fits_read_back_from_csv_print_the_same(tmp_path):
    fits = fit_lines(make_deltas(layers=2))  # with notes and empty intervals
    fits.to_csv(tmp_path / "fits.csv", index=False)
    again = pd.read_csv(tmp_path / "fits.csv")
    assert format_fit_table(again) == format_fit_table(fits)


def test_signs_held_of_every_pooled_row_is_sign_held_row_by_row(tmp_path):
    from wdanalysis.stats.fit_table import sign_held, signs_held
    from wdanalysis.table.schema import IDENTITY_COLUMNS, name_column

    deltas = synthetic_deltas(steps=(1, 2, 3, 4), layers=5, modules=("q", "v"), seed=7)
    deltas.loc[deltas["step"] == 2, "delta_m"] *= -3.0  # a step whose sign may differ
    fits = fit_lines(deltas, n_boot=0)
    fits.loc[fits.index[-1], "slope"] = np.nan  # a step without a fit is not counted
    for table in (fits, pd.read_csv(_csv(fits, tmp_path))):  # NaN identities from CSV too
        keys = [c for c in (name_column(table), "run", "module", *IDENTITY_COLUMNS) if c in table]
        held = signs_held(table, keys)
        pooled = table.loc[table["scope"] == "pooled"]
        assert list(held) == list(pooled.index)
        assert [held[i] for i in pooled.index] == [
            sign_held(table, row, keys) for _, row in pooled.iterrows()
        ]
        assert {h.split("/")[1] for h in held.values()} == {"4", "3"}


def _csv(fits: pd.DataFrame, tmp_path) -> str:
    path = tmp_path / "fits.csv"
    fits.to_csv(path, index=False)
    return str(path)
