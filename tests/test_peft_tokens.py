"""PEFT trainable tokens (``LoraConfig(trainable_token_indices=…)``): rows of an embedding
table trained beside LoRA. Checked against PEFT's own ``merge_and_unload`` (the merged
model saved as a full checkpoint must give the same rows) and a float64 reference."""

from __future__ import annotations

import json

import pytest
import torch
from builders import check_table, reference_delta

import wdanalysis
from wdanalysis.errors import AdapterMismatchError, CheckpointFormatError

peft = pytest.importorskip("peft", reason="peft is not installed")
transformers = pytest.importorskip("transformers", reason="transformers is not installed")

from peft import LoraConfig, get_peft_model  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

EMBED = "model.embed_tokens.weight"


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llama")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=40,
        hidden_size=24,
        intermediate_size=40,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def _adapter(base, folder, indices):
    model = LlamaForCausalLM.from_pretrained(base).double()
    w0 = model.state_dict()[EMBED].clone()
    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], trainable_token_indices=indices
    )
    peft_model = get_peft_model(model, config)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, p in peft_model.named_parameters():
            if p.requires_grad:  # float32-exact, so the saved file holds these values
                p.add_(0.05 * torch.randn(p.shape, generator=gen, dtype=torch.float64))
                p.copy_(p.float().double())
    peft_model.save_pretrained(folder)
    merged = peft_model.merge_and_unload()
    merged.float().save_pretrained(folder.parent / (folder.name + "-merged"))
    return w0, merged.state_dict()[EMBED]


@pytest.mark.parametrize("form", ["list", "dict"])
def test_trainable_tokens_equal_peft_merge(tmp_path, base, form):
    indices = [1, 5, 38] if form == "list" else {"embed_tokens": [1, 5, 38]}
    w0, w1 = _adapter(base, tmp_path / "tokens", indices)
    assert not torch.equal(w0, w1)
    table = wdanalysis.compare(
        base, [tmp_path / "tokens", tmp_path / "tokens-merged"], modules=["embed_tokens"]
    )
    # an embedding table is (in, out) in wdanalysis, as for PEFT embedding LoRA
    expected = {(run, None, EMBED): reference_delta(w0.T, w1.T) for run in table["run"]}
    assert check_table(table, expected, rtol=1e-9, atol=1e-15) == len(table) == 2
    assert table["delta_m"].iloc[0] > 0


def test_trainable_tokens_bad_input(tmp_path, base):
    _adapter(base, tmp_path / "tokens", [1, 2])
    config_file = tmp_path / "tokens" / "adapter_config.json"
    raw = json.loads(config_file.read_text())

    raw["trainable_token_indices"] = [1, 2, 99]
    config_file.write_text(json.dumps(raw))
    with pytest.raises(AdapterMismatchError, match="do not fit the embedding table"):
        wdanalysis.compare(base, tmp_path / "tokens", modules=["embed_tokens"])

    raw["trainable_token_indices"] = None
    config_file.write_text(json.dumps(raw))
    with pytest.raises(CheckpointFormatError, match="no trainable_token_indices"):
        wdanalysis.compare(base, tmp_path / "tokens", modules=["embed_tokens"])


def test_target_parameters_equal_peft_merge(tmp_path, base):
    """``LoraConfig(target_parameters=…)`` (PEFT ≥ 0.17) wraps a parameter, not a module;
    its saved factors must merge as PEFT merges them."""
    model = LlamaForCausalLM.from_pretrained(base).double()
    w0 = {k: v.clone() for k, v in model.state_dict().items()}
    config = LoraConfig(
        r=3, lora_alpha=5, target_modules=[], target_parameters=["down_proj.weight"]
    )
    peft_model = get_peft_model(model, config)
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for _, p in peft_model.named_parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=gen, dtype=torch.float64))
                p.copy_(p.float().double())
    peft_model.save_pretrained(tmp_path / "params")
    merged = peft_model.merge_and_unload().state_dict()
    keys = [k for k in w0 if k.endswith("down_proj.weight")]
    expected = {(None, None, k): reference_delta(w0[k], merged[k]) for k in keys}
    table = wdanalysis.compare(base, tmp_path / "params", modules=["down_proj"])
    assert check_table(table, expected, rtol=1e-9, atol=1e-15) == len(table) == 2
