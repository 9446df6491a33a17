"""torchtune adapters, laid out as torchtune's checkpointer saves them, checked against
torchtune's own ``get_merged_lora_ckpt`` and HF conversion.

torchtune 0.6's package cannot be imported beside PEFT: its ``__init__`` needs torchao, and
needs a torchao ≤ 0.14 (``torchao.dtypes.nf4tensor``), while PEFT refuses any torchao older
than 0.16 once one is installed. The functions these tests need are plain torch code, so
they are loaded from torchtune's installed source files directly (``convert_weights.py``:
``tune_to_hf``, ``tune_to_peft_adapter_weights``/``_config``; ``modules/peft/_utils.py``:
``get_merged_lora_ckpt``), and each ``epoch_N/`` folder is written with them as
``FullModelHFCheckpointer.save_checkpoint`` writes it (read in its source): merged full
weights ``model-00001-of-00001.safetensors``, ``adapter_model.pt`` (torchtune names, Meta
row order), the PEFT-format ``adapter_model.safetensors`` and ``adapter_config.json``, and
the copied ``config.json``.

``test_torchtune_own_checkpointer_output_matches_torchtune_merge`` goes further: a run
written by torchtune itself (``lora_llama2``, ``DoRALinear``, ``FullModelHFCheckpointer``)
in a separate process that stands in an empty ``torchao`` (``tests/torchtune_writer.py``).

The model: a LLaMA-2 shape with 4 query heads and 2 key/value heads (q_proj (16, 16),
k/v_proj (8, 16), w1 (24, 16)), LoRA or DoRA on q/k/v and the MLP.
"""

from __future__ import annotations

import importlib.util
import json
import warnings
from pathlib import Path

import pytest
import torch
from builders import check_table, reference_delta
from safetensors.torch import save_file

import wdanalysis


def _torchtune_source(relative: str):
    spec = importlib.util.find_spec("torchtune")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("torchtune is not installed", allow_module_level=True)
    path = Path(spec.submodule_search_locations[0]) / relative
    module_spec = importlib.util.spec_from_file_location(f"_tt_{path.stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


convert_weights = _torchtune_source("models/convert_weights.py")
peft_utils = _torchtune_source("modules/peft/_utils.py")

HEADS, KV_HEADS, DIM, HIDDEN, RANK, ALPHA = 4, 2, 16, 24, 2, 3.0
LORA = {
    "attn.q_proj": (16, 16),
    "attn.k_proj": (8, 16),
    "attn.v_proj": (8, 16),
    "mlp.w1": (HIDDEN, DIM),
    "mlp.w2": (DIM, HIDDEN),
    "mlp.w3": (HIDDEN, DIM),
}
HF_CONFIG = {
    "model_type": "llama",
    "num_attention_heads": HEADS,
    "num_key_value_heads": KV_HEADS,
    "hidden_size": DIM,
    "num_hidden_layers": 2,
}


def _base_state(gen) -> dict:
    """A torchtune-format LLaMA state dict (random pretrained weights)."""
    state = {
        "tok_embeddings.weight": torch.randn(32, DIM, generator=gen),
        "norm.scale": torch.ones(DIM),
        "output.weight": torch.randn(32, DIM, generator=gen),
    }
    for layer in range(2):
        for name, shape in {**LORA, "attn.output_proj": (DIM, DIM)}.items():
            state[f"layers.{layer}.{name}.weight"] = 0.3 * torch.randn(shape, generator=gen)
        state[f"layers.{layer}.sa_norm.scale"] = torch.ones(DIM)
        state[f"layers.{layer}.mlp_norm.scale"] = torch.ones(DIM)
    return state


def _to_hf(state: dict) -> dict:
    return convert_weights.tune_to_hf(state, num_heads=HEADS, num_kv_heads=KV_HEADS, dim=DIM)


def _save_epoch(folder: Path, state: dict, adapter: dict) -> None:
    """One epoch folder, as torchtune's FullModelHFCheckpointer.save_checkpoint lays it out."""
    folder.mkdir(parents=True)
    # get_merged_lora_ckpt adds in place: give it copies
    copies = {k: v.clone() for k, v in {**state, **adapter}.items()}
    merged = peft_utils.get_merged_lora_ckpt(copies, RANK, ALPHA)
    save_file(_to_hf(merged), str(folder / "model-00001-of-00001.safetensors"))
    torch.save(adapter, folder / "adapter_model.pt")
    peft = convert_weights.tune_to_peft_adapter_weights(
        dict(adapter), num_heads=HEADS, num_kv_heads=KV_HEADS, dim=DIM
    )
    save_file(
        {k: v.contiguous() for k, v in peft.items()}, str(folder / "adapter_model.safetensors")
    )
    config = convert_weights.tune_to_peft_adapter_config(
        {
            "r": RANK,
            "lora_alpha": ALPHA,
            "peft_type": "LORA",
            "target_modules": ["q_proj", "k_proj", "v_proj", "w1", "w2", "w3"],
        }
    )
    (folder / "adapter_config.json").write_text(json.dumps(config))
    (folder / "config.json").write_text(json.dumps(HF_CONFIG))


def _train(root, use_dora: bool, epochs=(0, 1)) -> tuple[dict, dict]:
    """The base in HF format and, per epoch, the reference merged HF weights (float64)."""
    gen = torch.Generator().manual_seed(0)
    state = _base_state(gen)
    w0 = {k: v.contiguous() for k, v in _to_hf(state).items()}
    (root / "base").mkdir()
    save_file(w0, str(root / "base" / "model.safetensors"))
    (root / "base" / "config.json").write_text(json.dumps(HF_CONFIG))
    merged = {}
    for epoch in epochs:
        adapter = {}
        for layer in range(2):
            for name, (out, inp) in LORA.items():
                key = f"layers.{layer}.{name}"
                adapter[f"{key}.lora_a.weight"] = torch.randn(RANK, inp, generator=gen) / 4
                adapter[f"{key}.lora_b.weight"] = 0.1 * torch.randn(out, RANK, generator=gen)
                if use_dora:
                    norm = state[f"{key}.weight"].norm(dim=1)
                    adapter[f"{key}.magnitude"] = norm * (1 + 0.1 * torch.randn(out, generator=gen))
        _save_epoch(root / "run" / f"epoch_{epoch}", state, adapter)
        f64 = {k: v.double() for k, v in {**state, **adapter}.items()}
        merged[epoch] = _to_hf(peft_utils.get_merged_lora_ckpt(f64, RANK, ALPHA))
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


def test_torchtune_peft_copy_keeps_q_magnitudes_in_meta_order(tmp_path):
    """Why the .pt is read: torchtune's PEFT export reorders lora_B's q/k rows but not the
    DoRA magnitude, so the PEFT copy merges q/k wrongly (v is right)."""
    w0, merged = _train(tmp_path, True, epochs=(0,))
    peft_only = tmp_path / "peft_only"
    peft_only.mkdir()
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        (peft_only / name).write_bytes((tmp_path / "run" / "epoch_0" / name).read_bytes())
    table = wdanalysis.compare(tmp_path / "base", peft_only, modules=["q_proj", "v_proj"])
    for key, wrong in (("q_proj", True), ("v_proj", False)):
        hf = f"model.layers.0.self_attn.{key}.weight"
        got = table[table["parameter"] == hf].iloc[0]["delta_m"]
        expected = reference_delta(w0[hf], merged[0][hf])[0]
        assert (abs(got - expected) > 1e-6 * expected) == wrong, key


@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_torchtune_own_checkpointer_output_matches_torchtune_merge(tmp_path, kind):
    """A run written by torchtune itself: its ``lora_llama2`` (``DoRALinear`` with its own
    magnitude initialisation) saved by ``FullModelHFCheckpointer.save_checkpoint``, in a
    separate process (``tests/torchtune_writer.py`` says why)."""
    import subprocess
    import sys

    from safetensors.torch import load_file

    writer = Path(__file__).with_name("torchtune_writer.py")
    done = subprocess.run(
        [sys.executable, str(writer), str(tmp_path), kind], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-2000:]
    names = {p.name for p in (tmp_path / "out" / "epoch_0").iterdir()}
    assert {"adapter_model.pt", "adapter_model.safetensors", "config.json"} <= names
    w0 = load_file(str(tmp_path / "base" / "model.safetensors"))
    modules = ["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "down_proj"]
    expected = {}
    for epoch in (0, 1):
        merged = load_file(str(tmp_path / f"reference_{epoch}.safetensors"))
        for key, weight in merged.items():
            if key.endswith(tuple(f"{m}.weight" for m in modules)):
                expected[("out", epoch, key)] = reference_delta(w0[key].double(), weight)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "holds merged full weights … analysing the adapter"
        table = wdanalysis.compare(tmp_path / "base", tmp_path / "out", modules=modules)
    assert set(table["method"]) == {"DoRA" if kind == "dora" else "LoRA"}
    assert check_table(table, expected, rtol=1e-9, atol=1e-15) == len(table) == 24
