"""Issue 36's analysis of the main cell: raw against learned r per seed and over seeds, the
mechanism test across layers, and its figures, on a synthetic table over the demo model's
real query/value keys (every number checked against numpy / safetensors directly)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from safetensors import safe_open

from wdanalysis.demo import decay_study
from wdanalysis.demo.reproduction import model_path
from wdanalysis.plots.decay import plot_r_intervals, plot_raw_vs_learned

SHRINK = {"FT": 0.95, "LoRA": 1.0, "DoRA": 0.6}


@pytest.fixture(scope="module")
def deltas():
    rng = np.random.default_rng(3)
    rows = []
    for seed in (0, 7):
        for method, shrink in SHRINK.items():
            for module in ("query", "value"):
                for layer in range(6):
                    key = f"encoder.layer.{layer}.attention.self.{module}.weight"
                    for step in (125, 250, 375, 500):
                        d = rng.uniform(1e-3, 1e-2) * step / 500
                        m = rng.uniform(1e-3, 1e-2)
                        learned = m if method == "LoRA" else rng.uniform(1e-4, 1e-3)
                        rows.append(
                            (method, method.lower(), step, layer, module, key, m, d, shrink,
                             learned, seed, "synthetic")
                        )  # fmt: skip
    columns = [*decay_study.KEEP, "seed", "source"]
    return pd.DataFrame(rows, columns=columns).astype({"step": "Int64", "layer": "Int64"})


@pytest.fixture(scope="module")
def per_seed(deltas):
    return decay_study.per_seed_statistics(deltas, n_boot=200)


def test_per_seed_r_is_the_pearson_r_of_each_y(deltas, per_seed):
    assert len(per_seed) == 2 * 3 * 2 * 2  # seeds × methods × modules × (raw, learned)
    for _, row in per_seed.iterrows():
        part = deltas[
            (deltas["seed"] == row["seed"])
            & (deltas["method"] == row["method"])
            & (deltas["module"] == row["module"])
        ]
        y = part["delta_m" if row["y"] == "raw" else "delta_m_learned"]
        assert row["pearson_r"] == pytest.approx(np.corrcoef(part["delta_d"], y)[0, 1])
        assert row["pearson_r_boot_low"] <= row["pearson_r_boot_high"]
    lora = per_seed[per_seed["method"] == "LoRA"].pivot_table("pearson_r", ["module", "seed"], "y")
    assert (lora["raw"] == lora["learned"]).all()


def test_across_seeds_is_the_mean_of_the_seeds(per_seed):
    across = decay_study.across_seeds(per_seed)
    assert len(across) == 12 and (across["n_seeds"] == 2).all()
    for _, row in across.iterrows():
        mine = per_seed[
            (per_seed["y"] == row["y"])
            & (per_seed["method"] == row["method"])
            & (per_seed["module"] == row["module"])
        ]
        assert row["pearson_r_mean"] == pytest.approx(mine["pearson_r"].mean())


def test_mechanism_against_the_base_norms(deltas):
    mech = decay_study.mechanism(deltas)
    assert len(mech) == 12 and (mech["step"] == 500).all()
    with safe_open(str(model_path() / "model.safetensors"), "pt") as f:
        for _, row in mech.iterrows():
            last = deltas[
                (deltas["seed"] == row["seed"])
                & (deltas["method"] == row["method"])
                & (deltas["module"] == row["module"])
                & (deltas["step"] == 500)
            ]
            norms = np.array(
                [f.get_tensor(k).double().norm(dim=1).mean().item() for k in last["parameter"]]
            )
            decay_only = (1 - SHRINK[row["method"]]) * norms
            assert row["r_norm_delta_d"] == pytest.approx(np.corrcoef(norms, last["delta_d"])[0, 1])
            assert row["r_norm_learned"] == pytest.approx(
                np.corrcoef(norms, last["delta_m_learned"])[0, 1]
            )
            if row["method"] == "LoRA":
                assert np.isnan(row["r_norm_decay_only"])  # S = 1: no decay-only ΔM
            else:
                assert row["r_norm_decay_only"] == pytest.approx(1.0)  # ∝ ‖w₀‖ by construction
                ratio = (last["delta_m"].to_numpy() / decay_only).mean()
                assert row["delta_m_over_decay_only"] == pytest.approx(ratio)


def test_figures_have_a_panel_per_method_and_y(deltas, per_seed):
    across = decay_study.across_seeds(per_seed)
    figure = plot_raw_vs_learned(deltas, "query", per_seed, across)
    titles = [ax.get_title() for ax in figure.axes]
    assert len(figure.axes) == 6 and all("2 seeds" in t for t in titles)
    assert titles[0].startswith("FT raw") and titles[3].startswith("FT learned")
    assert len(plot_r_intervals(per_seed, across).axes) == 2


def test_dose_response_gains_a_learned_line_where_cells_have_it():
    from wdanalysis.plots.dose_response import plot_dose_response

    rows = []
    for dose, learned in ((0.0025, float("nan")), (0.05, -0.2), (0.5, 0.4)):
        for module in ("query", "value"):
            rows.append(
                {"method": "DoRA", "module": module, "steps": 500, "seed": 0,
                 "decay_dose": dose, "pearson_r": 0.1, "pearson_r_boot_low": 0.0,
                 "pearson_r_boot_high": 0.2, "pearson_r_learned": learned}
            )  # fmt: skip
    figure = plot_dose_response(pd.DataFrame(rows))
    learned = [line for line in figure.axes[0].get_lines() if "learned" in str(line.get_label())]
    assert len(learned) == 1 and list(learned[0].get_xdata()) == [0.05, 0.5]


def test_a_stopped_run_is_compared_at_the_steps_every_method_reached(deltas):
    stopped = deltas[~((deltas["method"] == "FT") & (deltas["seed"] == 0) & (deltas["step"] > 250))]
    kept = decay_study.common_steps(stopped)
    assert set(kept[kept["seed"] == 0]["step"]) == {125, 250}
    assert set(kept[kept["seed"] == 7]["step"]) == {125, 250, 375, 500}
    assert len(kept) == len(deltas) - 3 * 2 * 6 * 2  # seed 0: 2 steps of 3 methods dropped
