"""The demo's regime, its design-aware summary, the seed study and the ablation grid.

Training here is tiny (a few steps, a small held-out set): these tests pin the plumbing —
which settings reach the trainer, which rows and columns come out, that finished runs are
re-read rather than retrained — not the science, which lives in the README's measured runs.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch
from matplotlib.figure import Figure
from torch import nn

from wdanalysis.demo.reproduction import DemoSettings
from wdanalysis.stats.resampling import (
    across_seed_summary,
    cluster_bootstrap,
    within_step_correlation,
)

TINY = replace(DemoSettings.quick(), steps=4, batch_size=4, eval_size=16)


@pytest.fixture(scope="module")
def seed_study(tmp_path_factory):
    from wdanalysis.demo.studies import run_seed_study

    return run_seed_study(tmp_path_factory.mktemp("seeds"), TINY, seeds=2, progress=False)


def test_demo_defaults_follow_the_dora_authors_recipe():
    settings = DemoSettings()
    assert settings.weight_decay is None and settings.max_grad_norm == 5.0  # the paper's dose
    assert settings.lr_ft == 1e-4 and settings.train_bias and settings.train_layernorm
    assert settings.warmup_steps() == round(0.1 * settings.steps)
    assert settings.lora_alpha / settings.rank == 1.0  # VL-BART scaling fixed at 1
    assert settings.save_steps() == [round(settings.steps * f) for f in (0.25, 0.5, 0.75, 1)]


def test_weight_decay_skips_biases_and_layernorm_weights():
    from wdanalysis.train.loop import parameter_groups

    model = nn.Sequential(nn.Linear(3, 5), nn.LayerNorm(5), nn.Linear(5, 2, bias=False))
    model[2].weight.requires_grad_(False)
    decay, no_decay = parameter_groups(model, 0.01)
    assert decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0
    assert [p.shape for p in decay["params"]] == [torch.Size([5, 3])]
    assert {id(p) for p in no_decay["params"]} == {
        id(model[0].bias),
        id(model[1].weight),
        id(model[1].bias),
    }
    # AdamW applies decay exactly to the first group: with zero gradients only it shrinks
    optimizer = torch.optim.AdamW([decay, no_decay], lr=0.1)
    before = [p.detach().clone() for p in (model[0].weight, model[1].weight)]
    for p in model.parameters():
        p.grad = torch.zeros_like(p) if p.requires_grad else None
    optimizer.step()
    assert torch.allclose(model[0].weight, before[0] * (1 - 0.1 * 0.01))
    assert torch.equal(model[1].weight, before[1])


def test_seed_study_trains_each_seed_with_the_demo_regime(seed_study):
    root = seed_study.first.out_dir.parent
    for seed in (0, 1):
        config = json.loads((root / f"seed{seed}" / "dora" / "train_config.json").read_text())
        assert config["seed"] == seed
        assert config["weight_decay"] == TINY.weight_decay
        assert config["warmup_steps"] == TINY.warmup_steps()
        assert config["max_grad_norm"] == TINY.max_grad_norm
        accuracy = json.loads((root / f"seed{seed}" / "ft" / "accuracy.json").read_text())
        assert sorted(map(int, accuracy["accuracy"])) == TINY.save_steps()
    # different seeds, different runs
    table = seed_study.per_seed
    r0 = table[table["seed"] == 0].set_index(["method", "module"])["pearson_r"]
    r1 = table[table["seed"] == 1].set_index(["method", "module"])["pearson_r"]
    assert not np.allclose(r0.to_numpy(), r1.to_numpy())


def test_seed_study_summary_has_one_row_per_method_and_module_with_a_t_interval(seed_study):
    summary, per_seed = seed_study.summary, seed_study.per_seed
    assert len(summary) == 6 and not summary.duplicated(["method", "module"]).any()
    assert len(per_seed) == 12 and set(per_seed["seed"]) == {0, 1}
    for _, row in summary.iterrows():
        mine = per_seed[
            (per_seed["method"] == row["method"]) & (per_seed["module"] == row["module"])
        ]
        values = mine["pearson_r"].to_numpy()
        assert row["n_seeds"] == 2
        assert row["pearson_r_mean"] == pytest.approx(values.mean())
        half = 12.706204736174698 * values.std(ddof=1) / math.sqrt(2)  # t(0.975, df=1)
        assert row["pearson_r_ci_low"] == pytest.approx(max(values.mean() - half, -1))
        assert row["pearson_r_ci_high"] == pytest.approx(min(values.mean() + half, 1))
        # seed 0's own row is kept as it was
        seed0 = mine[mine["seed"] == 0].iloc[0]
        assert row["pearson_r"] == pytest.approx(seed0["pearson_r"])
    written = pd.read_csv(seed_study.first.out_dir.parent / "summary.csv")
    assert list(written.columns) == list(summary.columns)
    assert {"n_seeds", "pearson_r_mean", "pearson_r_ci_low", "pearson_r_ci_high"} <= set(
        written.columns
    )


def test_seed_study_rereads_finished_seeds_instead_of_training_again(seed_study):
    from wdanalysis.demo.studies import run_seed_study

    root = seed_study.first.out_dir.parent
    weights = root / "seed1" / "ft" / f"checkpoint-{TINY.steps}" / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    again = run_seed_study(root, TINY, seeds=2, progress=False)
    assert weights.stat().st_mtime_ns == stamp
    pd.testing.assert_frame_equal(again.per_seed, seed_study.per_seed)


def test_demo_summary_intervals_come_from_whole_layer_resampling(seed_study):
    """The summary's interval and within-step r are the resampling module's, on the deltas."""
    result = seed_study.first
    summary = result.summary.set_index(["method", "module"])
    boot = cluster_bootstrap(result.deltas, n_boot=2000).set_index(["method", "module"])
    within = within_step_correlation(result.deltas).set_index(["method", "module"])
    for key, row in summary.iterrows():
        assert row["pearson_r_boot_low"] == pytest.approx(boot.loc[key, "pearson_r_boot_low"])
        assert row["pearson_r_boot_high"] == pytest.approx(boot.loc[key, "pearson_r_boot_high"])
        assert row["within_step_r"] == pytest.approx(within.loc[key, "within_step_r"])
        assert row["pearson_r_boot_low"] <= row["pearson_r_boot_high"]
        assert math.isnan(row["p_vs_lora"]) == (key[0] == "LoRA")
        assert 0 < row["p_vs_lora"] <= 1 or key[0] == "LoRA"


def test_seed_figure_shows_every_seed_and_the_interval(seed_study):
    from wdanalysis.plots.seed_correlations import plot_seed_correlations

    figure = plot_seed_correlations(seed_study.per_seed, module="query")
    assert isinstance(figure, Figure)
    ax = figure.axes[0]
    seed_points = sum(len(c.get_offsets()) for c in ax.collections if len(c.get_offsets()) == 2)
    assert seed_points == 6  # 3 methods x 2 seeds
    assert [t.get_text() for t in ax.get_xticklabels()] == ["FT", "LoRA", "DoRA"]
    for name in ("seeds_query.png", "seeds_value.svg", "seeds.csv"):
        assert (seed_study.first.out_dir.parent / name).stat().st_size > 0


def test_seed_figure_draws_into_a_given_axes_and_refuses_an_unknown_module():
    from wdanalysis.errors import WDAnalysisError
    from wdanalysis.plots.seed_correlations import plot_seed_correlations

    per_seed = pd.DataFrame(
        {"method": ["FT"] * 3, "module": "q", "seed": [0, 1, 2], "pearson_r": [-0.2, -0.4, -0.3]}
    )
    figure = Figure()
    ax = figure.add_subplot()
    assert plot_seed_correlations(per_seed, "q", ax=ax) is figure
    expected = across_seed_summary(per_seed).iloc[0]
    bar = next(c for c in ax.containers)  # the errorbar
    low, high = bar.lines[2][0].get_segments()[0][:, 1]
    assert low == pytest.approx(expected["pearson_r_ci_low"])
    assert high == pytest.approx(expected["pearson_r_ci_high"])
    with pytest.raises(WDAnalysisError, match="no per-seed rows"):
        plot_seed_correlations(per_seed, "value")


def test_ablation_trains_every_cell_with_its_own_settings(tmp_path):
    from wdanalysis.demo.studies import cell_name, run_ablation

    table = run_ablation(
        tmp_path, TINY, steps=(4,), weight_decays=(0.0, 0.01), warmup_ratios=(0.5,), progress=False
    )
    assert len(table) == 2 * 6
    assert set(table["cell"]) == {cell_name(4, 0.0, 0.5), cell_name(4, 0.01, 0.5)}
    for cell, wd in ((cell_name(4, 0.0, 0.5), 0.0), (cell_name(4, 0.01, 0.5), 0.01)):
        config = json.loads((tmp_path / cell / "lora" / "train_config.json").read_text())
        assert config["weight_decay"] == wd and config["warmup_steps"] == 2
        assert (table.loc[table["cell"] == cell, "weight_decay"] == wd).all()
    assert pd.read_csv(tmp_path / "ablation.csv").shape == table.shape


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--seeds", "0"], "--seeds must be at least 1"),
        (["--steps", "0"], "--steps must be positive"),
        (["--warmup-ratio", "1.5"], "--warmup-ratio in"),
    ],
)
def test_demo_refuses_bad_settings_in_one_line(flags, message, tmp_path, capsys):
    from wdanalysis.cli import main

    assert main(["demo", "--out", str(tmp_path), *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
