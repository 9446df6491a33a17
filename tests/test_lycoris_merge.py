"""LyCORIS LoHa, LoKr, full and Tucker LoCon networks, written by LyCORIS itself, against
LyCORIS' own merge.

``create_lycoris`` on a tiny model (a Linear (20, 12) and a Conv2d (6, 4, 3, 3), neither
square) in float64, every trainable tensor moved off its init (rounded to fp32 so that
the saved file is exact), ``save_weights``; the reference is ``merge_to`` of the whole
network and ΔM/ΔD by explicit numpy norms (:func:`builders.reference_delta`).
"""

from __future__ import annotations

import pytest
import torch
from builders import check_table, reference_delta
from safetensors.torch import load_file, save_file

import wdanalysis
from wdanalysis.errors import CheckpointFormatError

pytest.importorskip("lycoris", reason="lycoris-lora is not installed")
from lycoris import create_lycoris  # noqa: E402


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(12, 20)
        self.conv = torch.nn.Conv2d(4, 6, 3)


NETWORKS = {
    "LoHa": dict(algo="loha"),
    "LoHa (Tucker)": dict(algo="loha", use_tucker=True),
    "LoKr": dict(algo="lokr", factor=4),
    "LoKr, both decomposed": dict(algo="lokr", factor=2, decompose_both=True),
    "full": dict(algo="full"),
    "LoCon (Tucker)": dict(algo="locon", use_tucker=True),
    "LoHa DoRA on outputs": dict(algo="loha", dora_wd=True, wd_on_output=True),
    "LoKr DoRA on inputs": dict(algo="lokr", factor=4, dora_wd=True, wd_on_output=False),
}
METHODS = {
    "LoHa": "LoHa",
    "LoHa (Tucker)": "LoHa (Tucker)",
    "LoKr": "LoKr",
    "LoKr, both decomposed": "LoKr",
    "full": "full",
    "LoCon (Tucker)": "LoCon (Tucker)",
    "LoHa DoRA on outputs": "LoHa",
    "LoKr DoRA on inputs": "LoKr",
}


def _network(tmp_path, options, seed=0):
    torch.manual_seed(seed)
    model = Tiny().double()
    base = {k: v.float() for k, v in model.state_dict().items()}
    (tmp_path / "base").mkdir()
    save_file(base, str(tmp_path / "base" / "model.safetensors"))
    network = create_lycoris(
        model, 1.0, linear_dim=3, linear_alpha=2.0, conv_dim=2, conv_alpha=1.5, **options
    )
    network.apply_to()
    network.double()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for _name, p in network.named_parameters():
            noise = 0.1 * torch.randn(p.shape, generator=gen, dtype=torch.float64)
            p.add_(noise.float().double())  # full: saved diff = noise, exact in fp32
            if options["algo"] != "full":
                p.copy_(p.float().double())
    path = tmp_path / "net.safetensors"
    network.save_weights(str(path), torch.float32, None)
    if options["algo"] == "full":  # after apply_to its .weight is the trained weight
        # (and LyCORIS' merge_to fails on it: the layer's own weight is removed)
        merged = {
            f"{lora.lora_name[len('lycoris_') :]}.weight": lora.weight.detach().clone()
            for lora in network.loras
        }
    else:
        network.merge_to(1.0)
        merged = {k: v.detach().clone() for k, v in model.state_dict().items()}
    expected = {  # conv kernels as (out, in·k·k) matrices
        (None, None, k): reference_delta(
            base[k].double().flatten(1).numpy(), merged[k].flatten(1).numpy()
        )
        for k in ("fc.weight", "conv.weight")
    }
    return path, expected


@pytest.mark.parametrize("kind", sorted(NETWORKS))
def test_lycoris_network_equals_lycoris_merge(tmp_path, kind):
    path, expected = _network(tmp_path, NETWORKS[kind])
    table = wdanalysis.compare(tmp_path / "base", path, modules=[".*"])
    assert set(table["method"]) == {METHODS[kind]}
    assert check_table(table, expected, rtol=1e-9, atol=1e-15) == len(table) == 2
    assert (table["delta_d"] > 0).all()


def test_inspect_and_unknown_tensor(tmp_path):
    path, _ = _network(tmp_path, NETWORKS["LoKr"])
    info = wdanalysis.inspect(path)
    assert info["format"].startswith("kohya-ss/LyCORIS LoKr network")
    assert "get_merged_weight" in info["weight"]
    tensors = load_file(str(path))
    name = next(k for k in tensors if k.endswith(".lokr_w1")).rpartition(".")[0]
    save_file({**tensors, f"{name}.lokr_w9": tensors[f"{name}.lokr_w1"].clone()}, str(path))
    with pytest.raises(CheckpointFormatError, match=r"unsupported tensor .*lokr_w9"):
        wdanalysis.inspect(path)


def test_kohya_loha_on_a_unet(tmp_path):
    """sd-scripts' names (``lora_unet_…``) on a diffusers UNet, LoHa on its attention and
    ResNet convs, against LyCORIS' kohya network merge."""
    pytest.importorskip("diffusers", reason="diffusers is not installed")
    from lycoris.kohya import create_network
    from sd_builders import tiny_clip, tiny_unet

    unet, te = tiny_unet(0).double().eval(), tiny_clip(0).double().eval()
    base = {k: v.float() for k, v in unet.state_dict().items()}
    (tmp_path / "unet").mkdir()
    save_file(base, str(tmp_path / "unet" / "diffusion_pytorch_model.safetensors"))
    preset = tmp_path / "preset.toml"
    preset.write_text(
        'enable_conv = true\nunet_target_module = ["Transformer2DModel", "ResnetBlock2D"]\n'
        'unet_target_name = []\ntext_encoder_target_module = ["CLIPAttention"]\n'
    )
    network = create_network(
        1.0, 4, 2.0, None, te, unet, algo="loha", conv_dim=3, conv_alpha=1.5, preset=str(preset)
    )
    network.apply_to(te, unet, apply_text_encoder=False, apply_unet=True)
    network.double()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _name, p in network.named_parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen, dtype=torch.float64))
            p.copy_(p.float().double())
    path = tmp_path / "loha.safetensors"
    network.save_weights(str(path), torch.float32, None)
    network.merge_to(None, None, load_file(str(path)), None, None)
    merged = unet.state_dict()
    changed = [
        k for k in base if k.endswith(".weight") and not torch.equal(base[k].double(), merged[k])
    ]
    expected = {
        (None, None, k): reference_delta(
            base[k].double().flatten(1).numpy(), merged[k].flatten(1).numpy()
        )
        for k in changed
    }
    assert any(base[k].dim() == 4 for k in changed)  # the ResNet convs are in
    table = wdanalysis.compare(tmp_path / "unet", path, modules=[".*"])
    assert set(table["method"]) == {"LoHa"}
    assert check_table(table, expected, rtol=1e-9, atol=1e-15) == len(expected) > 20


def test_missing_lycoris_names_the_extra(tmp_path, monkeypatch):
    import sys

    path, _ = _network(tmp_path, NETWORKS["LoHa"])
    monkeypatch.setitem(sys.modules, "lycoris.modules", None)  # import → ImportError
    with pytest.raises(CheckpointFormatError, match=r"merged by LyCORIS itself.*lycoris-lora"):
        wdanalysis.inspect(path)
