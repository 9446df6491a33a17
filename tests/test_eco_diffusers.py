"""diffusers LoRA files, written by diffusers itself, checked against diffusers' own
load + ``fuse_lora``.

A tiny ``UNet2DConditionModel`` (attention ``to_k`` (8, 12), ResNet ``conv1`` (16, 8, 3, 3))
is saved with ``save_pretrained`` (``diffusion_pytorch_model.safetensors``, single and
sharded with its index); PEFT LoRA/DoRA adapters are added with ``add_adapter`` and saved
with the pipeline's ``save_lora_weights`` (``pytorch_lora_weights.safetensors``, with and
without ``lora_adapter_metadata``). The reference: a fresh float64 UNet loads the same file
with ``load_lora_adapter`` and fuses it with ``fuse_lora``.
"""

from __future__ import annotations

import pytest
import torch
from builders import check_table, reference_delta
from sd_builders import save_unet_lora, tiny_unet

import wdanalysis

diffusers = pytest.importorskip("diffusers", reason="diffusers is not installed")
pytest.importorskip("peft", reason="peft is not installed")

from peft import LoraConfig  # noqa: E402

TARGETS = ["to_k", "to_v", "conv1"]


def _unet(seed=0):
    return tiny_unet(seed)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("diffusers-base")
    unet = _unet()
    unet.save_pretrained(root / "unet")
    unet.save_pretrained(root / "sharded", max_shard_size="20KB")
    assert (root / "sharded" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    return root


def _save_lora(folder, use_dora: bool, metadata: bool) -> None:
    config = LoraConfig(r=4, lora_alpha=6, target_modules=TARGETS, use_dora=use_dora)
    save_unet_lora(_unet(), folder, config, seed=1, metadata=metadata)


def _reference(base_folder, lora_folder) -> dict:
    """diffusers' own reading of the file, fused in float64."""
    unet = diffusers.UNet2DConditionModel.from_pretrained(base_folder).double()
    w0 = {k: v.clone() for k, v in unet.state_dict().items()}
    unet.load_lora_adapter(
        str(lora_folder), weight_name="pytorch_lora_weights.safetensors", prefix="unet"
    )
    unet.fuse_lora()
    unet.unload_lora()
    merged = unet.state_dict()
    return {
        (None, None, k): reference_delta(w0[k].flatten(1), merged[k].flatten(1))
        for k in w0
        if k.endswith(".weight") and not torch.equal(w0[k], merged[k])
    }


@pytest.mark.parametrize(
    "use_dora, metadata, base_name",
    [(False, True, "unet"), (True, True, "sharded"), (False, False, "unet")],
)
def test_diffusers_lora_matches_diffusers_fuse(tmp_path, base, use_dora, metadata, base_name):
    _save_lora(tmp_path / "lora", use_dora, metadata)
    expected = _reference(base / "unet", tmp_path / "lora")
    assert any("conv1" in k[2] for k in expected) and any("to_k" in k[2] for k in expected)
    table = wdanalysis.compare(base / base_name, tmp_path / "lora", modules=TARGETS)
    assert set(table["method"]) == {"DoRA" if use_dora else "LoRA"}
    assert check_table(table, expected, rtol=1e-9, atol=1e-15) == len(table) == len(expected)
    info = wdanalysis.inspect(tmp_path / "lora")
    assert info["format"].startswith("diffusers")
    if metadata:
        assert "1.5" in info["scaling"] and "lora_adapter_metadata" in info["scaling"]
    else:
        assert info["scaling"].startswith("1 ") and "alpha = r" in info["scaling"]


def test_diffusers_network_alphas(tmp_path, base):
    """``.alpha`` tensors beside the factors (network alphas, as diffusers' kohya
    conversion produces them) set alpha per module; the reference passes the same alphas to
    diffusers' ``load_lora_adapter(network_alphas=…)``."""
    from safetensors.torch import load_file, save_file

    _save_lora(tmp_path / "plain", use_dora=False, metadata=False)
    state = load_file(str(tmp_path / "plain" / "pytorch_lora_weights.safetensors"))
    alphas = {}
    for i, key in enumerate(sorted(k for k in state if k.endswith(".lora_A.weight"))):
        alphas[key.replace(".lora_A.weight", ".alpha")] = 2.0 if i else 7.0  # one differs
    (tmp_path / "lora").mkdir()
    tensors = {**state, **{k: torch.tensor(v) for k, v in alphas.items()}}
    save_file(tensors, str(tmp_path / "lora" / "pytorch_lora_weights.safetensors"))

    unet = diffusers.UNet2DConditionModel.from_pretrained(base / "unet").double()
    w0 = {k: v.clone() for k, v in unet.state_dict().items()}
    unet.load_lora_adapter(dict(state), network_alphas=alphas, prefix="unet")
    unet.fuse_lora()
    unet.unload_lora()
    merged = unet.state_dict()
    expected = {
        (None, None, k): reference_delta(w0[k].flatten(1), merged[k].flatten(1))
        for k in w0
        if k.endswith(".weight") and not torch.equal(w0[k], merged[k])
    }
    table = wdanalysis.compare(base / "unet", tmp_path / "lora", modules=TARGETS)
    assert check_table(table, expected, rtol=1e-9, atol=1e-15) == len(table) == len(expected)
    assert "network alphas" in wdanalysis.inspect(tmp_path / "lora")["scaling"]
