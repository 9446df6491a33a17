"""torchtune adapters, written by torchtune's own checkpointer, checked against
torchtune's ``get_merged_lora_ckpt`` and its HF conversion.

A tiny ``lora_llama2`` (4 query heads, 2 key/value heads: q_proj (16, 16), k/v_proj (8, 16),
w1 (24, 16)) with LoRA or DoRA on q/k/v and the MLP. The base is the HF-format model
torchtune's ``tune_to_hf`` writes (q/k rows permuted to HF's rotary order); each epoch is
saved by ``FullModelHFCheckpointer.save_checkpoint`` as the LoRA recipe saves it: merged
full weights, ``adapter_model.pt`` (torchtune names, Meta row order), the PEFT-format
``adapter_model.safetensors`` and ``adapter_config.json``, and the copied ``config.json``.
The reference merged weights: ``get_merged_lora_ckpt`` in float64, then ``tune_to_hf``.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from builders import check_table, reference_delta
from safetensors.torch import save_file

import wdanalysis

pytest.importorskip("torchao", reason="torchao (needed by torchtune) is not installed")
try:
    from torchtune.models import convert_weights
    from torchtune.models.llama2 import lora_llama2
    from torchtune.modules.peft import get_adapter_state_dict, get_merged_lora_ckpt
    from torchtune.training.checkpointing import FullModelHFCheckpointer
except ImportError as error:  # e.g. a torchao too new for torchtune 0.6
    pytest.skip(f"torchtune cannot be imported: {error}", allow_module_level=True)

HEADS, KV_HEADS, DIM, RANK, ALPHA = 4, 2, 16, 2, 3.0
HF_CONFIG = {
    "model_type": "llama",
    "num_attention_heads": HEADS,
    "num_key_value_heads": KV_HEADS,
    "hidden_size": DIM,
    "num_hidden_layers": 2,
}


def _model(use_dora: bool):
    torch.manual_seed(0)
    model = lora_llama2(
        ["q_proj", "k_proj", "v_proj"],
        apply_lora_to_mlp=True,
        vocab_size=32,
        num_layers=2,
        num_heads=HEADS,
        num_kv_heads=KV_HEADS,
        embed_dim=DIM,
        max_seq_len=16,
        intermediate_dim=24,
        lora_rank=RANK,
        lora_alpha=ALPHA,
        use_dora=use_dora,
    )
    with torch.no_grad():  # pretrained weights, then DoRA's m = ‖W‖ as torchtune's recipe
        for name, p in model.named_parameters():
            if "lora_" not in name and "magnitude" not in name:
                p.copy_(torch.randn(p.shape) * 0.3)
        for module in model.modules():
            if hasattr(module, "initialize_dora_magnitude"):
                module.initialize_dora_magnitude()
    return model


def _to_hf(state: dict) -> dict:
    return convert_weights.tune_to_hf(state, num_heads=HEADS, num_kv_heads=KV_HEADS, dim=DIM)


def _base(root, model) -> dict:
    base = {
        k: v for k, v in model.state_dict().items() if "lora_" not in k and "magnitude" not in k
    }
    hf = {k: v.clone().contiguous() for k, v in _to_hf(base).items()}
    (root / "base").mkdir()
    save_file(hf, str(root / "base" / "model.safetensors"))
    (root / "base" / "config.json").write_text(json.dumps(HF_CONFIG))
    return hf


def _train(root, use_dora: bool, epochs=(0, 1)) -> tuple[dict, dict]:
    """Each epoch saved by torchtune's checkpointer; returns the base and, per epoch,
    the reference merged HF weights."""
    model = _model(use_dora)
    w0 = _base(root, model)
    checkpointer = FullModelHFCheckpointer(
        checkpoint_dir=str(root / "base"),
        checkpoint_files=["model.safetensors"],
        model_type="LLAMA2",
        output_dir=str(root / "run"),
    )
    checkpointer.load_checkpoint()  # as the recipe does; it sets up the output shards
    gen = torch.Generator().manual_seed(1)
    merged = {}
    for epoch in epochs:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("lora_b.weight"):
                    p.copy_(0.1 * torch.randn(p.shape, generator=gen))
                elif name.endswith("magnitude"):
                    p.mul_(1 + 0.1 * torch.randn(p.shape, generator=gen))
        state = {k: v.clone() for k, v in model.state_dict().items()}
        adapter = get_adapter_state_dict(state)
        full = get_merged_lora_ckpt({k: v.double() for k, v in state.items()}, RANK, ALPHA)
        merged[epoch] = _to_hf(full)
        config = {
            "r": RANK,
            "lora_alpha": ALPHA,
            "peft_type": "LORA",
            "target_modules": ["q_proj", "k_proj", "v_proj", "w1", "w2", "w3"],
        }
        tune_full = get_merged_lora_ckpt(state, RANK, ALPHA)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            checkpointer.save_checkpoint(
                {"model": tune_full, "adapter": adapter, "adapter_config": config}, epoch
            )
    return w0, merged


@pytest.mark.parametrize("use_dora", [False, True])
def test_torchtune_adapter_pt_matches_torchtune_merge(tmp_path, use_dora):
    w0, merged = _train(tmp_path, use_dora)
    epoch0 = tmp_path / "run" / "epoch_0"
    names = {p.name for p in epoch0.iterdir()}
    assert {"adapter_model.pt", "adapter_model.safetensors", "adapter_config.json"} <= names
    assert any(n.startswith("model-") for n in names)  # merged full weights too
    modules = ["q_proj", "k_proj", "v_proj", "gate_proj"]
    with pytest.warns(UserWarning, match="merged full weights and a torchtune adapter"):
        table = wdanalysis.compare(tmp_path / "base", tmp_path / "run", modules=modules)
    assert set(table["method"]) == {"DoRA" if use_dora else "LoRA"}
    assert sorted(set(table["step"])) == [0, 1]
    expected = {
        (None, epoch, k): reference_delta(w0[k], weights[k])
        for epoch, weights in merged.items()
        for k in weights
        if k.endswith(tuple(f"{m}.weight" for m in modules))
    }
    assert check_table(table, expected, rtol=1e-9, atol=1e-15) == len(table) == 2 * 2 * 4
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        info = wdanalysis.inspect(epoch0)
    assert info["format"].startswith("torchtune")
    assert "1.5" in info["scaling"] and "adapter_config.json" in info["scaling"]
    assert any("merged full weights" in note for note in info["notes"])


def test_torchtune_q_rows_need_the_permutation(tmp_path):
    """Without reordering lora_b's q/k rows the numbers would differ: the check is not
    blind to the Meta/HF row order."""
    w0, merged = _train(tmp_path, True, epochs=(0,))
    pt = tmp_path / "run" / "epoch_0" / "adapter_model.pt"
    state = torch.load(pt, weights_only=True)
    hf_q = "model.layers.0.self_attn.q_proj.weight"
    table = wdanalysis.compare(
        tmp_path / "base", tmp_path / "run" / "epoch_0" / "adapter_model.pt", modules=["q_proj"]
    )
    row = table[table["parameter"] == hf_q].iloc[0]
    expected = reference_delta(w0[hf_q], merged[0][hf_q])
    assert abs(row["delta_d"] - expected[1]) <= 1e-9 * expected[1]
    # the same adapter with its rows left in Meta order gives another ΔD
    b = state["layers.0.attn.q_proj.lora_b.weight"].double()
    a = state["layers.0.attn.q_proj.lora_a.weight"].double()
    wrong = w0[hf_q].double() + (ALPHA / RANK) * b @ a
    m = state["layers.0.attn.q_proj.magnitude"].double()
    wrong = m[:, None] * wrong / wrong.norm(dim=1, keepdim=True)
    assert abs(reference_delta(w0[hf_q], wrong)[1] - expected[1]) > 1e-3 * expected[1]


def test_torchtune_adapter_without_config_is_refused(tmp_path):
    _train(tmp_path, False, epochs=(0,))
    (tmp_path / "run" / "epoch_0" / "adapter_config.json").unlink()
    with pytest.raises(wdanalysis.WDAnalysisError, match="adapter_config.json"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            wdanalysis.compare(tmp_path / "base", tmp_path / "run" / "epoch_0")
