"""PEFT adapters that used to be refused, misread or half read, built by PEFT itself:
VB-LoRA saved with ``save_only_topk_weights``, WaveFT with ``proportional_parameters``,
LN Tuning on the norms, several named adapters in one folder; and the configs PEFT itself
refuses or merges otherwise (no ``peft_type``; ``use_dora`` without magnitudes).

The reference is PEFT's own ``merge_and_unload`` of the whole model in float64, ΔM/ΔD by
explicit numpy norms (:func:`builders.reference_delta`), on a tiny GQA Llama whose targets
are not square (``q_proj`` 64×48, ``v_proj`` 32×48).
"""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from builders import check_table, reference_delta
from safetensors.torch import load_file, save_file

import wdanalysis
from wdanalysis.cli import main

peft = pytest.importorskip("peft", reason="peft is not installed")
transformers = pytest.importorskip("transformers", reason="transformers is not installed")

from peft import PeftModel, get_peft_model  # noqa: E402

QV = ["q_proj", "v_proj"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    config = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=48,
        intermediate_size=80,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    folder = tmp_path_factory.mktemp("notes") / "base"
    model.save_pretrained(folder)
    return model, folder


def _moved(tuned, seed=1):
    """Every adapter tensor moved off its init (PEFT's inits often leave W unchanged)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in tuned.named_parameters():
            trained = parameter.requires_grad or "lora_" in name  # inactive adapters too
            if trained and parameter.is_floating_point():
                parameter.add_(0.05 * torch.randn(parameter.shape, generator=gen))
    return tuned


def _peft(model, config, seed=1):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _moved(get_peft_model(copy.deepcopy(model), config), seed)


def _reference(model, folder, adapter_name="default") -> dict:
    """(ΔM, ΔD) of every weight PEFT's float64 merge changes, keyed for check_table."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = PeftModel.from_pretrained(copy.deepcopy(model).double(), folder, adapter_name)
        merged = loaded.double().merge_and_unload()
    before = {k: v.double() for k, v in model.state_dict().items()}
    after = merged.state_dict()
    return {
        k: reference_delta(before[k].numpy(), after[k].numpy())
        for k in before
        if k.endswith(".weight") and before[k].dim() == 2 and not torch.equal(before[k], after[k])
    }


def _check(table, expected: dict, run=None) -> None:
    assert expected
    rows = {(run, None, k): v for k, v in expected.items()}
    assert check_table(table, rows, rtol=1e-9, atol=1e-15) == len(expected)


def test_vblora_top_k_read_in_eval_mode(base, tmp_path):
    """``save_only_topk_weights``: PEFT merges it in eval mode (its train mode refuses)."""
    model, base_folder = base
    config = peft.VBLoRAConfig(
        target_modules=QV, r=4, vector_length=16, num_vectors=32, topk=2,
        save_only_topk_weights=True,
    )  # fmt: skip
    _peft(model, config).save_pretrained(tmp_path / "vb")
    keys = load_file(str(tmp_path / "vb" / "adapter_model.safetensors"))
    assert any(k.endswith("_topk_indices") for k in keys)  # the top-k form, not the logits
    table = wdanalysis.compare(base_folder, tmp_path / "vb", modules=QV, progress=False)
    _check(table, _reference(model, tmp_path / "vb"))


def test_waveft_proportional_counts_from_whole_model(base, tmp_path):
    """Each module's spectrum count is its share of a budget over all target shapes."""
    model, base_folder = base
    config = peft.WaveFTConfig(
        target_modules=[*QV, "down_proj"], n_frequency=60, proportional_parameters=True
    )
    _peft(model, config).save_pretrained(tmp_path / "wave")
    saved = load_file(str(tmp_path / "wave" / "adapter_model.safetensors"))
    counts = {v.numel() for k, v in saved.items() if k.endswith("waveft_spectrum")}
    assert len(counts) == 3  # three target shapes, three counts: none is n_frequency alone
    table = wdanalysis.compare(
        base_folder, tmp_path / "wave", modules=[*QV, "down_proj"], progress=False
    )
    _check(table, _reference(model, tmp_path / "wave"))


def test_ln_tuning_on_norms_blocks_no_module(base, tmp_path):
    """LN Tuning of the norms: q/v are unchanged (zero rows), the norms named in a warning."""
    model, base_folder = base
    config = peft.LNTuningConfig(target_modules=["input_layernorm", "post_attention_layernorm"])
    _peft(model, config).save_pretrained(tmp_path / "ln")
    with pytest.warns(UserWarning, match="LN Tuning adapter trains 4 vector weight"):
        table = wdanalysis.compare(base_folder, tmp_path / "ln", modules=QV, progress=False)
    assert len(table) == 4
    assert (table["delta_m"] == 0).all() and (table["delta_d"] == 0).all()
    assert _reference(model, tmp_path / "ln") == {}  # PEFT's merge leaves every matrix alone


def test_named_adapters_each_their_own_run(base, tmp_path):
    """PEFT's multi-adapter save: the default in the folder, the others in sub-folders."""
    model, base_folder = base
    tuned = _peft(model, peft.LoraConfig(target_modules=QV, r=4, lora_alpha=8))
    tuned.add_adapter("wide", peft.LoraConfig(target_modules=["v_proj"], r=2, use_dora=True))
    _moved(tuned, seed=2)  # the second adapter's tensors too
    tuned.save_pretrained(tmp_path / "multi")
    assert (tmp_path / "multi" / "wide" / "adapter_config.json").is_file()
    table = wdanalysis.compare(base_folder, tmp_path / "multi", modules=QV, progress=False)
    assert set(table["label"]) == {"default", "wide"}  # the adapter names
    pairs = set(zip(table["label"], table["method"], strict=True))
    assert pairs == {("default", "LoRA"), ("wide", "DoRA")}
    assert set(table["run"]) == {"multi/default", "multi/wide"}
    _check(table, _reference(model, tmp_path / "multi"), run="multi/default")
    wide = _reference(model, tmp_path / "multi" / "wide", adapter_name="wide")
    _check(table[table["parameter"].isin(wide)], wide, run="multi/wide")
    info = wdanalysis.inspect(tmp_path / "multi")
    assert info["adapters"] == ["default (LoRA)", "wide (DoRA)"]
    # selected_adapters without the default: the folder itself holds none
    tuned.save_pretrained(tmp_path / "only", selected_adapters=["wide"])
    table = wdanalysis.compare(base_folder, {"mine": tmp_path / "only"}, modules=QV, progress=False)
    assert set(table["label"]) == {"mine"}  # one adapter: the user's label as it is
    assert set(table["method"]) == {"DoRA"}  # the method stays the inferred one
    _check(table[table["parameter"].isin(wide)], wide)


def _one_line_refusal(capsys, base_folder, adapter, out) -> str:
    capsys.readouterr()
    code = main(["compare", str(base_folder), str(adapter), "--out", str(out), "--no-figures"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


def test_dora_without_magnitude_refused(base, tmp_path, capsys):
    """``use_dora: true`` with no magnitude in the file: PEFT would merge the init's
    magnitude, not LoRA; refused."""
    model, base_folder = base
    folder = tmp_path / "dora"
    _peft(model, peft.LoraConfig(target_modules=QV, r=4, use_dora=True)).save_pretrained(folder)
    weights = folder / "adapter_model.safetensors"
    save_file({k: v for k, v in load_file(str(weights)).items() if "magnitude" not in k},
              str(weights))  # fmt: skip
    err = _one_line_refusal(capsys, base_folder, folder, tmp_path / "out")
    assert "use_dora is true" in err and "lora_magnitude_vector" in err


def test_missing_peft_type_refused(base, tmp_path, capsys):
    model, base_folder = base
    folder = tmp_path / "lora"
    _peft(model, peft.LoraConfig(target_modules=QV, r=4)).save_pretrained(folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    del config["peft_type"]
    (folder / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(TypeError, match="peft_type"):  # PEFT itself refuses it
        peft.PeftConfig.from_pretrained(folder)
    err = _one_line_refusal(capsys, base_folder, folder, tmp_path / "out")
    assert "names no peft_type" in err


def test_named_adapters_in_every_checkpoint(base, tmp_path):
    """A Trainer run whose checkpoint-N folders each hold two named adapters: two runs."""
    model, base_folder = base
    tuned = _peft(model, peft.LoraConfig(target_modules=QV, r=4, lora_alpha=8))
    tuned.add_adapter("other", peft.LoraConfig(target_modules=["q_proj"], r=2))
    for step in (1, 2):
        _moved(tuned, seed=10 + step)
        tuned.save_pretrained(tmp_path / "run" / f"checkpoint-{step}")
    table = wdanalysis.compare(base_folder, tmp_path / "run", modules=QV, progress=False)
    assert set(zip(table["run"], table["step"], strict=True)) == {
        (run, step) for run in ("run/default", "run/other") for step in (1, 2)
    }
    last = tmp_path / "run" / "checkpoint-2"
    expected = _reference(model, last / "other", adapter_name="other")
    rows = table[(table["step"] == 2) & table["parameter"].isin(expected)]
    _check(rows, expected, run="run/other")
