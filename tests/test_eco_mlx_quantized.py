"""A quantized mlx base (mlx-lm's ``-q`` models, the usual base of a QLoRA run) is refused
in one line that names the scheme and the mlx-lm command that dequantizes it."""

from __future__ import annotations

import pytest

from wdanalysis.cli import main

mx = pytest.importorskip("mlx.core", reason="mlx (pip install 'mlx[cpu]') is not installed")
nn = pytest.importorskip("mlx.nn", reason="mlx (pip install 'mlx[cpu]') is not installed")
pytest.importorskip("mlx_lm", reason="mlx-lm is not installed")

from mlx.utils import tree_flatten  # noqa: E402
from mlx_lm.models import llama  # noqa: E402


def _save(model, folder):
    folder.mkdir()
    mx.save_safetensors(str(folder / "model.safetensors"), dict(tree_flatten(model.parameters())))
    return folder


def test_quantized_mlx_base_is_refused_with_the_dequantize_command(tmp_path, capsys):
    args = llama.ModelArgs(
        model_type="llama",
        hidden_size=64,
        num_hidden_layers=1,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        rms_norm_eps=1e-5,
        vocab_size=64,
    )
    model = llama.Model(args)
    ft = _save(model, tmp_path / "ft")
    nn.quantize(model, group_size=32, bits=4)
    base = _save(model, tmp_path / "base")
    assert any(k.endswith(".scales") for k, _ in tree_flatten(model.parameters()))

    code = main(["compare", str(base), str(ft), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code != 0
    assert len(err.splitlines()) == 1, err
    assert "mlx quantized" in err and "--dequantize" in err
    assert str(base / "model.safetensors") in err
