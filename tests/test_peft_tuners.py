"""PEFT's tuners other than LoRA, written by PEFT itself, against PEFT's own merge.

Each tuner is applied with ``get_peft_model`` to a tiny GQA Llama built by transformers
(hidden 48, 4 query heads and 2 key/value heads of 16: ``q_proj`` (64, 48), ``v_proj``
(32, 48), ``down_proj`` (48, 80), none square, 2 layers), its trainable tensors moved off
their init, and saved with ``save_pretrained``. The reference is PEFT's ``merge_and_unload``
of the whole model in float64 and ΔM/ΔD by explicit numpy norms
(:func:`builders.reference_delta`); wdanalysis merges one module at a time.
"""

from __future__ import annotations

import copy
import json
import sys
import warnings

import pytest
import torch
from builders import check_table, reference_delta

import wdanalysis
from wdanalysis.errors import AdapterMismatchError, CheckpointFormatError
from wdanalysis.loaders import tuner_kinds

peft = pytest.importorskip("peft", reason="peft is not installed")
transformers = pytest.importorskip("transformers", reason="transformers is not installed")

from peft import PeftModel, get_peft_model  # noqa: E402
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING  # noqa: E402
from peft.utils.peft_types import PeftType  # noqa: E402

TARGETS = ["q_proj", "v_proj", "down_proj"]
# Per tuner: the config beyond target_modules (and r=4 where the tuner has a rank), sized
# for the tiny model's 48/64/80 features.
SETTINGS = {
    "ADALORA": dict(total_step=10, init_r=4, target_r=2),
    "BOFT": dict(boft_block_size=8),
    "C3A": dict(block_size=16),
    "FOURIERFT": dict(n_frequency=100),
    "IA3": dict(feedforward_modules=["down_proj"]),  # inputs scaled there, outputs elsewhere
    "OFT": dict(r=0, oft_block_size=8),
    "ROAD": dict(group_size=8),
    "TRAINABLE_TOKENS": dict(target_modules=["embed_tokens"], token_indices=[1, 5, 9]),
    "VBLORA": dict(vector_length=16, num_vectors=32),
    "WAVEFT": dict(n_frequency=100),
}
MERGED = sorted(tuner_kinds.MERGED)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """The tiny base model, saved once (fp32), and its folder."""
    config = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=48,
        intermediate_size=80,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=32,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    folder = tmp_path_factory.mktemp("tuners") / "base"
    model.save_pretrained(folder)
    return model, folder


def _config(peft_type: str, **extra):
    cls = PEFT_TYPE_TO_CONFIG_MAPPING[PeftType(peft_type)]
    fields = cls.__dataclass_fields__
    kwargs = {"target_modules": TARGETS, **({"r": 4} if "r" in fields else {})}
    kwargs.update(SETTINGS.get(peft_type, {}), **extra)
    return cls(**kwargs)


def _trained(model, peft_type: str, folder, seed=1, **extra):
    """A PEFT adapter of ``peft_type`` on a copy of ``model``, moved off its init, saved."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tuned = get_peft_model(copy.deepcopy(model), _config(peft_type, **extra))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in tuned.parameters():
            if parameter.requires_grad and parameter.is_floating_point():
                noise = torch.randn(parameter.shape, generator=gen, dtype=parameter.dtype)
                parameter.add_(0.05 * noise)
    return tuned


def _reference(model, adapter_folder, peft_type: str) -> dict:
    """PEFT's merge of the whole model in float64, as (ΔM, ΔD) per changed weight."""
    # PSOFT builds its state from W0 in float32 only: load in fp32, then merge in float64.
    start = copy.deepcopy(model)
    start = start.float() if peft_type == "PSOFT" else start.double()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merged = PeftModel.from_pretrained(start, adapter_folder).double().merge_and_unload()
    before = {k: v.double() for k, v in model.state_dict().items()}
    after = merged.state_dict()
    return {  # an embedding table is an (in, out) weight: one vector per embedding dim
        (None, None, k): reference_delta(
            before[k].numpy(), after[k].numpy(), transposed="embed" in k
        )
        for k in before
        if k.endswith(".weight") and not torch.equal(before[k], after[k])
    }


@pytest.mark.parametrize("peft_type", MERGED)
def test_tuner_rows_equal_peft_merge(base, tmp_path, peft_type):
    model, base_folder = base
    folder = tmp_path / "run" / "checkpoint-5"
    _trained(model, peft_type, folder).save_pretrained(folder)
    expected = _reference(model, folder, peft_type)
    modules = ["embed_tokens"] if peft_type == "TRAINABLE_TOKENS" else TARGETS
    assert len(expected) == (1 if peft_type == "TRAINABLE_TOKENS" else 6)
    table = wdanalysis.compare(base_folder, tmp_path / "run", modules=modules)
    assert set(table["method"]) == {tuner_kinds.tuner_name(peft_type)}
    assert check_table(table, expected, rtol=1e-9, atol=1e-15) == len(table)
    assert (table["delta_d"] > 0).all()


def test_adalora_rank_pattern_and_inspect(base, tmp_path):
    """AdaLoRA's allocated ranks (``rank_pattern``): PEFT saves only the kept ranks."""
    model, base_folder = base
    tuned = _trained(model, "ADALORA", tmp_path, seed=2)
    names = [
        n for n, _ in tuned.base_model.model.named_parameters() if n.endswith("lora_E.default")
    ]
    keep = [True, False, True, True]
    tuned.peft_config["default"].rank_pattern = {
        n.replace(".default", ""): keep[i % 2 :] + keep[: i % 2] for i, n in enumerate(names)
    }
    folder = tmp_path / "ada"
    tuned.save_pretrained(folder)
    saved = json.loads((folder / "adapter_config.json").read_text())["rank_pattern"]
    assert len(saved) == 6
    table = wdanalysis.compare(base_folder, folder, modules=TARGETS)
    assert check_table(table, _reference(model, folder, "ADALORA"), 1e-9, 1e-15) == 6
    info = wdanalysis.inspect(folder)
    assert info["method"] == "AdaLoRA" and "diag(E)" in info["weight"]
    assert info["format"].startswith("PEFT AdaLoRA adapter")


def _refusal(path) -> str:
    with pytest.raises(CheckpointFormatError) as error:
        wdanalysis.inspect(path)
    return str(error.value)


@pytest.mark.parametrize(
    "peft_type", sorted({**tuner_kinds.NO_MERGED_WEIGHT, **tuner_kinds.WHOLE_MODEL_ONLY})
)
def test_tuners_without_a_per_module_merge_are_refused(tmp_path, peft_type):
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": peft_type}))
    (folder / "adapter_model.safetensors").write_bytes(b"")
    message = _refusal(folder)
    assert peft_type in message and "\n" not in message
    if peft_type in tuner_kinds.NO_MERGED_WEIGHT:
        assert "has no merged weight" in message
    else:
        assert "one module at a time" in message and "merge_and_unload" in message


def test_every_peft_type_is_classified():
    """A PEFT release with a new tuner fails here, so that it is read or refused by name."""
    known = {"LORA", *tuner_kinds.MERGED, *tuner_kinds.NO_MERGED_WEIGHT}
    known |= set(tuner_kinds.WHOLE_MODEL_ONLY)
    assert {t.value for t in PeftType} <= known


def test_unknown_field_tensor_and_missing_tensor_are_refused(base, tmp_path):
    from safetensors.torch import load_file, save_file

    model, base_folder = base
    folder = tmp_path / "loha"
    _trained(model, "LOHA", folder).save_pretrained(folder)
    config_file, weights = folder / "adapter_config.json", folder / "adapter_model.safetensors"
    raw, tensors = json.loads(config_file.read_text()), load_file(weights)
    config_file.write_text(json.dumps({**raw, "hada_twist": 2}))
    assert "'hada_twist' is unknown" in _refusal(folder)
    config_file.write_text(json.dumps(raw))
    key = next(k for k in tensors if k.endswith("q_proj.hada_w2_b"))
    save_file({**tensors, key.replace("w2_b", "w3_b"): tensors[key].clone()}, weights)
    with pytest.raises(CheckpointFormatError, match="hada_w3_b' is not one PEFT's layer"):
        wdanalysis.compare(base_folder, folder, modules=["q_proj"])
    save_file({k: v for k, v in tensors.items() if k != key}, weights)
    with pytest.raises(CheckpointFormatError, match="lacks .*hada_w2_b"):
        wdanalysis.compare(base_folder, folder, modules=["q_proj"])


def test_vera_without_saved_projections_is_refused(base, tmp_path):
    model, _ = base
    folder = tmp_path / "vera"
    _trained(model, "VERA", folder, save_projection=False).save_pretrained(folder)
    message = _refusal(folder)
    assert "save_projection=False" in message and "\n" not in message


def test_missing_peft_names_the_extra(base, tmp_path, monkeypatch):
    model, _ = base
    folder = tmp_path / "ia3"
    _trained(model, "IA3", folder).save_pretrained(folder)
    monkeypatch.setitem(sys.modules, "peft", None)  # import peft → ImportError
    message = _refusal(folder)
    assert "IA³ adapters are merged by PEFT itself" in message
    assert "pip install 'wdanalysis[peft]'" in message


def test_gpt2_conv1d_weights(tmp_path):
    """GPT-2's Conv1D stores (in, out): PEFT's layer gets a Conv1D, as in the model."""
    config = transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=50, n_positions=8)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).eval()
    model.save_pretrained(tmp_path / "base")
    ia3 = peft.IA3Config(
        target_modules=["c_attn", "c_fc"], feedforward_modules=["c_fc"], fan_in_fan_out=True
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tuned = get_peft_model(copy.deepcopy(model), ia3)
    with torch.no_grad():
        for parameter in tuned.parameters():
            if parameter.requires_grad:
                parameter.add_(0.05 * torch.randn_like(parameter))
    tuned.save_pretrained(tmp_path / "ia3")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merged = PeftModel.from_pretrained(copy.deepcopy(model).double(), tmp_path / "ia3")
    after = merged.double().merge_and_unload().state_dict()
    before = {k: v.double() for k, v in model.state_dict().items()}
    # c_fc (32, 128), one vector per output column; c_attn (32, 96) holds q | k | v along
    # its output columns, which compare splits into q_proj, k_proj and v_proj rows.
    key = "transformer.h.0.mlp.c_fc.weight"
    expected = {
        (None, None, key): reference_delta(before[key].numpy(), after[key].numpy(), transposed=True)
    }
    table = wdanalysis.compare(tmp_path / "base", tmp_path / "ia3", modules=["c_attn", "c_fc"])
    assert check_table(table, expected, rtol=1e-9, atol=1e-15) == 1
    key = "transformer.h.0.attn.c_attn.weight"
    for part, name in enumerate(("q_proj", "k_proj", "v_proj")):
        columns = slice(32 * part, 32 * (part + 1))
        delta_m, delta_d = reference_delta(
            before[key][:, columns].numpy(), after[key][:, columns].numpy(), transposed=True
        )
        row = table[(table["parameter"] == key) & (table["module"] == name)]
        assert len(row) == 1
        assert row["delta_m"].iloc[0] == pytest.approx(delta_m, rel=1e-9, abs=1e-15)
        assert row["delta_d"].iloc[0] == pytest.approx(delta_d, rel=1e-9, abs=1e-15)
    assert len(table) == 4


def test_modules_to_save_beside_a_tuner(base, tmp_path):
    """A LoHa with ``modules_to_save=["lm_head"]``: the saved head is the new weight."""
    model, base_folder = base
    folder = tmp_path / "loha"
    _trained(model, "LOHA", folder, seed=3, modules_to_save=["lm_head"]).save_pretrained(folder)
    expected = _reference(model, folder, "LOHA")
    assert "lm_head.weight" in {k[2] for k in expected}
    table = wdanalysis.compare(base_folder, folder, modules=[*TARGETS, "lm_head"])
    assert check_table(table, expected, rtol=1e-9, atol=1e-15) == len(table) == 7


def test_adapter_of_another_size_is_refused(base, tmp_path):
    model, _ = base
    bigger = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
    )
    transformers.LlamaForCausalLM(bigger).save_pretrained(tmp_path / "bigger")
    _trained(model, "OFT", tmp_path).save_pretrained(tmp_path / "oft")
    with pytest.raises(AdapterMismatchError, match=r"'oft_R.weight' has shape .*another size"):
        wdanalysis.compare(tmp_path / "bigger", tmp_path / "oft", modules=TARGETS)
