"""Issue 33: mixture-of-experts weights, gpt-oss's stacked experts and Mixtral's w1/w3/w2.

Tiny models built by transformers 5 and saved with ``save_pretrained``; adapters are PEFT's
(``merge_and_unload`` on a float64 copy, ``ParamWrapper`` included, is the truth). Which
columns of gpt-oss's ``gate_up_proj`` are the gate is read from the model's own
``_apply_gate``; Mixtral's roles from transformers' own weight conversion.
"""

from __future__ import annotations

import json

import pytest
import torch
from builders import check_table, finetuned, make_peft_adapter, reference_delta
from fused_builders import moved, noisy, one_row, save

from wdanalysis import compare, inspect
from wdanalysis.errors import WDAnalysisError

pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
]

EXPERTS, HIDDEN, INNER = 3, 16, 12


# ---------------------------------------------------------------- gpt-oss stacked experts


def gpt_oss():
    import transformers as tf

    config = tf.GptOssConfig(
        hidden_size=HIDDEN, intermediate_size=INNER, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_local_experts=EXPERTS,
        num_experts_per_tok=2, vocab_size=32, layer_types=["full_attention"],
    )  # fmt: skip
    torch.manual_seed(0)
    return noisy(tf.AutoModelForCausalLM.from_config(config))


def gate_columns(experts) -> torch.Tensor:
    """The columns of ``x @ gate_up_proj[e]`` that the model's own ``_apply_gate`` takes as
    the gate: alone non-zero, they give a non-zero output (the up half alone gives
    ``(up + 1)·glu(0) = 0``)."""
    gates = []
    for j in range(2 * INNER):
        probe = torch.zeros(1, 2 * INNER)
        probe[0, j] = 1.0
        if experts._apply_gate(probe).abs().sum() > 0:
            gates.append(j)
    return torch.tensor(gates)


def expert_expected(base_state, new_state, experts, run, layer=0, axis="out") -> dict:
    """(ΔM, ΔD) of every expert's gate/up/down, (out, in) slices of the stored (in, out)."""
    gate = gate_columns(experts)
    up = torch.tensor([j for j in range(2 * INNER) if j not in set(gate.tolist())])
    assert len(gate) == len(up) == INNER
    stem = f"model.layers.{layer}.mlp.experts"
    expected = {}
    for e in range(EXPERTS):
        for leaf, part, cols in (
            ("gate_up_proj", "gate_proj", gate),
            ("gate_up_proj", "up_proj", up),
            ("down_proj", "down_proj", None),
        ):
            w0, wt = base_state[f"{stem}.{leaf}"][e], new_state[f"{stem}.{leaf}"][e]
            if cols is not None:
                w0, wt = w0[:, cols], wt[:, cols]
            key = f"{stem}.{e}.{leaf}.weight"
            expected[(run, part, key)] = reference_delta(w0.T, wt.T, axis)
    return expected


def check_rows(table, expected: dict, rtol=1e-9) -> None:
    for (run, module, key), value in expected.items():
        check_table(one_row(table, key, module, run), {(None, None, key): value}, rtol=rtol)


def test_gpt_oss_experts_fine_tuned_per_expert_gate_up_down(tmp_path):
    model = gpt_oss()
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    ft_state = moved(base_state, seed=1)
    base, ft = save(model, tmp_path / "base"), save(model, tmp_path / "ft", ft_state)
    modules = ["gate_proj", "up_proj", "down_proj"]
    table = compare(base, {"ft": ft}, modules=modules, progress=False)
    experts = model.model.layers[0].mlp.experts
    expected = expert_expected(base_state, ft_state, experts, "ft")
    assert len(table) == len(expected) == 3 * EXPERTS
    check_rows(table, expected)
    assert set(table["layer"]) == {0}
    default = compare(base, {"ft": ft}, progress=False)  # the query/value default: attention
    assert sorted(default["module"]) == ["q_proj", "v_proj"]
    by_input = compare(base, {"ft": ft}, modules=modules, axis="in", progress=False)
    check_rows(by_input, expert_expected(base_state, ft_state, experts, "ft", axis="in"))
    described = inspect(base)["fused_projections"]  # inspect reads the experts as compare
    assert described == f"{EXPERTS} split by config.json into gate_proj, up_proj"


def test_gpt_oss_peft_target_parameters_and_q_v_lora(tmp_path):
    """PEFT's ``ParamWrapper`` LoRA on both stacked parameters, beside a q/v LoRA in the
    same adapter: every expert's parts and q/v equal PEFT's own float64 merge."""
    model = gpt_oss()
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    merged = make_peft_adapter(
        model, tmp_path / "adapter", r=2, lora_alpha=6, target_modules=["q_proj", "v_proj"],
        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
        rank_pattern={"down_proj": 2}, alpha_pattern={"down_proj": 3},
    )  # fmt: skip
    base = save(model, tmp_path / "base")
    modules = ["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"]
    table = compare(base, tmp_path / "adapter", modules=modules, progress=False)
    experts = model.model.layers[0].mlp.experts
    expected = expert_expected(base_state, merged, experts, None)
    for leaf in ("q_proj", "v_proj"):
        key = f"model.layers.0.self_attn.{leaf}.weight"
        expected[(None, leaf, key)] = reference_delta(base_state[key], merged[key])
    assert len(table) == len(expected)
    check_rows(table, expected, rtol=1e-8)
    assert set(table["method"]) == {"LoRA"}
    default = compare(base, tmp_path / "adapter", progress=False)
    assert sorted(default["module"]) == ["q_proj", "v_proj"]


def test_stacked_experts_of_an_unknown_model_are_refused_when_selected(tmp_path):
    model = gpt_oss()
    base = save(model, tmp_path / "base")
    ft = save(model, tmp_path / "ft", moved(model.state_dict(), seed=2))
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "model_type": "other_moe"}))
    with pytest.raises(WDAnalysisError, match="stacked expert parameter.*other_moe") as error:
        compare(base, ft, modules=["gate_up_proj"], progress=False)
    assert "\n" not in str(error.value)
    table = compare(base, ft, modules=["q_proj"], progress=False)  # others still work
    assert list(table["module"]) == ["q_proj"]


# --------------------------------------------------------------------------- Mixtral


def test_mixtral_w1_w3_w2_answer_to_gate_up_down(tmp_path):
    import transformers as tf

    config = tf.MixtralConfig(
        hidden_size=HIDDEN, intermediate_size=INNER, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, num_local_experts=2, vocab_size=32,
    )  # fmt: skip
    torch.manual_seed(0)
    model = noisy(tf.AutoModelForCausalLM.from_config(config))
    base = save(model, tmp_path / "base")
    from safetensors.torch import load_file

    base_state = load_file(base / "model.safetensors")  # as saved: experts.N.w1/w2/w3
    ft_state = finetuned(base_state, seed=5)
    ft = tmp_path / "ft"
    ft.mkdir()
    from safetensors.torch import save_file

    save_file(ft_state, ft / "model.safetensors", metadata={"format": "pt"})
    (ft / "config.json").write_text((base / "config.json").read_text())
    loaded = tf.AutoModelForCausalLM.from_pretrained(ft).model.layers[0].mlp.experts
    stem = "model.layers.0.block_sparse_moe.experts"
    for e in range(2):  # transformers' own conversion: gate_up = w1 | w3, down = w2
        gate, up = loaded.gate_up_proj[e].chunk(2, dim=0)
        assert torch.equal(gate, ft_state[f"{stem}.{e}.w1.weight"])
        assert torch.equal(up, ft_state[f"{stem}.{e}.w3.weight"])
        assert torch.equal(loaded.down_proj[e], ft_state[f"{stem}.{e}.w2.weight"])
    table = compare(base, ft, modules=["gate_proj", "up_proj", "down_proj"], progress=False)
    assert len(table) == 6
    for e in range(2):
        for leaf, part in (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj")):
            key = f"{stem}.{e}.{leaf}.weight"
            expected = reference_delta(base_state[key], ft_state[key])
            check_table(one_row(table, key, part), {(None, None, key): expected})
