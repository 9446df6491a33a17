"""mlx-lm adapters, written by mlx-lm itself, checked against mlx-lm's own fuse.

A tiny mlx-lm LLaMA (grouped-query attention: k/v_proj (8, 24), gate_proj (40, 24), so a
wrong axis or a missing transpose cannot pass) gets LoRA/DoRA layers from
``linear_to_lora_layers``; the adapters are saved as mlx-lm's trainer saves them
(``mx.save_safetensors`` of the trainable parameters, numbered step files, the
``adapter_config.json`` of ``save_config``), the base with ``mx.save_safetensors`` (whose
``"__metadata__": null`` must load). The reference merged weights come from
``LoRALinear.fuse`` / ``DoRALinear.fuse`` run in float64.
"""

from __future__ import annotations

import warnings

import pytest
from builders import check_table, reference_delta
from mlx_builders import fused_in_float64, saved_weights

import wdanalysis
from wdanalysis.cli import main as _main

mx = pytest.importorskip("mlx.core", reason="mlx (pip install 'mlx[cpu]') is not installed")
pytest.importorskip("mlx_lm", reason="mlx-lm is not installed")

from mlx.utils import tree_flatten  # noqa: E402
from mlx_lm.models import llama  # noqa: E402
from mlx_lm.tuner.utils import linear_to_lora_layers  # noqa: E402
from mlx_lm.utils import save_config  # noqa: E402

KEYS = ["self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj"]
PARAMS = {"rank": 3, "scale": 2.5, "dropout": 0.0, "keys": KEYS}


def _model():
    mx.random.seed(0)
    args = llama.ModelArgs(
        model_type="llama",
        hidden_size=24,
        num_hidden_layers=2,
        intermediate_size=40,
        num_attention_heads=6,
        num_key_value_heads=2,
        rms_norm_eps=1e-5,
        vocab_size=50,
    )
    return llama.Model(args)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mlx-base")
    model = _model()
    mx.save_safetensors(str(folder / "model.safetensors"), dict(tree_flatten(model.parameters())))
    return folder


def _train(folder, fine_tune_type: str, steps=(10, 20), model_path=None) -> dict:
    """mlx-lm's LoRA/DoRA layers, weights moved as training would, saved per step as
    mlx-lm's trainer does. Returns step → {base key: fused float64 weight}."""
    model = _model()
    model.freeze()
    linear_to_lora_layers(model, 2, PARAMS, use_dora=fine_tune_type == "dora")
    folder.mkdir(parents=True, exist_ok=True)
    save_config(
        {
            "model": str(model_path) if model_path else "mlx-community/unknown",
            "fine_tune_type": fine_tune_type,
            "lora_parameters": PARAMS,
            "num_layers": 2,
            "iters": steps[-1],
            "adapter_path": str(folder),
        },
        folder / "adapter_config.json",
    )
    fused = {}
    for i, step in enumerate(steps):
        for _, layer in model.named_modules():
            if hasattr(layer, "lora_b"):
                layer.lora_b = mx.random.normal(layer.lora_b.shape) * 0.05 * (i + 1)
                if hasattr(layer, "m"):
                    layer.m = layer.m * (1 + 0.1 * mx.random.normal(layer.m.shape))
        weights = dict(tree_flatten(model.trainable_parameters()))
        mx.save_safetensors(str(folder / f"{step:07d}_adapters.safetensors"), weights)
        mx.save_safetensors(str(folder / "adapters.safetensors"), weights)
        fused[step] = fused_in_float64(model)
    return fused


@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_mlx_lm_adapter_steps_match_mlx_fuse(tmp_path, base, kind):
    fused = _train(tmp_path / "run", kind)
    w0 = saved_weights(base)
    table = wdanalysis.compare(base, tmp_path / "run", modules=["k_proj", "v_proj", "gate_proj"])
    assert sorted(set(table["step"])) == [10, 20]
    assert set(table["method"]) == {"DoRA" if kind == "dora" else "LoRA"}
    expected = {
        ("run", step, key): reference_delta(w0[key], weight)
        for step, weights in fused.items()
        for key, weight in weights.items()
    }
    assert len(expected) == 2 * 2 * 3
    assert check_table(table, expected, rtol=1e-9, atol=1e-15) == len(expected)


def test_mlx_lm_single_adapter_file_and_inspect(tmp_path, base):
    _train(tmp_path / "run", "dora", steps=(5,))
    info = wdanalysis.inspect(tmp_path / "run" / "adapters.safetensors")
    assert info["format"].startswith("mlx-lm DoRA adapter")
    assert "2.5" in info["scaling"] and "lora_parameters.scale" in info["scaling"]
    assert info["ranks"] == [3]


def _cli_error(capsys, base, run, tmp_path) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        code = _main(
            [
                "compare",
                str(base),
                str(run),
                "--out",
                str(tmp_path / "out"),
                "--no-figures",
                "--quiet",
                "--modules",
                "k_proj",
            ]
        )
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("wdanalysis: error: ")]
    assert len(lines) == 1, err
    return lines[0]


def test_mlx_lm_adapter_without_config_is_refused(capsys, tmp_path, base):
    _train(tmp_path / "run", "lora", steps=(5,))
    (tmp_path / "run" / "adapter_config.json").unlink()
    line = _cli_error(capsys, base, tmp_path / "run" / "adapters.safetensors", tmp_path)
    assert "adapter_config.json" in line and "mlx-lm" in line


def test_mlx_lm_config_without_scale_is_refused(capsys, tmp_path, base):
    import json

    _train(tmp_path / "run", "lora", steps=(5,))
    config = json.loads((tmp_path / "run" / "adapter_config.json").read_text())
    del config["lora_parameters"]["scale"]
    (tmp_path / "run" / "adapter_config.json").write_text(json.dumps(config))
    line = _cli_error(capsys, base, tmp_path / "run", tmp_path)
    assert "lora_parameters.scale" in line


def test_mlx_lm_full_fine_tune_folder_is_refused(capsys, tmp_path, base):
    import json

    _train(tmp_path / "run", "lora", steps=(5,))
    config = json.loads((tmp_path / "run" / "adapter_config.json").read_text())
    config["fine_tune_type"] = "full"
    (tmp_path / "run" / "adapter_config.json").write_text(json.dumps(config))
    line = _cli_error(capsys, base, tmp_path / "run", tmp_path)
    assert "fine_tune_type 'full'" in line


def test_mlx_lm_adapter_for_another_model_is_refused(capsys, tmp_path, base):
    model = _model()
    model.freeze()
    other = dict(PARAMS, keys=["self_attn.k_proj"])
    linear_to_lora_layers(model, 2, other)
    weights = dict(tree_flatten(model.trainable_parameters()))
    weights = {k.replace("k_proj", "kv_proj"): v for k, v in weights.items()}
    (tmp_path / "a").mkdir()
    mx.save_safetensors(str(tmp_path / "a" / "adapters.safetensors"), weights)
    save_config(
        {"fine_tune_type": "lora", "lora_parameters": other, "num_layers": 2},
        tmp_path / "a" / "adapter_config.json",
    )
    line = _cli_error(capsys, base, tmp_path / "a", tmp_path)
    assert "match no base weight" in line and "kv_proj" in line


def test_mlx_lm_config_names_the_base_for_compare_auto(tmp_path, base):
    fused = _train(tmp_path / "run", "lora", steps=(5,), model_path=base)
    table = wdanalysis.compare("auto", tmp_path / "run", modules=["k_proj"])
    w0 = saved_weights(base)
    expected = {
        ("run", 5, k): reference_delta(w0[k], w) for k, w in fused[5].items() if "k_proj" in k
    }
    assert check_table(table, expected, rtol=1e-9, atol=1e-15) == len(table) == 2
