"""kohya-ss / LyCORIS files, written by LyCORIS itself, checked against LyCORIS' merge.

A tiny diffusers ``UNet2DConditionModel`` (attention ``to_k`` (8, 12), ResNet convs
(16, 8, 3, 3)) and a tiny ``CLIPTextModel`` (``fc1`` (20, 12)) get LyCORIS' kohya network
(``lora_unet_…``/``lora_te_…`` keys; LoRA on Linear, LoCon on Conv, DoRA ``dora_wd`` with
both ``wd_on_output`` conventions) or ``create_lycoris`` (``lycoris_…`` keys). Files are
saved with ``save_weights``; the reference merged weights come from ``merge_to`` on a
float64 copy of the models.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from builders import check_table, reference_delta
from sd_builders import tiny_clip, tiny_unet

import wdanalysis
from wdanalysis.cli import main as _main

pytest.importorskip("lycoris", reason="lycoris-lora is not installed")
diffusers = pytest.importorskip("diffusers", reason="diffusers is not installed")

from lycoris import create_lycoris  # noqa: E402
from lycoris.kohya import create_network  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

ALPHA, CONV_ALPHA = 2.0, 1.5


def _models(seed=0):
    unet, te = tiny_unet(seed), tiny_clip(seed)
    return unet.double().eval(), te.double().eval()


def _preset(tmp_path) -> str:
    """LyCORIS' "full" preset lists time_embedding twice (a duplicate-name assertion in
    LyCORIS 4.1): target attention, MLP and ResNet blocks (Linear and Conv) instead."""
    path = tmp_path / "preset.toml"
    path.write_text(
        'enable_conv = true\nunet_target_module = ["Transformer2DModel", "ResnetBlock2D"]\n'
        'unet_target_name = []\ntext_encoder_target_module = ["CLIPAttention", "CLIPMLP"]\n'
    )
    return str(path)


def _f32_exact(network, seed: int) -> None:
    """Move every factor off its initial value, rounded so that saving as fp32 is exact."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in network.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float64)
            if name.endswith("dora_scale"):
                p.mul_(1 + 0.1 * noise)
            elif name.endswith("lora_up.weight"):
                p.copy_(0.1 * noise)
            p.copy_(p.float().double())


def _save_base(model, path, prefix=""):
    state = {prefix + k: v.float().contiguous() for k, v in model.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path))
    return {k: v.double() for k, v in state.items()}


def _merge(network, file=None) -> None:
    """LyCORIS' own merge into the (float64) models, once."""
    if file is None:  # create_lycoris' LycorisNetwork
        network.merge_to(1.0)
    else:  # the kohya network merges the components its file names
        weights = dict(__import__("safetensors.torch").torch.load_file(str(file)))
        network.merge_to(None, None, weights, None, None)


def _state(model, prefix="") -> dict:
    return {prefix + k: v.detach().clone() for k, v in model.state_dict().items()}


def _expected(base: dict, merged: dict, run: str) -> dict:
    changed = [k for k in base if k.endswith(".weight") and not torch.equal(base[k], merged[k])]
    return {  # conv kernels as (out, in·k·k) matrices
        (None, None, k): reference_delta(base[k].flatten(1), merged[k].flatten(1)) for k in changed
    }


def _check(table, expected) -> int:
    """Adapted weights match the reference; every other selected weight is unchanged."""
    checked = check_table(table, expected, rtol=1e-9, atol=1e-15)
    others = table[~table["parameter"].isin([k[2] for k in expected])]
    assert (others["delta_m"] == 0).all() and (others["delta_d"] == 0).all()
    return checked


@pytest.mark.parametrize("wd_on_output", [None, True, False])
def test_kohya_network_matches_lycoris_merge(tmp_path, wd_on_output):
    unet, te = _models()
    unet_base = _save_base(unet, tmp_path / "unet" / "diffusion_pytorch_model.safetensors")
    te_base = _save_base(te, tmp_path / "te" / "model.safetensors")
    options = {} if wd_on_output is None else {"dora_wd": True, "wd_on_output": wd_on_output}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        network = create_network(
            1.0,
            4,
            ALPHA,
            None,
            te,
            unet,
            algo="lora",
            conv_dim=3,
            conv_alpha=CONV_ALPHA,
            preset=_preset(tmp_path),
            **options,
        )
    network.apply_to(te, unet, apply_text_encoder=True, apply_unet=True)
    network.double()
    _f32_exact(network, seed=1)
    lora = tmp_path / "my_lora.safetensors"
    network.save_weights(str(lora), torch.float32, None)
    keys = list(__import__("safetensors").safe_open(str(lora), "pt").keys())
    assert any(k.startswith("lora_unet_down_blocks_0_resnets_0_conv1.") for k in keys)
    assert any(k.startswith("lora_te_encoder_layers_0_mlp_fc1.") for k in keys)
    assert any(k.endswith(".dora_scale") for k in keys) == (wd_on_output is not None)
    _merge(network, lora)
    expected_unet = _expected(unet_base, _state(unet), "my_lora")
    expected_te = _expected(te_base, _state(te), "my_lora")
    assert any(len(unet_base[k].shape) == 4 for _, _, k in expected_unet)  # convs are in

    with pytest.warns(UserWarning, match="text encoder modules left out"):
        table = wdanalysis.compare(tmp_path / "unet", lora, modules=[".*"])
    assert set(table["method"]) == {"LoRA" if wd_on_output is None else "DoRA"}
    assert _check(table, expected_unet) == len(expected_unet) > 20
    table = wdanalysis.compare(tmp_path / "te", lora, modules=[".*"])
    assert _check(table, expected_te) == len(expected_te) == 6


def test_kohya_names_found_in_a_single_file_checkpoint(tmp_path):
    """The original single-file layout: components under their prefixes in one file."""
    unet, te = _models()
    base = _save_base(unet, tmp_path / "sd" / "model.safetensors", "model.diffusion_model.")
    te_state = {f"cond_stage_model.transformer.{k}": v.clone() for k, v in te.state_dict().items()}
    save_file(
        {
            **{k: v.float() for k, v in base.items()},
            **{k: v.float().contiguous() for k, v in te_state.items()},
        },
        str(tmp_path / "sd" / "model.safetensors"),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        network = create_network(
            1.0, 2, ALPHA, None, te, unet, algo="lora", conv_dim=2, preset=_preset(tmp_path)
        )
    network.apply_to(te, unet, apply_text_encoder=True, apply_unet=True)
    network.double()
    _f32_exact(network, seed=2)
    network.save_weights(str(tmp_path / "l.safetensors"), torch.float32, None)
    _merge(network, tmp_path / "l.safetensors")
    merged = {
        **_state(unet, "model.diffusion_model."),
        **_state(te, "cond_stage_model.transformer."),
    }
    full_base = {**base, **{k: v.float().double() for k, v in te_state.items()}}
    table = wdanalysis.compare(tmp_path / "sd", tmp_path / "l.safetensors", modules=["to_k", "fc1"])
    expected = _expected(full_base, merged, "l")
    expected = {k: v for k, v in expected.items() if k[2].endswith(("to_k.weight", "fc1.weight"))}
    assert _check(table, expected) == len(expected) == len(table) > 4


def test_lycoris_prefix_and_inspect(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 10), torch.nn.Conv2d(3, 5, 3)).double()
    base = _save_base(model, tmp_path / "base" / "model.safetensors")
    network = create_lycoris(
        model, 1.0, linear_dim=2, linear_alpha=3.0, algo="lora", dora_wd=True, wd_on_output=False
    )
    network.apply_to()
    network.double()
    _f32_exact(network, seed=3)
    network.save_weights(str(tmp_path / "ly.safetensors"), torch.float32, None)
    _merge(network)
    expected = _expected(base, _state(model), "ly")
    table = wdanalysis.compare(tmp_path / "base", tmp_path / "ly.safetensors", modules=[".*"])
    assert _check(table, expected) == len(table) == 2
    info = wdanalysis.inspect(tmp_path / "ly.safetensors")
    assert info["format"].startswith("kohya-ss/LyCORIS DoRA adapter")
    assert "alpha / r" in info["scaling"] and "1.5" in info["scaling"]
    assert "per input channel" in info["magnitude_axis"]


def test_kohya_file_for_another_model_is_refused(capsys, tmp_path):
    unet, te = _models()
    _save_base(te, tmp_path / "te" / "model.safetensors")
    other = torch.nn.Sequential(torch.nn.Linear(6, 10))
    network = create_network(1.0, 2, 1.0, None, other, unet, algo="lora", preset=_preset(tmp_path))
    network.apply_to(other, unet, apply_text_encoder=False, apply_unet=True)
    network.save_weights(str(tmp_path / "x.safetensors"), torch.float32, None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        code = _main(
            [
                "compare",
                str(tmp_path / "te"),
                str(tmp_path / "x.safetensors"),
                "--out",
                str(tmp_path / "out"),
                "--no-figures",
                "--quiet",
            ]
        )
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    line = [x for x in err.splitlines() if x.startswith("wdanalysis: error: ")]
    assert len(line) == 1 and "match no base weight" in line[0], err
    assert str(tmp_path / "x.safetensors") in line[0]


def test_kohya_numbered_saves_are_steps_and_names_may_carry_more_wrappers(tmp_path):
    """sd-scripts' ``name-000001.safetensors`` saves form a run; keys written for a text
    encoder with a ``text_model.`` wrapper still find a base saved without it."""
    unet, te = _models()
    te_base = _save_base(te, tmp_path / "te" / "model.safetensors")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        network = create_network(
            1.0, 2, ALPHA, None, te, unet, algo="lora", preset=_preset(tmp_path)
        )
    network.apply_to(te, unet, apply_text_encoder=True, apply_unet=False)
    network.double()
    run = tmp_path / "run"
    run.mkdir()
    expected = {}
    for epoch in (1, 2):
        _f32_exact(network, seed=10 + epoch)
        state = {
            k.replace("lora_te_", "lora_te_text_model_"): v.float().contiguous()
            for k, v in network.state_dict().items()
            if k.startswith("lora_te_")
        }
        save_file(state, str(run / f"net-{epoch:06d}.safetensors"))
        merged = {}
        for lora in network.text_encoder_loras:  # LyCORIS' merged weight of each module
            weight = lora.get_merged_weight()[0]
            merged[lora.lora_name] = weight
        by_key = {}
        for name, _ in te.named_modules():
            flat = "lora_te_" + name.replace(".", "_")
            if flat in merged:
                by_key[name + ".weight"] = merged[flat]
        expected.update(
            {(None, epoch, k): reference_delta(te_base[k], w.detach()) for k, w in by_key.items()}
        )
    save_file(state, str(run / "net.safetensors"))  # the final save: not a numbered step
    table = wdanalysis.compare(tmp_path / "te", run, modules=[".*"])
    assert sorted(set(table["step"])) == [1, 2]
    assert _check(table, expected) == len(expected) == 12


@pytest.mark.parametrize(
    "algo, options, what",
    [  # LoHa, LoKr, full and Tucker LoCon are read: tests/test_lycoris_merge.py
        ("glora", {}, "GLoRA"),
        ("diag-oft", {}, "OFT"),
    ],
)
def test_other_lycoris_networks_are_refused_by_name(capsys, tmp_path, algo, options, what):
    """LyCORIS files of networks that are not LoRA/DoRA are named, in one line, whether or
    not they also hold lora_down/lora_up tensors."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 10), torch.nn.Conv2d(3, 5, 3))
    _save_base(model, tmp_path / "base" / "model.safetensors")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        network = create_lycoris(
            model, 1.0, linear_dim=2, linear_alpha=3.0, conv_dim=2, algo=algo, **options
        )
    network.apply_to()
    network.save_weights(str(tmp_path / "net.safetensors"), torch.float32, None)
    out = ["--out", str(tmp_path / "out")]
    code = _main(["compare", str(tmp_path / "base"), str(tmp_path / "net.safetensors"), *out])
    err = capsys.readouterr().err.strip()
    assert code != 0 and len(err.splitlines()) == 1, err
    assert what in err and "net.safetensors" in err, err
