"""FP8 weights (``F8_E4M3`` / ``F8_E5M2``) with their scales, dequantized exactly on read.

Checkpoints are written the way their formats write them: DeepSeek-V3 style block scales
(``weight_scale_inv``, 128×128, partial edge blocks, ``quant_method: fp8``) by torch's float8
dtypes and safetensors, and compressed-tensors FP8 (per channel, per tensor, per block) by
compressed-tensors' own ``ModelCompressor``. ΔM/ΔD are checked against an independent float64
dequantization: transformers' ``_dequantize_fp8_weight`` in float64 for the block scales,
compressed-tensors' ``dequantize`` in float64 for its checkpoints, and explicit per-block loops.
Non-square weights (v_proj 100×200, up_proj 328×200) with partial blocks throughout.
"""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
from builders import check_table, reference_delta
from safetensors import safe_open
from safetensors.torch import save_file

import wdanalysis
from wdanalysis.cli import main
from wdanalysis.loaders.formats import fp8quant
from wdanalysis.loaders.runs import open_base
from wdanalysis.table.comparison import plan_comparison

transformers = pytest.importorskip("transformers")

BLOCK = (128, 128)
SELECT = ["v_proj", "up_proj"]
V = "model.layers.0.self_attn.v_proj.weight"
UP = "model.layers.0.mlp.up_proj.weight"
FP8_CONFIG = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": list(BLOCK)}


def _llama(seed: int = 0):
    config = transformers.LlamaConfig(
        hidden_size=200,
        intermediate_size=328,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=50,
        vocab_size=64,
    )
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config)


def _quantize_blocks(w: torch.Tensor, block, dtype=torch.float8_e4m3fn):
    """DeepSeek-V3's block quantization: one float32 scale per block, amax/max."""
    out, n_in = w.shape
    rows, cols = math.ceil(out / block[0]), math.ceil(n_in / block[1])
    scale = torch.empty(rows, cols, dtype=torch.float32)
    q = torch.empty(out, n_in, dtype=dtype)
    top = torch.finfo(dtype).max
    for i in range(rows):
        for j in range(cols):
            part = w[i * block[0] : (i + 1) * block[0], j * block[1] : (j + 1) * block[1]]
            scale[i, j] = part.abs().max().float() / top
            q[i * block[0] : (i + 1) * block[0], j * block[1] : (j + 1) * block[1]] = (
                part.float() / scale[i, j]
            ).to(dtype)
    return q, scale


def _loop_dequantize(q: torch.Tensor, scale: torch.Tensor, block) -> np.ndarray:
    """The block rule written out entry by block: W = q · scale of its block."""
    w = q.to(torch.float64).numpy().copy()
    s = scale.to(torch.float64).numpy()
    for i in range(s.shape[0]):
        for j in range(s.shape[1]):
            w[i * block[0] : (i + 1) * block[0], j * block[1] : (j + 1) * block[1]] *= s[i, j]
    return w


def _write_fp8(model, folder, block=BLOCK, dtype=torch.float8_e4m3fn, config=FP8_CONFIG):
    """The model saved as DeepSeek-V3 saves it: linear weights FP8 + weight_scale_inv."""
    model.save_pretrained(folder)  # config.json, then the weights replaced
    state, reference = {}, {}
    for key, value in model.state_dict().items():
        value = value.detach().contiguous()
        if key.endswith("proj.weight"):
            q, scale = _quantize_blocks(value, block, dtype)
            state[key], state[key + "_scale_inv"] = q, scale
            reference[key] = _loop_dequantize(q, scale, block)
        else:
            state[key] = value
            reference[key] = value.to(torch.float64).numpy()
    (folder / "model.safetensors").unlink()
    save_file(state, str(folder / "model.safetensors"))
    raw = json.loads((folder / "config.json").read_text())
    if config is not None:
        raw["quantization_config"] = config
    (folder / "config.json").write_text(json.dumps(raw))
    return reference


def _write_full(weights: dict, model, folder):
    """A float32 fine-tuned checkpoint whose selected weights are ``weights``."""
    with torch.no_grad():
        for key, value in weights.items():
            model.get_parameter(key).copy_(torch.from_numpy(value).float())
    model.save_pretrained(folder)
    return {k: model.get_parameter(k).detach().double().numpy() for k in weights}


def test_block_dequantize_equals_transformers_float64():
    """The block rule, partial edge blocks, against transformers' own (run in float64)."""
    from transformers.integrations.finegrained_fp8 import _dequantize_fp8_weight

    w = torch.randn(300, 200) * 0.05
    for dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        q, scale = _quantize_blocks(w, BLOCK, dtype)
        got = fp8quant.dequantize_rows(q, scale, BLOCK, 0, q.shape)
        expected = _dequantize_fp8_weight(q, scale, list(BLOCK), torch.float64)
        assert torch.equal(got, expected)
        assert np.array_equal(got.numpy(), _loop_dequantize(q, scale, BLOCK))
        # any row range, starting inside a block: the rows of the whole
        part = fp8quant.dequantize_rows(q[100:270], scale, BLOCK, 100, q.shape)
        assert torch.equal(part, expected[100:270])


def test_fp8_block_base_and_checkpoint(tmp_path):
    """A DeepSeek-style FP8 base against a float32 FT checkpoint, and an FP8 checkpoint
    against a float32 base: ΔM/ΔD equal those of the float64 dequantized weights."""
    model = _llama()
    base_ref = _write_fp8(model, tmp_path / "base")
    rng = np.random.default_rng(1)
    changed = {
        k: base_ref[k] * (1 + 0.02 * rng.standard_normal(base_ref[k].shape)) for k in (V, UP)
    }
    ft_ref = _write_full(changed, model, tmp_path / "run" / "checkpoint-10")
    table = wdanalysis.compare(tmp_path / "base", tmp_path / "run", modules=SELECT, progress=False)
    expected = {(None, 10, k): reference_delta(base_ref[k], ft_ref[k]) for k in (V, UP)}
    assert check_table(table, expected, rtol=1e-9) == 2

    # the other way round: an FP8 checkpoint (E5M2) of a float32 base
    plain = _llama()
    plain.save_pretrained(tmp_path / "plain")
    ckpt_ref = _write_fp8(plain, tmp_path / "run2" / "checkpoint-5", dtype=torch.float8_e5m2)
    w0 = {k: plain.get_parameter(k).detach().double().numpy() for k in (V, UP)}
    table = wdanalysis.compare(
        tmp_path / "plain", tmp_path / "run2", modules=SELECT, progress=False
    )
    expected = {(None, 5, k): reference_delta(w0[k], ckpt_ref[k]) for k in (V, UP)}
    assert check_table(table, expected, rtol=1e-9) == 2


def test_fp8_streams_rows_in_blocks(tmp_path, monkeypatch):
    """The engine reads an FP8 weight by row blocks, never whole (bounded memory)."""
    model = _llama()
    base_ref = _write_fp8(model, tmp_path / "base")
    changed = {UP: base_ref[UP] * 1.01}
    ft_ref = _write_full(changed, model, tmp_path / "ckpt")
    reads = []
    original = fp8quant.Fp8Store._rows

    def spy(self, key, start, stop):
        reads.append((key, start, stop))
        return original(self, key, start, stop)

    def whole(self, key):
        raise AssertionError(f"{key} read whole")

    monkeypatch.setattr(fp8quant.Fp8Store, "_rows", spy)
    monkeypatch.setattr(fp8quant.Fp8Store, "get", whole)
    from wdanalysis.engine import streaming

    monkeypatch.setattr(streaming, "MIN_BLOCK", 1 << 14)  # 16 KiB blocks: many of them
    plan = plan_comparison(tmp_path / "base", [tmp_path / "ckpt"], modules=["up_proj"])
    engine = streaming.Engine(plan.base_model, plan.bound, "out", plan.transposed, budget=1 << 17)
    got = {}
    engine.run([UP], lambda key, item, change: got.setdefault(key, change))
    assert len({(s, e) for k, s, e in reads if k == UP}) > 3  # several blocks
    assert max(e - s for k, s, e in reads) < 328
    expected = reference_delta(base_ref[UP], ft_ref[UP])
    assert got[UP].delta_m == pytest.approx(expected[0], rel=1e-9)
    assert got[UP].delta_d == pytest.approx(expected[1], rel=1e-9)


@pytest.mark.parametrize("strategy", ["channel", "tensor", "block", "group"])
def test_compressed_tensors_fp8(tmp_path, strategy):
    """An FP8 model written by compressed-tensors itself, read against its own
    ``dequantize`` in float64."""
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationConfig,
        QuantizationScheme,
        apply_quantization_config,
    )
    from compressed_tensors.quantization.lifecycle.forward import dequantize

    model = _llama(3)
    model.save_pretrained(tmp_path / "plain")
    extra = {"block": {"block_structure": [128, 128]}, "group": {"group_size": 8}}
    args = QuantizationArgs(
        num_bits=8, type="float", strategy=strategy, symmetric=True, **extra.get(strategy, {})
    )
    scheme = QuantizationScheme(targets=["Linear"], weights=args)
    config = QuantizationConfig(config_groups={"group_0": scheme}, ignore=["lm_head"])
    apply_quantization_config(model, config)
    for module in model.modules():
        if hasattr(module, "weight_scale"):
            module.weight_scale.data = _amax(module.weight.detach(), strategy) / 448.0
    compressor = ModelCompressor.from_pretrained_model(model, "float-quantized")
    compressor.compress_model(model)
    model.save_pretrained(tmp_path / "fp8")
    compressor.update_config(tmp_path / "fp8")
    with safe_open(str(tmp_path / "fp8" / "model.safetensors"), "pt") as f:
        assert f.get_slice(V).get_dtype() == "F8_E4M3"
        reference = {
            k: dequantize(
                f.get_tensor(k), f.get_tensor(k + "_scale").double(), args=args, dtype=torch.float64
            ).numpy()
            for k in (V, UP)
        }
    plain = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "plain")
    w0 = {k: plain.get_parameter(k).detach().double().numpy() for k in (V, UP)}
    table = wdanalysis.compare(tmp_path / "plain", tmp_path / "fp8", modules=SELECT, progress=False)
    expected = {(None, None, k): reference_delta(w0[k], reference[k]) for k in (V, UP)}
    assert check_table(table, expected, rtol=1e-9) == 2
    info = wdanalysis.inspect(tmp_path / "fp8")
    assert "F8_E4M3" in info["fp8"] and "weight_scale" in info["fp8"]
    layout = {"channel": "per output channel", "tensor": "per tensor", "block": "block 128×128"}
    assert layout.get(strategy, "per group of 8 inputs") in info["fp8"]


def _amax(w: torch.Tensor, strategy: str) -> torch.Tensor:
    if strategy == "channel":
        return w.abs().amax(1, keepdim=True)
    if strategy == "tensor":
        return w.abs().amax().reshape(1)
    if strategy == "group":
        return w.reshape(w.shape[0], -1, 8).abs().amax(-1)
    pad = torch.nn.functional.pad(w.abs(), (0, -w.shape[1] % 128, 0, -w.shape[0] % 128))
    return pad.reshape(pad.shape[0] // 128, 128, pad.shape[1] // 128, 128).amax((1, 3))


def test_inspect_says_fp8_and_scales_are_no_weights(tmp_path, capsys):
    _write_fp8(_llama(), tmp_path / "base")
    info = wdanalysis.inspect(tmp_path / "base")
    assert "float8_e4m3fn" in info["dtypes"]
    assert "weight_block_size [128, 128]" in info["fp8"] and "weight_scale_inv" in info["fp8"]
    assert "block 128×128" in info["fp8"]
    assert main(["inspect", str(tmp_path / "base")]) == 0
    assert "fp8" in capsys.readouterr().out
    # scales are companions, not weights
    store = open_base(tmp_path / "base").store
    assert not [k for k in store.keys() if "scale" in k]
    assert store.dtype(V) == torch.float64


def _refused(tmp_path, capsys, base, modules=("v_proj",)) -> str:
    run = tmp_path / "ft"
    if not run.exists():
        _llama().save_pretrained(run)
    argv = ["compare", str(base), str(run), "--out", str(tmp_path / "out"), "--no-figures"]
    capsys.readouterr()
    code = main([*argv, "--modules", *modules])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "Traceback" not in err
    assert len(err.splitlines()) == 1, err
    return err


def test_fp8_without_scale_refused_in_one_line(tmp_path, capsys):
    folder = tmp_path / "base"
    _write_fp8(_llama(), folder)
    state = {}
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys() if k != V + "_scale_inv"}
    save_file(state, str(folder / "model.safetensors"))
    err = _refused(tmp_path, capsys, folder)
    assert "has no scale" in err and V in err
    # an FP8 weight that is not selected blocks nothing
    table = wdanalysis.compare(folder, tmp_path / "ft", modules=["up_proj"], progress=False)
    assert set(table["parameter"]) == {UP}


def test_fp8_scale_layouts_not_understood_refused(tmp_path, capsys):
    folder = tmp_path / "base"
    _write_fp8(_llama(), folder, block=(64, 64))  # scales for 64×64 blocks, config says 128
    err = _refused(tmp_path, capsys, folder)
    assert "fits none of the layouts" in err and "block 128×128" in err
    # no quantization_config: a block scale cannot be read by its shape
    _write_fp8(_llama(), folder, config=None)
    err = _refused(tmp_path, capsys, folder)
    assert "fits none" in err and "no quantization_config" in err
    # a quantization method whose FP8 weights are not known
    _write_fp8(_llama(), folder, config={"quant_method": "mystery"})
    err = _refused(tmp_path, capsys, folder, modules=("up_proj",))
    assert "quant_method 'mystery'" in err


def test_fp8_per_tensor_without_config(tmp_path):
    """No quantization_config: one scale for the tensor means one thing only; read."""
    folder = tmp_path / "base"
    model = _llama()
    ref = _write_fp8(model, folder, block=(10_000, 10_000), config=None)
    ft = _write_full({V: ref[V] + 0.01}, model, tmp_path / "ft")
    table = wdanalysis.compare(folder, tmp_path / "ft", modules=["v_proj"], progress=False)
    assert check_table(table, {(None, None, V): reference_delta(ref[V], ft[V])}) == 1


@pytest.mark.parametrize("dora", [False, True])
def test_peft_adapter_on_fp8_base(tmp_path, dora):
    """A PEFT LoRA/DoRA trained on the FP8 model (its float64 values): rows equal PEFT's
    float64 merge, the base rows streamed from the FP8 file."""
    peft = pytest.importorskip("peft")
    model = _llama()
    ref = _write_fp8(model, tmp_path / "base")
    exact = copy.deepcopy(model).double()
    with torch.no_grad():
        for key in (V, UP):
            exact.get_parameter(key).copy_(torch.from_numpy(ref[key]))
    config = peft.LoraConfig(target_modules=SELECT, r=4, lora_alpha=8, use_dora=dora)
    tuned = peft.get_peft_model(exact, config)
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for parameter in tuned.parameters():
            if parameter.requires_grad:
                parameter.add_(0.05 * torch.randn(parameter.shape, generator=gen).double())
    tuned.save_pretrained(tmp_path / "adapter")
    merged = copy.deepcopy(tuned).merge_and_unload()
    expected = {
        (None, None, k): reference_delta(ref[k], merged.get_parameter(k).detach().numpy())
        for k in (V, UP)
    }
    table = wdanalysis.compare(
        tmp_path / "base", tmp_path / "adapter", modules=SELECT, progress=False
    )
    assert set(table["method"]) == {"DoRA" if dora else "LoRA"}
    assert check_table(table, expected, rtol=1e-9) == 2


@pytest.mark.parametrize("scale_fmt", ["float", "ue8m0"])
def test_transformers_fp8_quantize_written(tmp_path, scale_fmt):
    """Weights quantized by transformers' own FineGrainedFP8 writer (``Fp8Quantize``, what
    its ``save_pretrained`` runs; float32 or UE8M0 ``weight_scale_inv``), read against
    its own ``_dequantize_fp8_weight`` run in float64 (its load-time ``Fp8Dequantize``
    multiplies in float32)."""
    from transformers import FineGrainedFP8Config
    from transformers.integrations.finegrained_fp8 import Fp8Quantize, _dequantize_fp8_weight

    config = FineGrainedFP8Config(weight_block_size=(128, 128), scale_fmt=scale_fmt)
    quantizer = type("Quantizer", (), {"quantization_config": config})()
    model = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            hidden_size=256,
            intermediate_size=384,
            num_hidden_layers=1,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=32,
        )  # fmt: skip
    )
    model.save_pretrained(tmp_path / "plain")
    state, reference = {}, {}
    for key, value in model.state_dict().items():
        written = Fp8Quantize(quantizer).convert({key: value.detach()})
        state.update(written)
        scale = written.get(key.removesuffix(".weight") + ".weight_scale_inv")
        if scale is not None:
            exact = _dequantize_fp8_weight(written[key], scale, [128, 128], torch.float64)
            reference[key] = exact.numpy()
    assert state[V].dtype == torch.float8_e4m3fn
    e8m0 = getattr(torch, "float8_e8m0fnu", None)
    assert (state[V + "_scale_inv"].dtype == e8m0) == (scale_fmt == "ue8m0")
    folder = tmp_path / "fp8"
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "model.safetensors"))
    raw = json.loads((tmp_path / "plain" / "config.json").read_text())
    raw["quantization_config"] = config.to_dict()
    (folder / "config.json").write_text(json.dumps(raw))
    w0 = {k: model.get_parameter(k).detach().double().numpy() for k in (V, UP)}
    table = wdanalysis.compare(tmp_path / "plain", folder, modules=SELECT, progress=False)
    expected = {(None, None, k): reference_delta(w0[k], reference[k]) for k in (V, UP)}
    assert check_table(table, expected, rtol=1e-9) == 2


def test_fp8_in_a_torch_bin_file(tmp_path):
    """FP8 tensors saved by torch.save (pytorch_model.bin), one scale per output row."""
    model = _llama(5)
    folder = tmp_path / "base"
    model.save_pretrained(folder)
    state, reference = {}, {}
    for key, value in model.state_dict().items():
        if key in (V, UP):
            scale = value.abs().amax(1, keepdim=True) / 448.0
            state[key] = (value / scale).to(torch.float8_e5m2)
            state[key + "_scale"] = scale
            reference[key] = state[key].double().numpy() * scale.double().numpy()
        else:
            state[key] = value
    (folder / "model.safetensors").unlink()
    torch.save(state, folder / "pytorch_model.bin")
    raw = json.loads((folder / "config.json").read_text())
    raw["quantization_config"] = {"quant_method": "fbgemm_fp8", "activation_scale_ub": 1200.0}
    (folder / "config.json").write_text(json.dumps(raw))
    ft = _write_full({k: reference[k] * 1.5 + 0.001 for k in (V, UP)}, model, tmp_path / "ft")
    table = wdanalysis.compare(folder, tmp_path / "ft", modules=SELECT, progress=False)
    expected = {(None, None, k): reference_delta(reference[k], ft[k]) for k in (V, UP)}
    assert check_table(table, expected, rtol=1e-9) == 2
    assert "per output channel (weight_scale)" in wdanalysis.inspect(folder)["fp8"]
