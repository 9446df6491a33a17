"""Fused projections (issue 21): q, k, v (and gate, up) of one stored weight, each its own row.

Every architecture is a tiny model built by transformers itself from its config and saved
with ``save_pretrained``. Which output features are the query, key and value is read from
the model's own forward, not from wdanalysis: one token is run with a cache, and the key
and value features are those of the fused output found in the cache (at position 0 rotary
embeddings are the identity), the query the rest. ΔM/ΔD of those slices, computed in
float64 by ``builders.reference_delta``, must equal the table's ``q_proj``/``v_proj`` rows
for a fully fine-tuned checkpoint and for PEFT LoRA/DoRA adapters on the fused module
(PEFT's ``merge_and_unload`` in float64, then sliced). Shapes are non-square (grouped- and
multi-query attention: fewer k/v heads than q heads).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from builders import check_table, finetuned, make_peft_adapter, reference_delta

from wdanalysis import compare
from wdanalysis.errors import WDAnalysisError

pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
]

COMMON = dict(vocab_size=64, bos_token_id=0, eos_token_id=0, pad_token_id=0)


def _configs():
    import transformers as tf

    return {
        "gpt2": (tf.GPT2Config(n_embd=32, n_head=4, n_layer=2, n_positions=16, **COMMON), "c_attn"),
        "phi3": (
            tf.Phi3Config(
                hidden_size=48, intermediate_size=40, num_hidden_layers=1,
                num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=16,
                **COMMON,
            ),
            "qkv_proj",
        ),
        "neox": (
            tf.GPTNeoXConfig(
                hidden_size=32, num_attention_heads=4, intermediate_size=40,
                num_hidden_layers=1, max_position_embeddings=16, **COMMON,
            ),
            "query_key_value",
        ),
        "bloom": (tf.BloomConfig(hidden_size=32, n_head=4, n_layer=1, **COMMON), "query_key_value"),
        "falcon-new": (
            tf.FalconConfig(
                hidden_size=48, num_attention_heads=6, num_kv_heads=2,
                new_decoder_architecture=True, num_hidden_layers=1, **COMMON,
            ),
            "query_key_value",
        ),
        "falcon-mqa": (
            tf.FalconConfig(hidden_size=32, num_attention_heads=4, multi_query=True,
                            num_hidden_layers=1, **COMMON),
            "query_key_value",
        ),
        "falcon-mha": (
            tf.FalconConfig(hidden_size=32, num_attention_heads=4, multi_query=False,
                            num_hidden_layers=1, **COMMON),
            "query_key_value",
        ),
        "mpt": (
            tf.MptConfig(d_model=32, n_heads=4, n_layers=1, expansion_ratio=2, max_seq_len=16,
                         **COMMON),
            "Wqkv",
        ),
        "dbrx": (
            tf.DbrxConfig(d_model=32, n_heads=4, n_layers=1, max_seq_len=16,
                          attn_config=dict(kv_n_heads=2, rope_theta=1e4, clip_qkv=1e3),
                          ffn_config=dict(ffn_hidden_size=16, moe_num_experts=2, moe_top_k=1),
                          **COMMON),
            "Wqkv",
        ),
        "bigcode-mqa": (
            tf.GPTBigCodeConfig(n_embd=32, n_head=4, n_layer=1, n_positions=16,
                                multi_query=True, **COMMON),
            "c_attn",
        ),
        "bigcode-mha": (
            tf.GPTBigCodeConfig(n_embd=32, n_head=4, n_layer=1, n_positions=16,
                                multi_query=False, **COMMON),
            "c_attn",
        ),
    }  # fmt: skip


ARCHS = list(_configs())
_built: dict[str, tuple] = {}


def build(name: str):
    """(model, fused leaf): the tiny transformers model, weights well away from zero."""
    if name not in _built:
        import transformers as tf

        config, leaf = _configs()[name]
        torch.manual_seed(0)
        model = tf.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
        with torch.no_grad():
            for i, (_, param) in enumerate(model.named_parameters()):
                param.normal_(0.0, 0.2, generator=torch.Generator().manual_seed(i))
        _built[name] = (model.eval(), leaf)
    return _built[name]


def fused_keys(model, leaf: str) -> list[str]:
    return [k for k in model.state_dict() if k.endswith(f".{leaf}.weight")]


def conv1d(model, key: str) -> bool:
    from transformers.pytorch_utils import Conv1D

    return isinstance(model.get_submodule(key[: -len(".weight")]), Conv1D)


def forward_split(model, key: str) -> dict[str, torch.Tensor]:
    """q/k/v output features of the fused weight ``key``, read from the model's forward."""
    module = model.get_submodule(key[: -len(".weight")])
    layer = next(int(p) for p in key.split(".") if p.isdigit())
    seen = {}
    hook = module.register_forward_hook(lambda m, i, out: seen.setdefault("y", out.detach()))
    cross = getattr(model.config, "add_cross_attention", False)
    encoder = dict(encoder_hidden_states=torch.ones(1, 1, 32)) if cross else {}
    try:
        with torch.no_grad():
            cache = model(torch.tensor([[5]]), use_cache=True, **encoder).past_key_values
    finally:
        hook.remove()
    if cross:  # an encoder-decoder cache: the cross-attention's own k/v apart
        crossed = ".crossattention." in key
        cache = cache.cross_attention_cache if crossed else cache.self_attention_cache
    y = seen["y"].reshape(-1)
    found = {}
    for name, cached in (
        ("k_proj", cache.layers[layer].keys),
        ("v_proj", cache.layers[layer].values),
    ):
        distance = (y[:, None] - cached.reshape(-1)[None, :]).abs().min(dim=1).values
        found[name] = torch.nonzero(distance < 1e-6).reshape(-1)
    taken = torch.cat(list(found.values()))
    assert len(set(taken.tolist())) == len(taken)  # k and v features are distinct
    found["q_proj"] = torch.tensor([i for i in range(len(y)) if i not in set(taken.tolist())])
    return found


def slice_out(w: torch.Tensor, index: torch.Tensor, transposed: bool) -> torch.Tensor:
    return w[:, index] if transposed else w[index]


def expected_rows(model, leaf, base_state, new_state, run, axis="out", parts=("q_proj", "v_proj")):
    expected = {}
    for key in fused_keys(model, leaf):
        split, transposed = forward_split(model, key), conv1d(model, key)
        for part in parts:
            w0 = slice_out(base_state[key], split[part], transposed)
            wt = slice_out(new_state[key], split[part], transposed)
            expected[(run, part, key)] = reference_delta(w0, wt, axis, transposed)
    return expected


def check(table, expected, rtol=1e-9) -> int:
    """Each (run, module, parameter) row once, with the expected ΔM/ΔD; nothing else."""
    assert len(table) == len(expected)
    checked = 0
    for (run, module, key), value in expected.items():
        rows = table[(table["module"] == module) & (table["run"] == run)]
        checked += check_table(rows, {(None, None, key): value}, rtol=rtol)
    return checked


def save(model, folder: Path, state=None) -> Path:
    model = copy.deepcopy(model)
    if state is not None:
        model.load_state_dict(state)
    model.save_pretrained(folder)
    return folder


# ------------------------------------------------------------------- full fine-tuning


@pytest.mark.parametrize("name", ARCHS)
def test_fine_tuned_q_and_v_rows_equal_the_forward_slices(tmp_path, name):
    model, leaf = build(name)
    base_state = model.state_dict()
    ft_state = finetuned(base_state, seed=1)
    base, ft = save(model, tmp_path / "base"), save(model, tmp_path / "ft", ft_state)

    table = compare(base, {"ft": ft}, modules=["q_proj", "v_proj"], progress=False)
    expected = expected_rows(model, leaf, base_state, ft_state, "ft")
    assert check(table, expected) == 2 * len(fused_keys(model, leaf))
    assert set(table["parameter"]) == set(fused_keys(model, leaf))  # the stored names
    default = compare(base, {"ft": ft}, progress=False)  # the paper's query/value default
    assert sorted(default["module"].unique()) == ["q_proj", "v_proj"]
    assert default[["delta_m", "delta_d"]].equals(table[["delta_m", "delta_d"]])


def test_gpt2_cross_attention_k_v_and_its_query(tmp_path):
    """GPT-2 with cross-attention: ``crossattention.c_attn`` holds k | v, ``q_attn`` the
    query (named ``q_proj`` too)."""
    import transformers as tf

    config = tf.GPT2Config(
        n_embd=32, n_head=4, n_layer=1, n_positions=16, add_cross_attention=True, **COMMON
    )
    _built["gpt2-cross"] = (tf.GPT2LMHeadModel(config).eval(), "c_attn")
    model, _ = build("gpt2-cross")
    base_state = model.state_dict()
    ft_state = finetuned(base_state, seed=7)
    base, ft = save(model, tmp_path / "base"), save(model, tmp_path / "ft", ft_state)
    table = compare(base, {"ft": ft}, progress=False)
    expected = {}
    for key, part in (
        ("transformer.h.0.attn.c_attn.weight", "q_proj"),
        ("transformer.h.0.attn.c_attn.weight", "v_proj"),
        ("transformer.h.0.crossattention.q_attn.weight", "q_proj"),
        ("transformer.h.0.crossattention.c_attn.weight", "v_proj"),
    ):
        index = forward_split(model, key)[part]
        w0, wt = base_state[key][:, index], ft_state[key][:, index]
        expected[("ft", part, key)] = reference_delta(w0, wt, transposed=True)
    assert check(table, expected) == 4
    assert (
        forward_split(model, "transformer.h.0.crossattention.c_attn.weight")["q_proj"].numel() == 0
    )


@pytest.mark.parametrize(
    ("name", "remote"),
    [
        ("falcon-new", dict(model_type="RefinedWeb", n_head=6, n_head_kv=2)),
        ("falcon-mqa", dict(model_type="RefinedWebModel", n_head=4, multi_query=True)),
    ],
)
def test_falcon_remote_code_configs(tmp_path, name, remote):
    """Falcon's configs from before transformers (``RefinedWeb``/``RefinedWebModel``, its
    remote ``modelling_RW.py`` splitting as the new / old layouts) give the same rows."""
    model, leaf = build(name)
    ft_state = finetuned(model.state_dict(), seed=8)
    base, ft = save(model, tmp_path / "base"), save(model, tmp_path / "ft", ft_state)
    native = compare(base, {"ft": ft}, progress=False)
    config = json.loads((base / "config.json").read_text())
    for field in ("num_attention_heads", "num_kv_heads", "new_decoder_architecture"):
        config.pop(field)
    (base / "config.json").write_text(json.dumps({**config, **remote}))
    table = compare(base, {"ft": ft}, progress=False)
    assert table[["module", "delta_m", "delta_d"]].equals(native[["module", "delta_m", "delta_d"]])


def test_phi3_gate_up_split_and_all_parts(tmp_path):
    model, _ = build("phi3")
    key = "model.layers.0.mlp.gate_up_proj.weight"
    mlp = model.get_submodule("model.layers.0.mlp")
    x = torch.randn(1, 1, 48, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y, size = mlp.gate_up_proj(x), 40
        gate_first = mlp.down_proj(y[..., size:] * mlp.activation_fn(y[..., :size]))
        assert torch.allclose(gate_first, mlp(x), atol=1e-6)  # forward: gate | up
    base_state = model.state_dict()
    ft_state = finetuned(base_state, seed=2)
    base, ft = save(model, tmp_path / "base"), save(model, tmp_path / "ft", ft_state)

    table = compare(base, ft, modules=["gate_proj", "up_proj"], progress=False)
    halves = {"gate_proj": torch.arange(size), "up_proj": torch.arange(size, 2 * size)}
    expected = {
        (None, part, key): reference_delta(base_state[key][i], ft_state[key][i])
        for part, i in halves.items()
    }
    assert len(table) == 2
    for (_, part, k), value in expected.items():
        check_table(table[table["module"] == part], {(None, None, k): value})
    whole = compare(base, ft, modules=["qkv_proj"], progress=False)  # the stored name: all
    assert sorted(whole["module"]) == ["k_proj", "q_proj", "v_proj"]
    by_regex = compare(base, ft, modules=[r"layers\.0\.self_attn\.[kv]_proj"], progress=False)
    assert sorted(by_regex["module"]) == ["k_proj", "v_proj"]  # as the unfused keys would


# ------------------------------------------------------------------------ PEFT adapters


@pytest.mark.parametrize(
    ("name", "dora"),
    [("gpt2", False), ("phi3", True), ("falcon-new", False), ("bigcode-mqa", True)],
)
def test_peft_adapter_on_the_fused_module_splits_its_update(tmp_path, name, dora):
    model, leaf = build(name)
    extra = dict(fan_in_fan_out=True) if name == "gpt2" else {}
    merged = make_peft_adapter(
        model, tmp_path / "adapter", r=4, lora_alpha=8, target_modules=[leaf], use_dora=dora,
        **extra,
    )  # fmt: skip
    base = save(model, tmp_path / "base")
    table = compare(base, tmp_path / "adapter", modules=["q_proj", "v_proj"], progress=False)
    assert set(table["method"]) == {"DoRA" if dora else "LoRA"}
    expected = expected_rows(model, leaf, model.state_dict(), merged, "adapter")
    assert check(table, expected, rtol=1e-8) == 2 * len(fused_keys(model, leaf))


# ---------------------------------------------------------------------------- input axis


@pytest.mark.parametrize("name", ["gpt2", "falcon-new"])
def test_input_axis_sums_each_part_apart(tmp_path, name):
    """axis "in": a vector runs across the output features, so each part sums its own rows
    (Linear) or columns (GPT-2 Conv1D) of the fused weight."""
    model, leaf = build(name)
    base_state = model.state_dict()
    ft_state = finetuned(base_state, seed=3)
    base, ft = save(model, tmp_path / "base"), save(model, tmp_path / "ft", ft_state)
    extra = dict(fan_in_fan_out=True) if name == "gpt2" else {}
    merged = make_peft_adapter(
        model, tmp_path / "dora", r=4, lora_alpha=8, target_modules=[leaf], use_dora=True, **extra
    )
    runs = {"ft": ft, "dora": tmp_path / "dora"}
    table = compare(base, runs, modules=["q_proj", "v_proj"], axis="in", progress=False)
    expected = expected_rows(model, leaf, base_state, ft_state, "ft", axis="in")
    expected |= expected_rows(model, leaf, base_state, merged, "dora", axis="in")
    assert check(table, expected, rtol=1e-8) == 4 * len(fused_keys(model, leaf))


# ------------------------------------------------------------------ command line, refusals


def test_command_line_writes_the_q_and_v_rows(tmp_path):
    from wdanalysis.cli.entry_point import main

    model, leaf = build("neox")
    base_state = model.state_dict()
    ft_state = finetuned(base_state, seed=4)
    base, ft = save(model, tmp_path / "base"), save(model, tmp_path / "ft", ft_state)
    argv = ["compare", base, ft, "--modules", "q_proj", "v_proj", "--out", tmp_path / "out"]
    assert main([str(a) for a in [*argv, "--no-figures", "--quiet"]]) == 0
    import pandas as pd

    table = pd.read_csv(tmp_path / "out" / "deltas.csv")
    assert check(table, expected_rows(model, leaf, base_state, ft_state, "ft")) == 2


def test_refusals_name_what_is_missing(tmp_path):
    model, _ = build("phi3")
    base = save(model, tmp_path / "base")
    ft = save(model, tmp_path / "ft", finetuned(model.state_dict(), seed=5))
    config = json.loads((base / "config.json").read_text())
    del config["num_key_value_heads"]
    (base / "config.json").write_text(json.dumps(config))
    with pytest.raises(WDAnalysisError, match="num_key_value_heads.*config.json") as error:
        compare(base, ft, modules=["q_proj", "v_proj"], progress=False)
    assert "\n" not in str(error.value) and "qkv_proj" in str(error.value)
    (base / "config.json").unlink()
    for modules in (None, ["q_proj"], ["qkv_proj"]):
        with pytest.raises(WDAnalysisError, match="no config.json"):
            compare(base, ft, modules=modules, progress=False)


def test_mamba_in_proj_is_not_attention(tmp_path):
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(0)
    state = {
        f"backbone.layers.{i}.mixer.{leaf}.weight": torch.randn(shape, generator=gen)
        for i in range(2)
        for leaf, shape in (("in_proj", (64, 16)), ("out_proj", (16, 32)))
    }
    for name in ("base", "ft"):
        (tmp_path / name).mkdir()
        save_file(
            state if name == "base" else finetuned(state, 1), tmp_path / name / "model.safetensors"
        )
        (tmp_path / name / "config.json").write_text(json.dumps({"model_type": "mamba"}))
    with pytest.raises(WDAnalysisError, match="found no attention query/value weights"):
        compare(tmp_path / "base", tmp_path / "ft", progress=False)
    with pytest.raises(WDAnalysisError, match="in_proj.*--whole in_proj"):  # x | z: fused
        compare(tmp_path / "base", tmp_path / "ft", modules=["in_proj"], progress=False)
    whole = compare(
        tmp_path / "base", tmp_path / "ft", modules=["in_proj"], whole=["in_proj"], progress=False
    )
    assert list(whole["module"]) == ["in_proj", "in_proj"]  # asked for whole: one row each


def test_live_tracking_gives_the_rows_compare_gives(tmp_path):
    """The training callback's engine splits the live model's fused weight alike."""
    from wdanalysis.tracking.tracker import Tracker

    model, _ = build("phi3")
    base = save(model, tmp_path / "base")
    live = copy.deepcopy(model)
    tracker = Tracker(base, tmp_path / "tracking.csv", every=1)
    tracker.begin(live, 0)
    live.load_state_dict(finetuned(model.state_dict(), seed=6))
    tracked = tracker.compute(1).reset_index(drop=True)
    saved = compare(base, save(live, tmp_path / "ft"), progress=False)
    assert list(tracked["module"]) == list(saved["module"]) == ["q_proj", "v_proj"]
    for column in ("delta_m", "delta_d", "n_vectors"):
        assert tracked[column].to_list() == pytest.approx(saved[column].to_list(), rel=1e-12)


def test_parts_of_a_module_the_adapter_leaves_alone_are_unchanged(tmp_path):
    model, _ = build("neox")
    make_peft_adapter(model, tmp_path / "adapter", r=2, lora_alpha=4, target_modules=["dense"])
    base = save(model, tmp_path / "base")
    for axis in ("out", "in"):
        table = compare(base, tmp_path / "adapter", axis=axis, progress=False)
        assert list(table["module"]) == ["q_proj", "v_proj"]
        assert (table["delta_m"] == 0).all() and (table["delta_d"] == 0).all()
        assert (table["n_vectors"] == 32).all()  # 4 heads of 8 (out) or 32 inputs (in)
