"""PEFT ``lora_bias``, the Conv1D/Linear decision for ``c_attn``-named weights,
``fan_in_fan_out`` per run, and resized vocabularies.

Models are built tiny by transformers itself (LLaMA with attention biases, GPT-BigCode with
multi-query attention, GPT-2), adapters written by PEFT and merged by PEFT's own
``merge_and_unload`` in float64 for the reference; every weight is non-square.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from builders import (
    check_table,
    edit_json,
    finetuned,
    llama_config,
    make_peft_adapter,
    randomize_adapter,
    read_tensors,
    reference_delta,
    save_model,
)

import wdanalysis
from wdanalysis.errors import CheckpointFormatError

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

QV = ("q_proj", "v_proj")


def compare(base, runs, **kwargs):
    return wdanalysis.compare(base, runs, progress=False, **kwargs)


def _init(model, seed: int):
    with torch.no_grad():  # norms well away from zero, and not all alike (as tiny_model)
        for name, param in model.named_parameters():
            if param.dim() == 2:
                param.normal_(0.0, 0.2, generator=torch.Generator().manual_seed(seed + len(name)))
    return model.eval()


def llama(seed: int = 0, **overrides):
    torch.manual_seed(seed)
    return _init(transformers.LlamaForCausalLM(llama_config(**overrides)), seed)


def qv(state) -> list[str]:
    return [k for k in state if k.endswith(("q_proj.weight", "v_proj.weight"))]


# ---------------------------------------------------------------------------- lora_bias


@pytest.mark.parametrize("safe", [True, False], ids=["safetensors", "bin"])
def test_lora_bias_adapter_equals_peft_merge(tmp_path, safe):
    """lora_B.bias changes the layer's bias (PEFT: bias += s·lora_B.bias), never the weight:
    the rows are W0 + s·B@A whatever the key order of the file."""
    model = llama(seed=1, attention_bias=True)  # q_proj (48, 32), v_proj (12, 32) with biases
    state = save_model(model, tmp_path / "base")
    adapter = tmp_path / "adapter"
    merged = make_peft_adapter(
        model, adapter, seed=5, safe_serialization=safe, r=4, lora_alpha=8,
        target_modules=list(QV), lora_bias=True,
    )  # fmt: skip
    weights = adapter / ("adapter_model.safetensors" if safe else "adapter_model.bin")
    tensors = read_tensors(weights)
    assert any(k.endswith("lora_B.bias") for k in tensors)
    bias = next(k for k in state if k.endswith("q_proj.bias"))
    assert not torch.allclose(merged[bias].float(), state[bias])  # PEFT moved the bias
    expected = {(None, None, k): reference_delta(state[k], merged[k]) for k in qv(state)}

    table = compare(tmp_path / "base", adapter)  # as PEFT wrote it (.bin: B.weight, B.bias)

    assert check_table(table, expected) == 4
    assert (table["method"] == "LoRA").all()
    if not safe:  # the other order a .bin may hold them in
        torch.save(dict(reversed(list(tensors.items()))), weights)
        assert check_table(compare(tmp_path / "base", adapter), expected) == 4


def test_lora_bias_of_the_wrong_size_is_refused(tmp_path):
    model = llama(seed=1, attention_bias=True)
    save_model(model, tmp_path / "base")
    adapter = tmp_path / "adapter"
    make_peft_adapter(model, adapter, seed=5, r=4, lora_alpha=8, target_modules=["q_proj"],
                      lora_bias=True)  # fmt: skip
    tensors = read_tensors(adapter / "adapter_model.safetensors")
    key = next(k for k in tensors if k.endswith("lora_B.bias"))
    tensors[key] = torch.zeros(7)
    from safetensors.torch import save_file

    save_file(tensors, str(adapter / "adapter_model.safetensors"))
    with pytest.raises(wdanalysis.WDAnalysisError, match=r"lora_B\.bias has shape \[7\]"):
        compare(tmp_path / "base", adapter)


# ---------------------------------------------------------------------------- axis


def bigcode(seed: int = 0):
    config = transformers.GPTBigCodeConfig(
        vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=32, multi_query=True
    )
    torch.manual_seed(seed)
    return _init(transformers.GPTBigCodeForCausalLM(config), seed)


def gpt2(seed: int = 0):
    config = transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=32)
    torch.manual_seed(seed)
    return _init(transformers.GPT2LMHeadModel(config), seed)


# q | k | v of c_attn: GPT-BigCode (multi-query) rows of the (48, 32) nn.Linear, GPT-2
# columns of the (32, 96) Conv1D, as each model's forward splits them
_PARTS = {
    "gpt_bigcode": {"q_proj": slice(0, 32), "k_proj": slice(32, 40), "v_proj": slice(40, 48)},
    "gpt2": {"q_proj": slice(0, 32), "k_proj": slice(32, 64), "v_proj": slice(64, 96)},
}


@pytest.mark.parametrize("config", [True, False], ids=["config", "no-config"])
@pytest.mark.parametrize("kind", ["gpt_bigcode", "gpt2"])
def test_c_attn_axis_from_model_type_or_shapes(tmp_path, kind, config):
    """GPT-BigCode's c_attn/c_fc are nn.Linear ((48, 32), (128, 32)); GPT-2's are Conv1D
    ((32, 96), (32, 128)). --axis out = one vector per output feature in both. Without
    config.json the shapes decide the layout, and c_attn (whose head counts are then
    unknown) is refused rather than averaged over q, k and v."""
    model = bigcode(2) if kind == "gpt_bigcode" else gpt2(2)
    state = save_model(model, tmp_path / "base", config=model.config if config else None)
    if not config:
        (tmp_path / "base" / "config.json").unlink(missing_ok=True)
    ft = finetuned(state, seed=3)
    save_model(ft, tmp_path / "ft")
    keys = [k for k in state if k.endswith("attn.c_attn.weight")]
    fc = [k for k in state if k.endswith("mlp.c_fc.weight")]
    linear = kind == "gpt_bigcode"
    assert all(state[k].shape == ((48, 32) if linear else (32, 96)) for k in keys)

    table = compare(
        tmp_path / "base", tmp_path / "ft", modules=["c_attn", "c_fc"] if config else ["c_fc"]
    )

    expected = {
        (None, None, k): reference_delta(state[k], ft[k], transposed=not linear) for k in fc
    }
    assert check_table(table, expected) == 2
    wrong = reference_delta(state[fc[0]], ft[fc[0]], transposed=linear)
    assert abs(table.loc[table["parameter"] == fc[0], "delta_m"].iloc[0] - wrong[0]) > 1e-6
    if not config:
        with pytest.raises(wdanalysis.WDAnalysisError, match="no config.json"):
            compare(tmp_path / "base", tmp_path / "ft", modules=["c_attn"])
        return
    for key in keys:
        for name, cut in _PARTS[kind].items():
            a, b = (
                (state[key][cut], ft[key][cut]) if linear else (state[key][:, cut], ft[key][:, cut])
            )
            delta_m, delta_d = reference_delta(a, b, transposed=not linear)
            row = table[(table["parameter"] == key) & (table["module"] == name)]
            assert len(row) == 1
            assert row["delta_m"].iloc[0] == pytest.approx(delta_m, rel=1e-9)
            assert row["delta_d"].iloc[0] == pytest.approx(delta_d, rel=1e-9)
    assert len(table) == 2 + 3 * len(keys)


def test_peft_lora_on_bigcode_without_config(tmp_path):
    """No config.json: a LoRA on GPT-BigCode's (128, 32) nn.Linear c_fc is read as Linear."""
    model = bigcode(4)
    state = save_model(model, tmp_path / "base", config=None)
    (tmp_path / "base" / "config.json").unlink(missing_ok=True)
    merged = make_peft_adapter(model, tmp_path / "lora", seed=6, r=4, lora_alpha=8,
                               target_modules=["c_fc"])  # fmt: skip

    table = compare(tmp_path / "base", tmp_path / "lora", modules=["c_fc"])

    keys = [k for k in state if k.endswith("c_fc.weight")]
    expected = {(None, None, k): reference_delta(state[k], merged[k]) for k in keys}
    assert check_table(table, expected) == 2


def test_undecidable_c_attn_layout_is_refused_in_one_line(tmp_path):
    """No config.json and square c_fc: Conv1D and Linear cannot be told apart."""
    gen = torch.Generator().manual_seed(0)
    state = {f"h.{i}.mlp.c_fc.weight": torch.randn(8, 8, generator=gen) for i in range(2)}
    save_model(state, tmp_path / "base")
    save_model(finetuned(state, seed=1), tmp_path / "ft")
    with pytest.raises(CheckpointFormatError, match="cannot tell whether") as error:
        compare(tmp_path / "base", tmp_path / "ft", modules=["c_fc"])
    assert "\n" not in str(error.value) and "--fan-in-fan-out" in str(error.value)
    table = compare(tmp_path / "base", tmp_path / "ft", modules=["c_fc"], fan_in_fan_out=False)
    assert len(table) == 2


def test_fan_in_fan_out_of_one_run_does_not_flip_another(tmp_path):
    """A LoRA whose config says fan_in_fan_out on a LLaMA (nn.Linear: PEFT ignores the flag)
    beside a full fine-tune: both runs equal their references."""
    model = llama(seed=3)
    state = save_model(model, tmp_path / "base")
    merged = make_peft_adapter(model, tmp_path / "lora", seed=7, r=4, lora_alpha=8,
                               target_modules=["q_proj"])  # fmt: skip
    edit_json(tmp_path / "lora" / "adapter_config.json", fan_in_fan_out=True)
    ft = finetuned(state, seed=8)
    save_model(ft, tmp_path / "ft", config=model.config)

    table = compare(tmp_path / "base", {"LoRA": tmp_path / "lora", "FT": tmp_path / "ft"})

    expected = {("lora", None, k): reference_delta(state[k], merged[k]) for k in qv(state)}
    expected |= {("ft", None, k): reference_delta(state[k], ft[k]) for k in qv(state)}
    assert check_table(table, expected) == 8


def test_adapters_disagreeing_on_a_square_layout_are_refused(tmp_path):
    """No config, square weights: one run's flag says (in, out), another's (out, in)."""
    model = llama(seed=3, num_key_value_heads=4, head_dim=8)  # q_proj, v_proj (32, 32)
    save_model(model, tmp_path / "base")
    (tmp_path / "base" / "config.json").unlink()
    for name, flag in (("a", True), ("b", False)):
        make_peft_adapter(model, tmp_path / name, seed=7, r=4, lora_alpha=8,
                          target_modules=["q_proj"])  # fmt: skip
        edit_json(tmp_path / name / "adapter_config.json", fan_in_fan_out=flag)
    with pytest.raises(CheckpointFormatError, match="disagree on the layout"):
        compare(tmp_path / "base", [tmp_path / "a", tmp_path / "b"])


# ---------------------------------------------------------------------------- vocabulary


def _resized(model, rows: int, seed: int):
    bigger = copy.deepcopy(model)
    bigger.resize_token_embeddings(rows)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in ("model.embed_tokens.weight", "lm_head.weight"):
            param = bigger.get_parameter(name)
            param.mul_(1 + 0.05 * torch.randn(param.shape, generator=gen))
    return bigger


def test_resized_vocabulary_full_fine_tune(tmp_path):
    model = llama(seed=4)  # vocabulary 64, untied lm_head
    state = save_model(model, tmp_path / "base")
    bigger = _resized(model, 72, seed=5)
    ft = save_model(bigger, tmp_path / "ft")

    with pytest.warns(UserWarning, match="vocabulary resized for added tokens"):
        table = compare(tmp_path / "base", tmp_path / "ft", modules=["embed_tokens", "lm_head"])

    embed, head = "model.embed_tokens.weight", "lm_head.weight"
    assert ft[embed].shape == (72, 32)
    expected = {
        (None, None, embed): reference_delta(state[embed], ft[embed][:64], transposed=True),
        (None, None, head): reference_delta(state[head], ft[head][:64]),
    }
    assert check_table(table, expected) == 2
    assert (table["rows_added"] == 8).all()


def test_resized_vocabulary_modules_to_save(tmp_path):
    """PEFT LoRA on a model resized for added tokens, embed_tokens and lm_head saved whole."""
    from peft import LoraConfig, get_peft_model

    model = llama(seed=6)
    state = save_model(model, tmp_path / "base")
    config = LoraConfig(r=4, lora_alpha=8, target_modules=list(QV),
                        modules_to_save=["embed_tokens", "lm_head"])  # fmt: skip
    peft_model = get_peft_model(_resized(model, 70, seed=7), config)
    randomize_adapter(peft_model, seed=8)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "modules_to_save" in name:
                param.add_(
                    0.01 * torch.randn(param.shape, generator=torch.Generator().manual_seed(9))
                )
    peft_model.save_pretrained(str(tmp_path / "lora"))
    merged = copy.deepcopy(peft_model).double().merge_and_unload().state_dict()

    with pytest.warns(UserWarning, match=r"lm_head\.weight \+6"):
        table = compare(
            tmp_path / "base", tmp_path / "lora", modules=["embed_tokens", "lm_head", *QV]
        )

    embed, head = "model.embed_tokens.weight", "lm_head.weight"
    expected = {(None, None, k): reference_delta(state[k], merged[k]) for k in qv(state)}
    expected[(None, None, embed)] = reference_delta(
        state[embed], merged[embed][:64], transposed=True
    )
    expected[(None, None, head)] = reference_delta(state[head], merged[head][:64])
    assert check_table(table, expected) == 6
    added = table.set_index("parameter")["rows_added"]
    assert added[embed] == added[head] == 6 and (added[qv(state)] == 0).all()
    assert json.loads((tmp_path / "lora" / "adapter_config.json").read_text())["modules_to_save"]


def test_conv1d_model_types_are_exactly_real_transformers_types_built_on_conv1d():
    import importlib

    from transformers.models.auto.configuration_auto import (
        CONFIG_MAPPING_NAMES,
        model_type_to_module_name,
    )

    from wdanalysis.loaders.checkpoint_kinds import CONV1D_MODEL_TYPES

    for model_type in CONV1D_MODEL_TYPES:
        assert model_type in CONFIG_MAPPING_NAMES, model_type  # a real config.json model_type
        name = model_type_to_module_name(model_type)
        modeling = importlib.import_module(f"transformers.models.{name}.modeling_{name}")
        assert hasattr(modeling, "Conv1D"), model_type  # its attention is GPT-2's Conv1D
