"""Quantized mlx bases (mlx-lm's ``-q`` models, the usual base of an mlx-lm QLoRA run),
dequantized on read and checked against mlx itself.

``dequantize`` is compared with ``mx.dequantize`` run in float64 for every bit width mlx
offers; an mlx-lm model quantized by mlx-lm's own ``quantize_model`` (a mixed recipe: 4-bit
attention, 8-bit MLP with another group size, recorded per module in ``config.json``) gets
mlx-lm LoRA layers, and ΔM/ΔD must equal those of ``LoRALinear.fuse(dequantize=True)`` run
in float64. Non-affine modes and a config without ``quantization`` are refused in one line.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from builders import check_table, reference_delta

import wdanalysis
from wdanalysis.cli import main
from wdanalysis.loaders.formats.mlxquant import dequantize

mx = pytest.importorskip("mlx.core", reason="mlx (pip install 'mlx[cpu]') is not installed")
pytest.importorskip("mlx_lm", reason="mlx-lm is not installed")

from mlx.utils import tree_flatten  # noqa: E402
from mlx_lm.models import llama  # noqa: E402
from mlx_lm.tuner.utils import linear_to_lora_layers  # noqa: E402
from mlx_lm.utils import quantize_model, save_config  # noqa: E402

PARAMS = {"rank": 4, "scale": 3.0, "dropout": 0.0, "keys": ["self_attn.v_proj", "mlp.up_proj"]}
ARGS = {
    "model_type": "llama",
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "intermediate_size": 96,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-5,
    "vocab_size": 64,
}


def _f64(array) -> np.ndarray:
    return np.array(array.astype(mx.float64))


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
def test_dequantize_equals_mlx(bits):
    rng = np.random.default_rng(bits)
    w = mx.array(rng.standard_normal((3, 5, 192)).astype(np.float32)).astype(mx.float16)
    for group_size in (32, 64):
        q, scales, biases = mx.quantize(w, group_size=group_size, bits=bits)
        with mx.stream(mx.cpu):
            expected = mx.dequantize(
                q, scales.astype(mx.float64), biases.astype(mx.float64), group_size, bits
            )
        got = dequantize(
            torch.from_numpy(np.array(q)),
            torch.from_numpy(np.array(scales.astype(mx.float32))),
            torch.from_numpy(np.array(biases.astype(mx.float32))),
            group_size,
            bits,
        )
        assert got.shape == (3, 5, 192)
        np.testing.assert_array_equal(got.numpy(), _f64(expected))


def _quantized_base(folder, mode="affine"):
    mx.random.seed(0)
    model = llama.Model(llama.ModelArgs(**ARGS))
    model.set_dtype(mx.float16)

    def recipe(path, module):  # mlx-lm's mixed recipes: per-module bits in config.json
        return {"group_size": 32, "bits": 8} if "mlp" in path else True

    predicate = recipe if mode == "affine" else None
    group_size = 64 if mode == "affine" else 32
    model, config = quantize_model(
        model, dict(ARGS), group_size=group_size, bits=4, mode=mode, quant_predicate=predicate
    )
    folder.mkdir()
    mx.save_safetensors(str(folder / "model.safetensors"), dict(tree_flatten(model.parameters())))
    save_config(config, folder / "config.json")
    return model, config


def test_qlora_adapter_on_a_quantized_base_matches_mlx_fuse(tmp_path):
    model, config = _quantized_base(tmp_path / "base")
    assert config["quantization"]["model.layers.0.mlp.up_proj"]["bits"] == 8
    model.freeze()
    linear_to_lora_layers(model, 2, PARAMS)
    expected = {}
    for name, layer in model.named_modules():
        if hasattr(layer, "lora_b"):
            layer.lora_b = mx.random.normal(layer.lora_b.shape) * 0.05
            w0, fused = _fused_in_float64(layer)
            expected[(None, None, name + ".weight")] = reference_delta(_f64(w0), _f64(fused))
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    mx.save_safetensors(
        str(adapter / "adapters.safetensors"), dict(tree_flatten(model.trainable_parameters()))
    )
    save_config(
        {"fine_tune_type": "lora", "lora_parameters": PARAMS, "num_layers": 2},
        adapter / "adapter_config.json",
    )
    assert len(expected) == 4
    table = wdanalysis.compare(tmp_path / "base", adapter, modules=["v_proj", "up_proj"])
    assert check_table(table, expected, rtol=1e-9, atol=1e-15) == len(table) == 4
    assert "mlx affine quantized" in wdanalysis.inspect(tmp_path / "base")["format"]


def _fused_in_float64(layer):
    """(dequantized W0, mlx-lm's ``fuse(dequantize=True)``) of a LoRA layer on a quantized
    base, computed in float64 (the layer is left in float32 again)."""
    linear = layer.linear
    with mx.stream(mx.cpu):
        w0 = mx.dequantize(
            linear.weight,
            linear.scales.astype(mx.float64),
            linear.biases.astype(mx.float64),
            group_size=linear.group_size,
            bits=linear.bits,
        )
        linear.scales = linear.scales.astype(mx.float64)
        linear.biases = linear.biases.astype(mx.float64)
        layer.lora_a = layer.lora_a.astype(mx.float64)
        layer.lora_b = layer.lora_b.astype(mx.float64)
        fused = layer.fuse(dequantize=True).weight
    layer.lora_a = layer.lora_a.astype(mx.float32)
    layer.lora_b = layer.lora_b.astype(mx.float32)
    return w0, fused


def _one_line_error(capsys, tmp_path, base, *words):
    ft = tmp_path / "ft"
    ft.mkdir(exist_ok=True)
    mx.save_safetensors(
        str(ft / "model.safetensors"),
        dict(tree_flatten(llama.Model(llama.ModelArgs(**ARGS)).parameters())),
    )
    code = main(["compare", str(base), str(ft), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code != 0 and len(err.splitlines()) == 1, err
    for word in words:
        assert word in err, err


def test_quantized_base_without_its_config_is_refused(tmp_path, capsys):
    _quantized_base(tmp_path / "base")
    (tmp_path / "base" / "config.json").unlink()
    _one_line_error(
        capsys, tmp_path, tmp_path / "base", "'quantization' entry", "config.json", "--dequantize"
    )


def test_non_affine_mlx_quantization_is_refused(tmp_path, capsys):
    _quantized_base(tmp_path / "base", mode="mxfp4")
    _one_line_error(capsys, tmp_path, tmp_path / "base", "mxfp4", "--dequantize")


def test_qlora_on_quantized_mixture_of_experts(tmp_path):
    """LoRASwitchLinear on a quantized SwitchLinear stack: each expert dequantized, one row
    per expert, equal to mlx-lm's ``fuse(dequantize=True)`` in float64."""
    from mlx_lm.models import mixtral

    mx.random.seed(1)
    args = {**ARGS, "model_type": "mixtral", "num_local_experts": 3, "num_experts_per_tok": 2}
    model = mixtral.Model(mixtral.ModelArgs(**args))
    model, config = quantize_model(model, dict(args), group_size=32, bits=4)
    (tmp_path / "base").mkdir()
    mx.save_safetensors(
        str(tmp_path / "base" / "model.safetensors"), dict(tree_flatten(model.parameters()))
    )
    save_config(config, tmp_path / "base" / "config.json")
    model.freeze()
    params = {**PARAMS, "keys": ["block_sparse_moe.switch_mlp.up_proj"]}
    linear_to_lora_layers(model, 1, params)
    expected = {}
    for name, layer in model.named_modules():
        if hasattr(layer, "lora_b"):
            layer.lora_b = mx.random.normal(layer.lora_b.shape) * 0.05
            w0, fused = _fused_in_float64(layer)
            head, _, leaf = name.rpartition(".")
            for e in range(3):
                key = f"{head}.experts.{e}.{leaf}.weight"
                expected[(None, None, key)] = reference_delta(_f64(w0[e]), _f64(fused[e]))
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    mx.save_safetensors(
        str(adapter / "adapters.safetensors"), dict(tree_flatten(model.trainable_parameters()))
    )
    save_config(
        {"fine_tune_type": "lora", "lora_parameters": params, "num_layers": 1},
        adapter / "adapter_config.json",
    )
    assert len(expected) == 3
    table = wdanalysis.compare(tmp_path / "base", adapter, modules=["up_proj"])
    assert check_table(table, expected, rtol=1e-9, atol=1e-15) == 3
    others = table[~table["parameter"].isin([k[2] for k in expected])]  # layer 0: not adapted
    assert (others["delta_m"] == 0).all() and (others["delta_d"] == 0).all()
