"""Design-aware statistics: within-step r, cluster bootstrap, layer permutation, seeds.

Each is checked against a hand-written reference (plain loops, numpy's own fits) and on
simulated data with a known answer: a 95 % interval must cover the truth in about 95 % of
simulations, and a test at level 0.05 must reject a true null about 5 % of the time.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from wdanalysis.stats.resampling import (
    across_seed_summary,
    cluster_bootstrap,
    layer_permutation_test,
    within_step_correlation,
)


def simulate(rng, n_layers=6, steps=(1, 2, 3, 4), slope=-0.5, layer_sd=1.0, noise=0.3, run="A"):
    """Layers × steps with a layer effect in ΔD and in ΔM's error (clustered points)."""
    rows = []
    x_layer = rng.normal(0, layer_sd, n_layers)
    u_layer = rng.normal(0, layer_sd, n_layers)
    for layer in range(n_layers):
        for step in steps:
            x = 5 + x_layer[layer] + 0.2 * rng.normal()
            y = 2 + slope * x + u_layer[layer] + noise * rng.normal()
            rows.append(
                {
                    "method": run,
                    "run": run,
                    "module": "query",
                    "step": step,
                    "layer": layer,
                    "parameter": f"layer.{layer}.query.weight",
                    "delta_d": x,
                    "delta_m": y,
                }
            )
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------- within-step r


def test_within_step_correlation_matches_a_hand_written_loop():
    rng = np.random.default_rng(1)
    data = simulate(rng, n_layers=7)
    data["delta_m"] += data["step"] * 3.0  # a common trend the centring must remove
    got = within_step_correlation(data).iloc[0]
    xs, ys = [], []
    for step in sorted(set(data["step"])):
        rows = data[data["step"] == step]
        mx, my = sum(rows["delta_d"]) / len(rows), sum(rows["delta_m"]) / len(rows)
        xs += [v - mx for v in rows["delta_d"]]
        ys += [v - my for v in rows["delta_m"]]
    sxy = sum(a * b for a, b in zip(xs, ys, strict=True))
    sxx, syy = sum(a * a for a in xs), sum(b * b for b in ys)
    assert got["within_step_r"] == pytest.approx(sxy / math.sqrt(sxx * syy), rel=1e-12)
    assert got["within_step_slope"] == pytest.approx(sxy / sxx, rel=1e-12)
    assert got["n"] == 28 and got["n_steps"] == 4


def test_within_step_correlation_sees_through_a_shared_growth_trend():
    """Both grow with training time (pooled r > 0) but within a step they are opposed."""
    rng = np.random.default_rng(2)
    rows = []
    for step in range(1, 5):
        x = rng.normal(0, 1, 12)
        y = -0.8 * x + 0.3 * rng.normal(0, 1, 12)
        for layer in range(12):
            rows.append(
                {
                    "method": "FT",
                    "run": "ft",
                    "module": "q",
                    "step": step,
                    "parameter": f"l{layer}",
                    "delta_d": 10 * step + x[layer],
                    "delta_m": 10 * step + y[layer],
                }
            )
    data = pd.DataFrame(rows)
    pooled = np.corrcoef(data["delta_d"], data["delta_m"])[0, 1]
    within = within_step_correlation(data).iloc[0]["within_step_r"]
    assert pooled > 0.9
    assert within < -0.8


# ------------------------------------------------------------------- cluster bootstrap


def test_cluster_bootstrap_matches_a_naive_resampling_of_whole_layers():
    rng = np.random.default_rng(3)
    data = simulate(rng, n_layers=5)
    got = cluster_bootstrap(data, n_boot=200, seed=11).iloc[0]
    # the same multinomial draws, applied by building each resampled table explicitly
    counts = np.random.default_rng(11).multinomial(5, np.full(5, 0.2), size=200)
    layers = list(dict.fromkeys(data["parameter"]))
    slopes, rs = [], []
    for draw in counts:
        parts = [
            data[data["parameter"] == name]
            for name, c in zip(layers, draw, strict=True)
            for _ in range(c)
        ]
        table = pd.concat(parts)
        slopes.append(np.polyfit(table["delta_d"], table["delta_m"], 1)[0])
        rs.append(np.corrcoef(table["delta_d"], table["delta_m"])[0, 1])
    assert got["slope_boot_low"] == pytest.approx(np.percentile(slopes, 2.5), rel=1e-9)
    assert got["slope_boot_high"] == pytest.approx(np.percentile(slopes, 97.5), rel=1e-9)
    assert got["pearson_r_boot_low"] == pytest.approx(np.percentile(rs, 2.5), rel=1e-9)
    assert got["pearson_r_boot_high"] == pytest.approx(np.percentile(rs, 97.5), rel=1e-9)


def test_cluster_bootstrap_covers_the_true_slope_where_the_naive_interval_does_not():
    """30 layers × 4 steps with layer-level effects: the points-as-independent t interval
    under-covers badly; whole-layer resampling covers about 95 %."""
    rng = np.random.default_rng(4)
    truth, sims = -0.5, 200
    boot_hits = naive_hits = 0
    for i in range(sims):
        data = simulate(rng, n_layers=30, slope=truth)
        boot = cluster_bootstrap(data, n_boot=400, seed=i).iloc[0]
        boot_hits += boot["slope_boot_low"] <= truth <= boot["slope_boot_high"]
        x, y = data["delta_d"].to_numpy(), data["delta_m"].to_numpy()
        fit = sps.linregress(x, y)  # the textbook interval, points taken as independent
        half = sps.t.ppf(0.975, len(x) - 2) * fit.stderr
        naive_hits += fit.slope - half <= truth <= fit.slope + half
    assert 0.88 <= boot_hits / sims <= 0.99
    assert naive_hits / sims < 0.85


def test_cluster_bootstrap_rejects_bad_arguments():
    from wdanalysis.errors import WDAnalysisError

    data = simulate(np.random.default_rng(0))
    with pytest.raises(WDAnalysisError):
        cluster_bootstrap(data, n_boot=10)


# ------------------------------------------------------------------ permutation test


def _reference_permutation_p(a: pd.DataFrame, b: pd.DataFrame) -> float:
    """Every swap pattern written out as data frames, r from numpy's corrcoef."""

    def z(frame):
        out = frame.copy()
        for c in ("delta_d", "delta_m"):
            out[c] = (out[c] - out[c].mean()) / out[c].std(ddof=0)
        return out

    def r(frame):
        return np.corrcoef(frame["delta_d"], frame["delta_m"])[0, 1]

    a, b = z(a), z(b)
    layers = sorted(set(a["parameter"]))
    observed = r(a) - r(b)
    hits = 0
    patterns = list(itertools.product((False, True), repeat=len(layers)))
    for pattern in patterns:
        new_a, new_b = [], []
        for name, swap in zip(layers, pattern, strict=True):
            block_a, block_b = a[a["parameter"] == name], b[b["parameter"] == name]
            new_a.append(block_b if swap else block_a)
            new_b.append(block_a if swap else block_b)
        hits += abs(r(pd.concat(new_a)) - r(pd.concat(new_b))) >= abs(observed) - 1e-12
    return hits / len(patterns)


def test_layer_permutation_test_matches_an_explicit_enumeration():
    rng = np.random.default_rng(5)
    a = simulate(rng, n_layers=5, slope=-0.6, run="A")
    b = simulate(rng, n_layers=5, slope=0.4, run="B")
    b["delta_d"] *= 1e3  # very different scales, as FT vs LoRA: z-scoring makes it moot
    got = layer_permutation_test(pd.concat([a, b]), "A", "B", "query")
    assert got["exact"] and got["n_permutations"] == 32
    assert got["p_value"] == pytest.approx(_reference_permutation_p(a, b), abs=1e-12)
    assert got["r_a"] == pytest.approx(np.corrcoef(a["delta_d"], a["delta_m"])[0, 1])


def test_layer_permutation_test_holds_its_level_and_has_power():
    rng = np.random.default_rng(6)
    null_rejections = power = 0
    sims = 150
    for _ in range(sims):
        a = simulate(rng, n_layers=10, slope=-0.5, run="A")
        b = simulate(rng, n_layers=10, slope=-0.5, run="B")
        null_rejections += (
            layer_permutation_test(pd.concat([a, b]), "A", "B", "query")["p_value"] <= 0.05
        )
        c = simulate(rng, n_layers=10, slope=+3.0, run="C")
        power += layer_permutation_test(pd.concat([a, c]), "A", "C", "query")["p_value"] <= 0.05
    assert null_rejections / sims <= 0.08
    assert power / sims >= 0.8


def test_layer_permutation_test_refuses_runs_on_different_layers():
    from wdanalysis.errors import WDAnalysisError

    rng = np.random.default_rng(7)
    a = simulate(rng, n_layers=4, run="A")
    b = simulate(rng, n_layers=5, run="B")
    with pytest.raises(WDAnalysisError, match="same layers"):
        layer_permutation_test(pd.concat([a, b]), "A", "B", "query")
    with pytest.raises(WDAnalysisError, match="no rows"):
        layer_permutation_test(pd.concat([a, b]), "A", "Z", "query")


# ------------------------------------------------------------------------ across seeds


def test_across_seed_summary_is_the_t_interval():
    per_seed = pd.DataFrame(
        {"method": "FT", "module": "query", "seed": [0, 1, 2], "pearson_r": [-0.2, -0.5, -0.35]}
    )
    got = across_seed_summary(per_seed).iloc[0]
    values = np.array([-0.2, -0.5, -0.35])
    half = sps.t.ppf(0.975, 2) * values.std(ddof=1) / math.sqrt(3)
    assert got["n_seeds"] == 3
    assert got["pearson_r_mean"] == pytest.approx(values.mean())
    assert got["pearson_r_ci_low"] == pytest.approx(values.mean() - half)
    assert got["pearson_r_ci_high"] == pytest.approx(values.mean() + half)


def test_across_seed_interval_covers_the_mean_about_95_percent():
    rng = np.random.default_rng(8)
    hits, sims = 0, 1000
    for _ in range(sims):
        draws = rng.normal(-0.3, 0.1, 3)
        per_seed = pd.DataFrame({"method": "D", "module": "v", "pearson_r": draws})
        row = across_seed_summary(per_seed).iloc[0]
        hits += row["pearson_r_ci_low"] <= -0.3 <= row["pearson_r_ci_high"]
    assert 0.93 <= hits / sims <= 0.97  # binomial sd 0.7 %
