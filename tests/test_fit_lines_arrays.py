"""fit_lines' array walk gives exactly the numbers of the plain per-group code (issue 31).

:func:`~wdanalysis.stats.fits.fit_lines` reads the table once into arrays and fits each
group from row positions (:mod:`wdanalysis.stats.grouped`) and its statistics from numpy
(:mod:`wdanalysis.stats.fast_fits`) instead of a pandas frame and scipy calls per group.
The reference here is the straightforward code it replaced, kept verbatim: a pandas
``groupby`` per group and per step, scipy's ``linregress``/``pearsonr``/``spearmanr``, a
frame-based within-step r and layer sums, and the layer bootstrap drawn from the same
seeded streams. Every column must be *bit-identical* (``check_exact``), NaNs and notes
included, on tables with NaN rows, unknown steps, one-layer, two-point, constant-ΔD and
constant-ΔM groups.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pandas as pd
import pytest
from builders import synthetic_deltas
from scipy import stats as sps

from wdanalysis.stats import fast_fits
from wdanalysis.stats.clusters import MIN_CLUSTERS, slope_r
from wdanalysis.stats.fits import (
    FIT_COLUMNS,
    IID_COLUMNS,
    drop_undefined,
    fit_groups,
    fit_lines,
    fit_one,
)


# --------------------------------------------------------------- the reference (old code)
def ref_fit_one(x: np.ndarray, y: np.ndarray) -> dict:
    out = dict.fromkeys(("slope", "intercept", "pearson_r", "spearman_rho", *IID_COLUMNS))
    out = {k: math.nan for k in out} | {"note": ""}
    n = len(x)
    if n < 2:
        return out | {"note": f"{n} point(s): a line needs at least 2"}
    if np.all(x == x[0]):
        return out | {"note": "ΔD is constant: slope and correlation undefined"}
    line = sps.linregress(x, y)
    out["slope"], out["intercept"] = float(line.slope), float(line.intercept)
    if n >= 3:
        t = sps.t.ppf(0.975, n - 2)
        se, ise = float(line.stderr), float(line.intercept_stderr)
        out |= {"slope_se_iid": se, "intercept_se_iid": ise}
        out |= {
            "slope_ci_low_iid": out["slope"] - t * se,
            "slope_ci_high_iid": out["slope"] + t * se,
        }
        out["intercept_ci_low_iid"] = out["intercept"] - t * ise
        out["intercept_ci_high_iid"] = out["intercept"] + t * ise
    if np.all(y == y[0]):
        return out | {"note": "ΔM is constant: correlation undefined"}
    pearson = sps.pearsonr(x, y)
    out["pearson_r"] = float(pearson.statistic)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        spearman = sps.spearmanr(x, y)
    out["spearman_rho"] = float(spearman.statistic)
    if n >= 3:
        out["pearson_p_iid"], out["spearman_p_iid"] = float(pearson.pvalue), float(spearman.pvalue)
    if n >= 4:
        ci = pearson.confidence_interval(confidence_level=0.95)
        out["pearson_r_fisher_low_iid"], out["pearson_r_fisher_high_iid"] = ci.low, ci.high
    if n == 2:
        out["note"] = "2 points: exact line, no standard errors, p-values or CI"
    elif n == 3:
        out["note"] = "3 points: r's Fisher-z CI needs at least 4"
    return out


def ref_within_step(frame: pd.DataFrame, y: str) -> float:
    codes, _ = pd.factorize(frame["step"].to_numpy(dtype=float, na_value=-1.0))
    counts = np.bincount(codes).astype(np.float64)
    x, v = frame["delta_d"].to_numpy(np.float64), frame[y].to_numpy(np.float64)
    x = x - (np.bincount(codes, x) / counts)[codes]
    v = v - (np.bincount(codes, v) / counts)[codes]
    sxx, sxy, svv = float(x @ x), float(x @ v), float(v @ v)
    return sxy / math.sqrt(sxx * svv) if sxx > 0 and svv > 0 else math.nan


def ref_bootstrap(frame: pd.DataFrame, rng, n_boot: int, y: str) -> dict:
    out = {"n_boot": n_boot, "boot_seed": 0, "n_clusters": math.nan}
    out |= dict.fromkeys(("slope_boot_low", "slope_boot_high"), math.nan)
    out |= dict.fromkeys(("pearson_r_boot_low", "pearson_r_boot_high"), math.nan)
    if not n_boot:
        return out
    x, v = frame["delta_d"].to_numpy(np.float64), frame[y].to_numpy(np.float64)
    parts = np.stack([np.ones_like(x), x, v, x * x, x * v, v * v], axis=1)
    codes, _ = pd.factorize(frame["parameter"], sort=False, use_na_sentinel=False)
    sums = np.zeros((codes.max() + 1, 6))
    np.add.at(sums, codes, parts)
    k = len(sums)
    counts = rng.multinomial(k, np.full(k, 1 / k), size=n_boot).astype(np.float64)
    out["n_clusters"] = k
    if k < MIN_CLUSTERS:
        return out
    tail = (1 - 0.95) / 2 * 100  # 2.5000000000000022, as fit_lines computes it
    for name, values in zip(("slope", "pearson_r"), slope_r(counts @ sums), strict=True):
        values = values[np.isfinite(values)]
        low, high = np.percentile(values, [tail, 100 - tail]) if len(values) else (np.nan,) * 2
        out[f"{name}_boot_low"], out[f"{name}_boot_high"] = float(low), float(high)
    return out


def ref_row(keys, frame, scope, step, rng, n_boot, y) -> dict:
    row = {**keys, "scope": scope, "step": step, "y": y, "n": len(frame)}
    row["n_layers"] = int(frame["layer"].nunique(dropna=True))
    row["n_steps"] = int(frame["step"].nunique(dropna=True))
    row |= ref_fit_one(frame["delta_d"].to_numpy(float), frame[y].to_numpy(float))
    row["within_step_r"] = ref_within_step(frame, y)
    return row | ref_bootstrap(frame, rng, n_boot, y)


def ref_fit_lines(deltas, by=None, per_step=True, n_boot=2000, y="delta_m") -> pd.DataFrame:
    by = fit_groups(deltas) if by is None else list(by)
    streams = {"pooled": np.random.default_rng(0), "step": np.random.default_rng([0, 1])}
    rows = []
    for key, group in drop_undefined(deltas, y=y).groupby(by, sort=False, dropna=False):
        keys = dict(zip(by, key if isinstance(key, tuple) else (key,), strict=True))
        rows.append(ref_row(keys, group, "pooled", pd.NA, streams["pooled"], n_boot, y))
        for step, at_step in group.groupby("step", sort=True, dropna=True) if per_step else ():
            rows.append(ref_row(keys, at_step, "step", step, streams["step"], n_boot, y))
    fits = pd.DataFrame(rows, columns=[*by, *FIT_COLUMNS])
    fits["step"] = fits["step"].astype("Int64")
    fits["n_clusters"] = fits["n_clusters"].astype("Int64")
    few = fits["n_clusters"].lt(MIN_CLUSTERS).fillna(False) & (fits["n_boot"] > 0)
    text = f"layer bootstrap needs at least {MIN_CLUSTERS} layers"
    notes = fits.loc[few, "note"].fillna("").astype(str)
    fits.loc[few, "note"] = [f"{n}; {text}" if n else text for n in notes]
    return fits


# --------------------------------------------------------------- awkward random tables
def awkward_table(seed: int) -> pd.DataFrame:
    """Three runs × two modules × two stacks × three steps (rows shuffled), plus runs with
    one layer, two layers (stack missing), constant ΔD and constant ΔM, NaN rows and
    unknown steps."""
    rng = np.random.default_rng(seed)
    spec = (("FT", -0.6), ("LoRA", 0.8), ("DoRA", -0.2))
    main = synthetic_deltas(spec, (100, 200, 300), 5, ("q_proj", "v_proj"), ("enc", "dec"), seed)
    solo = synthetic_deltas((("solo", 0.5),), (100, 200, 300), 1, seed=seed + 1)
    pair = synthetic_deltas((("pair", 0.5),), (100, 200), 2, seed=seed + 2)
    flat = synthetic_deltas((("flat", 0.5),), (100, 200), 4, seed=seed + 3)
    flat["delta_d"] = 3e-4
    still = synthetic_deltas((("still", 0.5),), (100, 200), 4, seed=seed + 4)
    still.loc[still["step"] == 200, "delta_m"] = 1e-3
    for frame in (solo, pair, flat, still):
        frame["stack"] = "enc"
    pair["stack"] = None  # a missing key value is a group of its own (dropna=False)
    table = pd.concat([main, solo, pair, flat, still], ignore_index=True)
    table = table.iloc[rng.permutation(len(table))].reset_index(drop=True)
    table["step"] = table["step"].astype("Int64")
    table["layer"] = table["layer"].astype("Int64")
    holes = rng.choice(len(table), 6, replace=False)
    table.loc[holes[:3], "delta_d"] = np.nan
    table.loc[holes[3:5], "delta_m"] = np.inf
    unknown = rng.choice(np.flatnonzero(table["run"] == "ft-run"), 4, replace=False)
    table.loc[unknown, "step"] = pd.NA
    return table


def both(table, **kwargs):
    """(new, reference) fits and the warnings each gave."""
    out = []
    for fit in (fit_lines, ref_fit_lines):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fits = fit(table, **kwargs)
        out.append((fits, sorted(str(w.message) for w in caught)))
    return out


@pytest.mark.parametrize("seed", [0, 1])
def test_fit_lines_is_bit_identical_to_the_per_group_reference(seed):
    table = awkward_table(seed)
    (new, new_warnings), (ref, ref_warnings) = both(table)
    pd.testing.assert_frame_equal(new, ref, check_exact=True)
    assert new_warnings == ref_warnings and any("dropped 5" in w for w in new_warnings)
    # the table really has the awkward groups the reference must agree on
    notes = " ".join(new["note"])
    for text in ("ΔD is constant", "ΔM is constant", "2 points", "3 points", "needs at least 3"):
        assert text in notes, text
    assert new["slope_boot_low"].notna().sum() > 20


@pytest.mark.parametrize(
    "kwargs", [{"per_step": False}, {"by": ["method"]}, {"n_boot": 0}, {"by": ["run", "stack"]}]
)
def test_fit_lines_options_are_bit_identical_to_the_reference(kwargs):
    (new, _), (ref, _) = both(awkward_table(2), **kwargs)
    pd.testing.assert_frame_equal(new, ref, check_exact=True)


def test_fit_one_equals_scipy_bit_for_bit_on_many_small_samples():
    """fit_one (numpy replicas of linregress/pearsonr/spearmanr) against the scipy calls:
    sizes 2..40, ties (rounded values), huge and tiny scales, negative slopes."""
    rng = np.random.default_rng(5)
    for trial in range(300):
        n = int(rng.integers(2, 41))
        x = rng.normal(size=n) * 10.0 ** rng.integers(-8, 6)
        y = -0.5 * x + rng.normal(size=n) * 10.0 ** rng.integers(-8, 6)
        if trial % 3 == 0:  # ties in both, for the average ranks
            x, y = np.round(x / x.std(), 0), np.round(y / y.std(), 1)
        want, got = ref_fit_one(x, y), fit_one(x, y)
        assert got.keys() == want.keys()
        for key, value in want.items():
            same = value == got[key] or (value != value and got[key] != got[key])
            assert same, (trial, n, key, value, got[key])


def test_fit_one_warns_as_scipy_on_a_nearly_constant_input():
    x = 1.0 + np.array([0.0, 1.0, 2.0, 3.0]) * 1e-14
    y = np.array([1.0, 3.0, 2.0, 5.0])
    for fit in (ref_fit_one, fit_one):
        with pytest.warns(sps.NearConstantInputWarning, match="nearly constant"):
            fit(x, y)


def test_fit_one_calls_scipy_where_the_replicas_do_not_apply(monkeypatch):
    """Another scipy or numpy 1.x: fit_one falls back to the scipy calls, same numbers."""
    monkeypatch.setattr(fast_fits, "REPLICATES", False)
    rng = np.random.default_rng(9)
    for n in (2, 3, 4, 9):
        x, y = rng.normal(size=n), rng.normal(size=n)
        want, got = ref_fit_one(x, y), fit_one(x, y)
        assert all(v == got[k] or (v != v and got[k] != got[k]) for k, v in want.items()), n


@pytest.mark.parametrize("replicates", [True, False])
def test_t_quantile_is_scipy_t_ppf_bit_for_bit(monkeypatch, replicates):
    """The replica calls special.stdtrit, what t.ppf calls, so a report need not import
    scipy.stats; with another scipy it calls t.ppf itself."""
    monkeypatch.setattr(fast_fits, "REPLICATES", replicates and fast_fits.REPLICATES)
    fast_fits.t_quantile.cache_clear()
    try:
        for df in [*range(1, 120), 500, 10_000]:
            for probability in (0.5, 0.9, 0.975, 0.995, 0.025):
                got = fast_fits.t_quantile(probability, df)
                assert got == float(sps.t.ppf(probability, df)), (probability, df)
    finally:
        fast_fits.t_quantile.cache_clear()
