"""mlx-lm embedding and mixture-of-experts adapters, written by mlx-lm, checked against its fuse.

A tiny mlx-lm Mixtral (vocabulary 30, hidden 12, 3 experts of (20, 12) / (12, 20), all
non-square) gets ``LoRAEmbedding`` / ``DoRAEmbedding`` on ``model.embed_tokens`` and
``LoRASwitchLinear`` on the experts' ``gate_proj`` / ``down_proj`` from mlx-lm's own
``linear_to_lora_layers``; adapters and base are saved as mlx-lm saves them. The reference
merged weights come from ``LoRAEmbedding.fuse`` / ``DoRAEmbedding.fuse`` /
``LoRASwitchLinear.fuse`` run in float64, and the reference ΔM/ΔD from explicit norms: an
embedding as an (in, out) weight (wdanalysis.loaders.layer_shapes), each expert's (out, in)
matrix alone.
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
from builders import check_table, reference_delta
from mlx_builders import adapted_layers, fused_in_float64, saved_weights

import wdanalysis
from wdanalysis.cli import main as _main

mx = pytest.importorskip("mlx.core", reason="mlx (pip install 'mlx[cpu]') is not installed")
pytest.importorskip("mlx_lm", reason="mlx-lm is not installed")

from mlx.utils import tree_flatten  # noqa: E402
from mlx_lm.models import mixtral  # noqa: E402
from mlx_lm.tuner.utils import linear_to_lora_layers  # noqa: E402
from mlx_lm.utils import save_config  # noqa: E402

EMBED = "model.embed_tokens"
GATE, DOWN = "block_sparse_moe.switch_mlp.gate_proj", "block_sparse_moe.switch_mlp.down_proj"
MODULES = ["embed_tokens", "gate_proj", "down_proj", "k_proj"]


def _model(vocab: int = 30, hidden: int = 12, experts: int = 3):
    mx.random.seed(0)
    args = mixtral.ModelArgs(
        model_type="mixtral",
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=20,
        num_hidden_layers=2,
        num_attention_heads=3,
        num_key_value_heads=1,
        num_local_experts=experts,
        num_experts_per_tok=2,
    )
    return mixtral.Model(args)


def _save_base(folder, **size):
    folder.mkdir(parents=True, exist_ok=True)
    weights = dict(tree_flatten(_model(**size).parameters()))
    mx.save_safetensors(str(folder / "model.safetensors"), weights)
    return folder


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return _save_base(tmp_path_factory.mktemp("mlx-moe") / "base")


def _train(folder, kind: str, keys: list[str], steps=(10, 20), **size) -> dict:
    """mlx-lm's adapter layers with every factor moved as training would, saved per step
    as mlx-lm's trainer saves them. Returns step → {base key: fused float64 weight}."""
    model = _model(**size)
    model.freeze()
    params = {"rank": 2, "scale": 1.7, "dropout": 0.0, "keys": keys}
    linear_to_lora_layers(model, 2, params, use_dora=kind == "dora")
    folder.mkdir(parents=True, exist_ok=True)
    config = {"fine_tune_type": kind, "lora_parameters": params, "num_layers": 2}
    save_config(dict(config, iters=steps[-1]), folder / "adapter_config.json")
    fused = {}
    for i, step in enumerate(steps):
        for _, layer in adapted_layers(model):
            layer.lora_a = layer.lora_a + 0.05 * mx.random.normal(layer.lora_a.shape)
            layer.lora_b = mx.random.normal(layer.lora_b.shape) * 0.05 * (i + 1)
            if hasattr(layer, "m"):
                layer.m = layer.m * (1 + 0.1 * mx.random.normal(layer.m.shape))
        weights = dict(tree_flatten(model.trainable_parameters()))
        mx.save_safetensors(str(folder / f"{step:07d}_adapters.safetensors"), weights)
        mx.save_safetensors(str(folder / "adapters.safetensors"), weights)
        fused[step] = fused_in_float64(model)
    return fused


def _expected(run: str, fused: dict, w0: dict, axis: str = "out") -> dict:
    """(run, step, table parameter) → reference (ΔM, ΔD): embeddings as (in, out) weights,
    a stacked (experts, out, in) weight one row per expert (``experts.<e>`` before the leaf)."""
    expected = {}
    for step, weights in fused.items():
        for key, wt in weights.items():
            if wt.ndim == 3:
                head, leaf = key[: -len(".weight")].rsplit(".", 1)
                for e in range(wt.shape[0]):
                    name = f"{head}.experts.{e}.{leaf}.weight"
                    expected[(run, step, name)] = reference_delta(w0[key][e], wt[e], axis)
            else:
                embedding = key.startswith(EMBED)
                expected[(run, step, key)] = reference_delta(w0[key], wt, axis, embedding)
    return expected


@pytest.mark.parametrize("axis", ["out", "in"])
def test_lora_embedding_and_switch_linear_match_mlx_fuse(tmp_path, base, axis):
    fused = _train(tmp_path / "run", "lora", [EMBED, GATE, DOWN, "self_attn.k_proj"])
    table = wdanalysis.compare(base, tmp_path / "run", modules=MODULES, axis=axis, progress=False)
    expected = _expected("run", fused, saved_weights(base), axis)
    # per step: the embedding, 2 layers × (k_proj + 3 experts × (gate, down))
    assert len(expected) == 2 * (1 + 2 * (1 + 3 * 2))
    assert check_table(table, expected, rtol=1e-9, atol=1e-15) == len(expected) == len(table)
    experts = table[table["parameter"].str.contains(".experts.")]
    assert set(experts["module"]) == {"gate_proj", "down_proj"}
    assert set(experts["layer"]) == {0, 1}
    embed = table[table["module"] == "embed_tokens"]
    # the project's embedding convention: out-vectors are the 12 embedding dimensions
    assert set(embed["n_vectors"]) == {12 if axis == "out" else 30}
    assert set(experts[experts["module"] == "gate_proj"]["n_vectors"]) == {
        20 if axis == "out" else 12
    }


@pytest.mark.parametrize("axis", ["out", "in"])
def test_dora_embedding_matches_mlx_fuse(tmp_path, base, axis):
    """DoRAEmbedding keeps m = ‖W‖ per token (row of the table): the merge must use that
    axis whatever axis the analysis reports on."""
    fused = _train(tmp_path / "run", "dora", [EMBED, "self_attn.k_proj"])
    table = wdanalysis.compare(
        base, tmp_path / "run", modules=["embed_tokens", "k_proj"], axis=axis, progress=False
    )
    expected = _expected("run", fused, saved_weights(base), axis)
    assert len(expected) == 2 * 3
    assert set(table["method"]) == {"DoRA"}
    assert check_table(table, expected, rtol=1e-9, atol=1e-15) == len(expected) == len(table)


def test_square_embedding_is_told_apart_by_its_name(tmp_path):
    """vocabulary = hidden: lora_a (24, r) and lora_b (r, 24) fit a Linear and a table;
    the table named embed_tokens is fused as mlx-lm's LoRAEmbedding fuses it, the square
    q_proj (24, 24) as LoRALinear fuses it."""
    base = _save_base(tmp_path / "base", vocab=24, hidden=24)
    keys = [EMBED, "self_attn.q_proj"]
    fused = _train(tmp_path / "run", "lora", keys, steps=(5,), vocab=24, hidden=24)
    table = wdanalysis.compare(
        base, tmp_path / "run", modules=["embed_tokens", "q_proj"], progress=False
    )
    expected = _expected("run", fused, saved_weights(base))
    assert check_table(table, expected, rtol=1e-9, atol=1e-15) == len(table) == 3
    # the factors read the other way round would give another weight: the test can fail
    for key in (EMBED + ".weight", "model.layers.1.self_attn.q_proj.weight"):
        w0, wt = saved_weights(base)[key], fused[5][key]
        swapped = reference_delta(w0, w0 + (wt - w0).T, transposed=key.startswith(EMBED))
        assert abs(swapped[1] - expected[("run", 5, key)][1]) > 1e-6


def test_full_checkpoint_beside_moe_adapter_is_split_per_expert(tmp_path, base):
    """A full fine-tuned checkpoint holding the same (experts, out, in) stack gets the same
    per-expert rows as the adapter run."""
    fused = _train(tmp_path / "run", "lora", [GATE], steps=(5,))
    w0 = saved_weights(base)
    ft = dict(w0)
    ft.update({k: v.astype(np.float32) for k, v in fused[5].items()})
    (tmp_path / "ft").mkdir()
    mx.save_safetensors(
        str(tmp_path / "ft" / "model.safetensors"), {k: mx.array(v) for k, v in ft.items()}
    )
    table = wdanalysis.compare(
        base,
        {"lora": tmp_path / "run", "ft": tmp_path / "ft"},
        modules=["gate_proj"],
        progress=False,
    )
    expected = _expected("run", fused, w0)  # the dict's keys are labels; runs keep their names
    ft32 = {5: {k: v.astype(np.float32).astype(np.float64) for k, v in fused[5].items()}}
    expected.update({("ft", None, p): d for (_, _, p), d in _expected("ft", ft32, w0).items()})
    assert len(expected) == 2 * 2 * 3
    assert check_table(table, expected, rtol=1e-9, atol=1e-15) == len(expected) == len(table)


def _cli_error(capsys, base, run, tmp_path, module: str) -> str:
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
                module,
            ]
        )
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("wdanalysis: error: ")]
    assert len(lines) == 1, err
    return lines[0]


def test_embedding_adapter_for_another_vocabulary_is_refused(capsys, tmp_path):
    base = _save_base(tmp_path / "base", vocab=31)
    _train(tmp_path / "run", "lora", [EMBED], steps=(5,))
    line = _cli_error(capsys, base, tmp_path / "run", tmp_path, "embed_tokens")
    assert "fit neither a Linear" in line and "[31, 12]" in line
    assert "adapters.safetensors" in line


def test_switch_adapter_for_another_expert_count_is_refused(capsys, tmp_path):
    base = _save_base(tmp_path / "base", experts=4)
    _train(tmp_path / "run", "lora", [GATE], steps=(5,))
    line = _cli_error(capsys, base, tmp_path / "run", tmp_path, "gate_proj")
    assert "mixture-of-experts factors for 3 experts" in line and "[4, 20, 12]" in line
    assert "adapters.safetensors" in line


def test_switch_factors_that_disagree_are_refused(capsys, tmp_path, base):
    _train(tmp_path / "run", "lora", [GATE], steps=(5,))
    path = tmp_path / "run" / "adapters.safetensors"
    weights = mx.load(str(path))
    key = next(k for k in weights if k.endswith("gate_proj.lora_b"))
    weights[key] = weights[key][:2]  # 2 experts' lora_b against 3 experts' lora_a
    mx.save_safetensors(str(path), weights)
    for step_file in (tmp_path / "run").glob("0*_adapters.safetensors"):
        step_file.unlink()
    config = json.loads((tmp_path / "run" / "adapter_config.json").read_text())
    assert config["fine_tune_type"] == "lora"
    line = _cli_error(capsys, base, tmp_path / "run", tmp_path, "gate_proj")
    assert "disagree on the number of experts" in line and "adapters.safetensors" in line


def test_inspect_moe_adapter(tmp_path):
    _train(tmp_path / "run", "lora", [GATE], steps=(5,))
    info = wdanalysis.inspect(tmp_path / "run" / "adapters.safetensors")
    assert info["format"].startswith("mlx-lm LoRA adapter")
    assert info["ranks"] == [2]
    assert any("mixture-of-experts" in n and "3 experts" in n for n in info["notes"])
