"""Issue 33: gpt-oss stacked experts, DeepSeek MLA, ModernBERT, Mixtral, timm, ``--whole``.

Every model is a tiny one built by transformers 5 from its config and saved with
``save_pretrained``; adapters are PEFT's (``merge_and_unload`` on a float64 copy is the
truth). Which output features form each part is read from the model's own forward where it
can be (a one-token cache, a probe of the layer's gate), and ΔM/ΔD of those float64 slices
(``builders.reference_delta``) must equal the table's rows. Shapes are non-square.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from builders import check_table, finetuned, make_peft_adapter, reference_delta

from wdanalysis import compare, inspect
from wdanalysis.errors import WDAnalysisError

pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
]

EXPERTS, HIDDEN, INNER = 3, 16, 12


def _noisy(model, seed: int = 0):
    """Weights well away from zero (every parameter, the stacked experts too)."""
    with torch.no_grad():
        for i, (_, param) in enumerate(model.named_parameters()):
            param.normal_(0.0, 0.2, generator=torch.Generator().manual_seed(seed + i))
    return model.eval()


def _moved(state: dict, seed: int) -> dict:
    """A fine-tuning step on every float tensor, the 3-D stacks included."""
    gen = torch.Generator().manual_seed(seed)
    out = finetuned(state, seed)
    for key, value in state.items():
        if value.is_floating_point() and value.dim() == 3:
            rows = 1 + 0.05 * torch.randn(*value.shape[:2], 1, generator=gen)
            out[key] = value * rows + 0.01 * torch.randn(value.shape, generator=gen)
    return out


def _save(model, folder: Path, state=None) -> Path:
    model = copy.deepcopy(model)
    if state is not None:
        model.load_state_dict(state)
    model.save_pretrained(folder)
    return folder


def _row(table, parameter: str, module: str, run=None):
    rows = table[(table["parameter"] == parameter) & (table["module"] == module)]
    if run is not None:
        rows = rows[rows["run"] == run]
    assert len(rows) == 1, f"{len(rows)} rows for {parameter} {module}"
    return rows


# ---------------------------------------------------------------- gpt-oss stacked experts


def gpt_oss():
    import transformers as tf

    config = tf.GptOssConfig(
        hidden_size=HIDDEN, intermediate_size=INNER, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_local_experts=EXPERTS,
        num_experts_per_tok=2, vocab_size=32, layer_types=["full_attention"],
    )  # fmt: skip
    torch.manual_seed(0)
    return _noisy(tf.AutoModelForCausalLM.from_config(config))


def gate_columns(experts) -> torch.Tensor:
    """The columns of ``x @ gate_up_proj[e]`` that the model's own ``_apply_gate`` takes as
    the gate: alone non-zero, they give a non-zero output (the up half alone gives
    ``(up + 1)·glu(0) = 0``)."""
    gates = []
    for j in range(2 * INNER):
        probe = torch.zeros(1, 2 * INNER)
        probe[0, j] = 1.0
        if experts._apply_gate(probe).abs().sum() > 0:
            gates.append(j)
    return torch.tensor(gates)


def expert_expected(base_state, new_state, experts, run, layer=0, axis="out") -> dict:
    """(ΔM, ΔD) of every expert's gate/up/down, (out, in) slices of the stored (in, out)."""
    gate = gate_columns(experts)
    up = torch.tensor([j for j in range(2 * INNER) if j not in set(gate.tolist())])
    assert len(gate) == len(up) == INNER
    stem = f"model.layers.{layer}.mlp.experts"
    expected = {}
    for e in range(EXPERTS):
        for leaf, part, cols in (
            ("gate_up_proj", "gate_proj", gate),
            ("gate_up_proj", "up_proj", up),
            ("down_proj", "down_proj", None),
        ):
            w0, wt = base_state[f"{stem}.{leaf}"][e], new_state[f"{stem}.{leaf}"][e]
            if cols is not None:
                w0, wt = w0[:, cols], wt[:, cols]
            key = f"{stem}.{e}.{leaf}.weight"
            expected[(run, part, key)] = reference_delta(w0.T, wt.T, axis)
    return expected


def check_rows(table, expected: dict, rtol=1e-9) -> None:
    for (run, module, key), value in expected.items():
        check_table(_row(table, key, module, run), {(None, None, key): value}, rtol=rtol)


def test_gpt_oss_experts_fine_tuned_per_expert_gate_up_down(tmp_path):
    model = gpt_oss()
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    ft_state = _moved(base_state, seed=1)
    base, ft = _save(model, tmp_path / "base"), _save(model, tmp_path / "ft", ft_state)
    modules = ["gate_proj", "up_proj", "down_proj"]
    table = compare(base, {"ft": ft}, modules=modules, progress=False)
    experts = model.model.layers[0].mlp.experts
    expected = expert_expected(base_state, ft_state, experts, "ft")
    assert len(table) == len(expected) == 3 * EXPERTS
    check_rows(table, expected)
    assert set(table["layer"]) == {0}
    default = compare(base, {"ft": ft}, progress=False)  # the query/value default: attention
    assert sorted(default["module"]) == ["q_proj", "v_proj"]
    by_input = compare(base, {"ft": ft}, modules=modules, axis="in", progress=False)
    check_rows(by_input, expert_expected(base_state, ft_state, experts, "ft", axis="in"))
    described = inspect(base)["fused_projections"]  # inspect reads the experts as compare
    assert described == f"{EXPERTS} split by config.json into gate_proj, up_proj"


def test_gpt_oss_peft_target_parameters_and_q_v_lora(tmp_path):
    """PEFT's ``ParamWrapper`` LoRA on both stacked parameters, beside a q/v LoRA in the
    same adapter: every expert's parts and q/v equal PEFT's own float64 merge."""
    model = gpt_oss()
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    merged = make_peft_adapter(
        model, tmp_path / "adapter", r=2, lora_alpha=6, target_modules=["q_proj", "v_proj"],
        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
        rank_pattern={"down_proj": 2}, alpha_pattern={"down_proj": 3},
    )  # fmt: skip
    base = _save(model, tmp_path / "base")
    modules = ["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"]
    table = compare(base, tmp_path / "adapter", modules=modules, progress=False)
    experts = model.model.layers[0].mlp.experts
    expected = expert_expected(base_state, merged, experts, None)
    for leaf in ("q_proj", "v_proj"):
        key = f"model.layers.0.self_attn.{leaf}.weight"
        expected[(None, leaf, key)] = reference_delta(base_state[key], merged[key])
    assert len(table) == len(expected)
    check_rows(table, expected, rtol=1e-8)
    assert set(table["method"]) == {"LoRA"}
    default = compare(base, tmp_path / "adapter", progress=False)
    assert sorted(default["module"]) == ["q_proj", "v_proj"]


def test_stacked_experts_of_an_unknown_model_are_refused_when_selected(tmp_path):
    model = gpt_oss()
    base = _save(model, tmp_path / "base")
    ft = _save(model, tmp_path / "ft", _moved(model.state_dict(), seed=2))
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "model_type": "other_moe"}))
    with pytest.raises(WDAnalysisError, match="stacked expert parameter.*other_moe") as error:
        compare(base, ft, modules=["gate_up_proj"], progress=False)
    assert "\n" not in str(error.value)
    table = compare(base, ft, modules=["q_proj"], progress=False)  # others still work
    assert list(table["module"]) == ["q_proj"]


# --------------------------------------------------------------------- DeepSeek MLA


def deepseek(version: int, q_lora_rank):
    import transformers as tf

    cls = tf.DeepseekV3Config if version == 3 else tf.DeepseekV2Config
    extra = dict(n_group=1, topk_group=1) if version == 3 else {}
    config = cls(
        hidden_size=32, intermediate_size=24, moe_intermediate_size=8, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=4, q_lora_rank=q_lora_rank, kv_lora_rank=10,
        qk_nope_head_dim=6, qk_rope_head_dim=4, v_head_dim=5, n_routed_experts=2,
        num_experts_per_tok=1, first_k_dense_replace=1, vocab_size=32, **extra,
    )  # fmt: skip
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    return _noisy(model)


_SEEN: dict[str, torch.Tensor] = {}


def _capture(module, query, key, value, attention_mask, **kwargs):
    """An attention function that keeps the q, k, v the model's forward hands it."""
    _SEEN.update(q=query.detach(), k=key.detach(), v=value.detach())
    return torch.zeros_like(value.transpose(1, 2)).contiguous(), None


def forward_features(model, module_path: str) -> dict[str, torch.Tensor]:
    """Output features of ``module_path`` that the model's own forward hands its attention
    as query, key and value (one token: rotary embeddings are the identity at position 0,
    up to the order of the rope dims, which a set of features does not see)."""
    from transformers import AttentionInterface

    AttentionInterface.register("wdanalysis_capture", _capture)
    model = copy.deepcopy(model)
    model.set_attn_implementation("wdanalysis_capture")
    seen = {}
    module = model.get_submodule(module_path)
    hook = module.register_forward_hook(lambda m, i, out: seen.setdefault("y", out.detach()))
    try:
        with torch.no_grad():
            model(torch.tensor([[5]]))
    finally:
        hook.remove()
    y = seen["y"].reshape(-1)
    found = {}
    for name in ("q", "k", "v"):
        distance = (y[:, None] - _SEEN[name].reshape(-1)[None, :]).abs().min(dim=1).values
        found[name] = torch.nonzero(distance < 1e-6).reshape(-1)
    return found


@pytest.mark.parametrize(("version", "q_lora_rank"), [(3, 12), (2, None)])
def test_mla_query_value_and_kv_parts(tmp_path, version, q_lora_rank):
    model = deepseek(version, q_lora_rank)
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    ft_state = finetuned(base_state, seed=3)
    base, ft = _save(model, tmp_path / "base"), _save(model, tmp_path / "ft", ft_state)
    stem = "model.layers.0.self_attn"
    kv_b = forward_features(model, f"{stem}.kv_b_proj")
    kv_a = forward_features(model, f"{stem}.kv_a_proj_with_mqa")
    assert len(kv_b["v"]) == 4 * 5 and len(kv_b["k"]) == 4 * 6 and len(kv_a["k"]) == 4
    rope = set(kv_a["k"].tolist())
    latent = torch.tensor([i for i in range(10 + 4) if i not in rope])
    query = f"{stem}.{'q_b_proj' if q_lora_rank else 'q_proj'}.weight"
    parts = {
        (query, "q_proj"): None,
        (f"{stem}.kv_b_proj.weight", "v_proj"): kv_b["v"],
        (f"{stem}.kv_b_proj.weight", "k_nope"): kv_b["k"],
        (f"{stem}.kv_a_proj_with_mqa.weight", "k_rope"): kv_a["k"],
        (f"{stem}.kv_a_proj_with_mqa.weight", "kv_latent"): latent,
    }
    names = ["q_proj", "v_proj", "k_nope", "k_rope", "kv_latent"]
    table = compare(base, ft, modules=names, progress=False)
    assert len(table) == len(parts)
    for (key, part), rows in parts.items():
        w0, wt = base_state[key], ft_state[key]
        if rows is not None:
            w0, wt = w0[rows], wt[rows]
        check_table(_row(table, key, part), {(None, None, key): reference_delta(w0, wt)})
    default = compare(base, ft, progress=False)  # the paper's query/value on MLA
    assert sorted(default["module"]) == ["q_proj", "v_proj"]
    assert set(default["parameter"]) == {query, f"{stem}.kv_b_proj.weight"}


def test_mla_peft_lora_on_kv_b_proj(tmp_path):
    model = deepseek(3, 12)
    merged = make_peft_adapter(
        model, tmp_path / "adapter", r=2, lora_alpha=4, target_modules=["q_b_proj", "kv_b_proj"]
    )
    base = _save(model, tmp_path / "base")
    table = compare(base, tmp_path / "adapter", progress=False)
    key = "model.layers.0.self_attn.kv_b_proj.weight"
    values = forward_features(model, "model.layers.0.self_attn.kv_b_proj")["v"]
    w0 = model.state_dict()[key]
    expected = reference_delta(w0[values], merged[key][values])
    check_table(_row(table, key, "v_proj"), {(None, None, key): expected}, rtol=1e-8)


# ------------------------------------------------------------------------- ModernBERT


def modernbert():
    import transformers as tf

    ids = dict(pad_token_id=0, bos_token_id=0, eos_token_id=0, cls_token_id=0, sep_token_id=0)
    config = tf.ModernBertConfig(
        hidden_size=32, intermediate_size=20, num_hidden_layers=1, num_attention_heads=4,
        vocab_size=64, global_attn_every_n_layers=1, **ids,
    )  # fmt: skip
    torch.manual_seed(0)
    return _noisy(tf.AutoModel.from_config(config, attn_implementation="eager"))


def test_modernbert_wqkv_and_wi_parts(tmp_path):
    model = modernbert()
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    ft_state = finetuned(base_state, seed=4)
    base, ft = _save(model, tmp_path / "base"), _save(model, tmp_path / "ft", ft_state)
    merged = make_peft_adapter(
        model, tmp_path / "dora", r=2, lora_alpha=4, target_modules=["Wqkv", "Wi"], use_dora=True
    )
    qkv = forward_features(model, "layers.0.attn.Wqkv")
    mlp, size = model.layers[0].mlp, 20
    x = torch.randn(1, 1, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # the forward: act(first half) * second half
        y = mlp.Wi(x)
        assert torch.allclose(mlp.Wo(mlp.act(y[..., :size]) * y[..., size:]), mlp(x), atol=1e-6)
    rows = {
        ("layers.0.attn.Wqkv.weight", "q_proj"): qkv["q"],
        ("layers.0.attn.Wqkv.weight", "v_proj"): qkv["v"],
        ("layers.0.mlp.Wi.weight", "gate_proj"): torch.arange(size),
        ("layers.0.mlp.Wi.weight", "up_proj"): torch.arange(size, 2 * size),
    }
    modules = ["q_proj", "v_proj", "gate_proj", "up_proj"]
    runs = {"ft": ft, "dora": tmp_path / "dora"}
    table = compare(base, runs, modules=modules, progress=False)
    assert len(table) == 2 * len(rows)
    for run, state in (("ft", ft_state), ("dora", merged)):
        for (key, part), index in rows.items():
            expected = reference_delta(base_state[key][index], state[key][index])
            check_table(_row(table, key, part, run), {(None, None, key): expected}, rtol=1e-8)
    mlp_only = compare(base, ft, modules=["gate_proj", "up_proj"], progress=False)
    assert sorted(mlp_only["module"]) == ["gate_proj", "up_proj"]  # Wqkv blocks nothing


# --------------------------------------------------------------------------- Mixtral


def test_mixtral_w1_w3_w2_answer_to_gate_up_down(tmp_path):
    import transformers as tf

    config = tf.MixtralConfig(
        hidden_size=HIDDEN, intermediate_size=INNER, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, num_local_experts=2, vocab_size=32,
    )  # fmt: skip
    torch.manual_seed(0)
    model = _noisy(tf.AutoModelForCausalLM.from_config(config))
    base = _save(model, tmp_path / "base")
    from safetensors.torch import load_file

    base_state = load_file(base / "model.safetensors")  # as saved: experts.N.w1/w2/w3
    ft_state = finetuned(base_state, seed=5)
    ft = tmp_path / "ft"
    ft.mkdir()
    from safetensors.torch import save_file

    save_file(ft_state, ft / "model.safetensors", metadata={"format": "pt"})
    (ft / "config.json").write_text((base / "config.json").read_text())
    loaded = tf.AutoModelForCausalLM.from_pretrained(ft).model.layers[0].mlp.experts
    stem = "model.layers.0.block_sparse_moe.experts"
    for e in range(2):  # transformers' own conversion: gate_up = w1 | w3, down = w2
        gate, up = loaded.gate_up_proj[e].chunk(2, dim=0)
        assert torch.equal(gate, ft_state[f"{stem}.{e}.w1.weight"])
        assert torch.equal(up, ft_state[f"{stem}.{e}.w3.weight"])
        assert torch.equal(loaded.down_proj[e], ft_state[f"{stem}.{e}.w2.weight"])
    table = compare(base, ft, modules=["gate_proj", "up_proj", "down_proj"], progress=False)
    assert len(table) == 6
    for e in range(2):
        for leaf, part in (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj")):
            key = f"{stem}.{e}.{leaf}.weight"
            expected = reference_delta(base_state[key], ft_state[key])
            check_table(_row(table, key, part), {(None, None, key): expected})


# ------------------------------------------------------------------ timm, --whole, refusals


def timm_checkpoint(folder: Path, architecture: str, state: dict) -> Path:
    """A checkpoint laid out as timm's ``save_for_hf`` writes it: ``config.json`` naming
    ``architecture`` (no ``model_type``) and ``model.safetensors`` with timm's keys."""
    from safetensors.torch import save_file

    folder.mkdir()
    save_file(state, folder / "model.safetensors")
    config = {"architecture": architecture, "num_classes": 10, "num_features": 16}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def timm_state(seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    shapes = {"attn.qkv.weight": (48, 16), "attn.proj.weight": (16, 16), "mlp.fc1.weight": (24, 16)}
    return {
        f"blocks.{i}.{name}": torch.randn(shape, generator=gen) * 0.2
        for i in range(2)
        for name, shape in shapes.items()
    }


def _timm_like_lora(state: dict, folder: Path) -> dict:
    """PEFT LoRA on ``qkv`` of a module tree named as timm names a ViT's blocks."""
    from torch import nn

    def block():
        attn = nn.Module()
        attn.qkv, attn.proj = nn.Linear(16, 48, bias=False), nn.Linear(16, 16, bias=False)
        mlp = nn.Module()
        mlp.fc1 = nn.Linear(16, 24, bias=False)
        module = nn.Module()
        module.attn, module.mlp = attn, mlp
        return module

    model = nn.Module()
    model.blocks = nn.ModuleList([block(), block()])
    model.load_state_dict(state)
    return make_peft_adapter(model, folder, r=2, lora_alpha=4, target_modules=["qkv"])


def test_timm_vit_qkv_thirds_and_unknown_family_whole_only(tmp_path):
    state = timm_state()
    moved = finetuned(state, seed=6)
    base = timm_checkpoint(tmp_path / "base", "vit_tiny_patch16_224.augreg_in21k", state)
    ft = timm_checkpoint(tmp_path / "ft", "vit_tiny_patch16_224.augreg_in21k", moved)
    table = compare(base, ft, progress=False)
    assert len(table) == 4
    for i in range(2):
        key = f"blocks.{i}.attn.qkv.weight"
        for part, rows in (("q_proj", slice(0, 16)), ("v_proj", slice(32, 48))):
            expected = reference_delta(state[key][rows], moved[key][rows])
            check_table(_row(table, key, part), {(None, None, key): expected})

    lora = _timm_like_lora(state, tmp_path / "lora")  # PEFT LoRA on the qkv modules
    table = compare(base, tmp_path / "lora", progress=False)
    for i in range(2):
        key = f"blocks.{i}.attn.qkv.weight"
        for part, rows in (("q_proj", slice(0, 16)), ("v_proj", slice(32, 48))):
            expected = reference_delta(state[key][rows], lora[key][rows])
            check_table(_row(table, key, part), {(None, None, key): expected}, rtol=1e-8)

    other = timm_checkpoint(tmp_path / "mvit", "mvitv2_tiny", state)
    other_ft = timm_checkpoint(tmp_path / "mvit_ft", "mvitv2_tiny", moved)
    with pytest.raises(WDAnalysisError, match="qkv.*mvitv2_tiny.*--whole qkv") as error:
        compare(other, other_ft, progress=False)
    assert "\n" not in str(error.value)
    fc1 = compare(other, other_ft, modules=["fc1"], progress=False)  # qkv blocks nothing else
    assert list(fc1["module"]) == ["fc1", "fc1"]

    from wdanalysis.cli.entry_point import main

    out = tmp_path / "out"
    argv = ["compare", other, other_ft, "--whole", "qkv", "--out", out, "--no-figures", "--quiet"]
    assert main([str(a) for a in argv]) == 0
    import pandas as pd

    whole = pd.read_csv(out / "deltas.csv")
    assert list(whole["module"]) == ["qkv", "qkv"]
    key = "blocks.0.attn.qkv.weight"
    expected = reference_delta(state[key], moved[key])
    check_table(whole, {(None, None, key): expected})
    assert json.loads((out / "run.json").read_text())["options"]["whole"] == ["qkv"]


def test_real_timm_vit_and_peft_lora_on_qkv(tmp_path, monkeypatch):
    """With timm importable (it needs a torchvision built for the installed torch): the
    q/v features are those timm's own forward hands ``scaled_dot_product_attention``."""
    timm = pytest.importorskip("timm")
    from timm.models._hub import save_for_hf

    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=1)
    model = _noisy(model)
    save_for_hf(model, tmp_path / "base", safe_serialization=True)
    attn, seen = model.blocks[0].attn, {}
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def capture(q, k, v, *args, **kwargs):
        seen.update(q=q.detach(), v=v.detach())
        return sdpa(q, k, v, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", capture)
    monkeypatch.setattr(attn, "fused_attn", True)
    hook = attn.qkv.register_forward_hook(lambda m, i, out: seen.setdefault("y", out.detach()))
    with torch.no_grad():
        model(torch.randn(1, 3, 32, 32))
    hook.remove()
    y = seen["y"][0, 0]  # the first token's qkv output features
    index = {}
    for name in ("q", "v"):
        target = seen[name][0, :, 0].reshape(-1)  # (heads, head_dim) of the first token
        distance = (y[:, None] - target[None, :]).abs().min(dim=1).values
        index[name] = torch.nonzero(distance < 1e-6).reshape(-1)
    merged = make_peft_adapter(model, tmp_path / "lora", r=2, lora_alpha=4, target_modules=["qkv"])
    table = compare(tmp_path / "base", tmp_path / "lora", progress=False)
    key = "blocks.0.attn.qkv.weight"
    w0 = model.state_dict()[key]
    for part, rows in (("q_proj", index["q"]), ("v_proj", index["v"])):
        assert len(rows) == w0.shape[0] // 3
        expected = reference_delta(w0[rows], merged[key][rows])
        check_table(_row(table, key, part), {(None, None, key): expected}, rtol=1e-8)


def test_nomic_bert_wqkv_and_fc11_fc12_as_transformers_saves_them(tmp_path):
    """transformers 5 saves NomicBERT in its original layout (``attn.Wqkv``, ``fc11``,
    ``fc12``); which stored rows are the live model's q/v and gate/up is read by matching
    them to the live ``q_proj``/``v_proj``/``gate_proj``/``up_proj`` weights."""
    import transformers as tf
    from safetensors.torch import load_file, save_file

    config = tf.NomicBertConfig(
        hidden_size=16, intermediate_size=12, num_hidden_layers=1, num_attention_heads=4,
        vocab_size=32, pad_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    model = _noisy(tf.AutoModel.from_config(config))
    base = _save(model, tmp_path / "base")
    base_state = load_file(base / "model.safetensors")
    ft_state = finetuned(base_state, seed=7)
    (tmp_path / "ft").mkdir()
    save_file(ft_state, tmp_path / "ft" / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "ft" / "config.json").write_text((base / "config.json").read_text())
    live = dict(model.named_parameters())
    stored = {"Wqkv": "encoder.layers.0.attn.Wqkv.weight"}
    stored |= {leaf: f"encoder.layers.0.mlp.{leaf}.weight" for leaf in ("fc11", "fc12")}
    expected = {}
    for part, leaf, live_name in (
        ("q_proj", "Wqkv", "layers.0.self_attn.q_proj.weight"),
        ("v_proj", "Wqkv", "layers.0.self_attn.v_proj.weight"),
        ("gate_proj", "fc12", "layers.0.mlp.gate_proj.weight"),
        ("up_proj", "fc11", "layers.0.mlp.up_proj.weight"),
    ):
        w, target = base_state[stored[leaf]], live[live_name].detach()
        rows = torch.tensor([i for i in range(len(w)) if (w[i] == target).all(dim=1).any()])
        assert len(rows) == len(target)
        key = stored[leaf]
        expected[(part, key)] = reference_delta(w[rows], ft_state[key][rows])
    modules = ["q_proj", "v_proj", "gate_proj", "up_proj"]
    table = compare(base, tmp_path / "ft", modules=modules, progress=False)
    assert len(table) == len(expected)
    for (part, key), value in expected.items():
        check_table(_row(table, key, part), {(None, None, key): value})


def test_jina_embeddings_v3_mixer_wqkv_as_transformers_saves_it(tmp_path):
    import transformers as tf
    from safetensors.torch import load_file

    config = tf.JinaEmbeddingsV3Config(
        hidden_size=16, intermediate_size=12, num_hidden_layers=1, num_attention_heads=4,
        vocab_size=32, pad_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    model = _noisy(tf.AutoModel.from_config(config))
    base = _save(model, tmp_path / "base")
    moved = {k: v.detach() + 0.05 * torch.randn_like(v) for k, v in model.state_dict().items()}
    ft = _save(model, tmp_path / "ft", moved)
    base_state, ft_state = (
        load_file(base / "model.safetensors"),
        load_file(ft / "model.safetensors"),
    )
    key = "encoder.layers.0.mixer.Wqkv.weight"
    table = compare(base, ft, progress=False)  # the default: query and value
    assert sorted(table["module"]) == ["q_proj", "v_proj"]
    for part in ("q_proj", "v_proj"):  # the stored rows equal to the live model's q / v
        target = model.get_submodule(f"layers.0.self_attn.{part}").weight.detach()
        w = base_state[key]
        rows = torch.tensor([i for i in range(len(w)) if (w[i] == target).all(dim=1).any()])
        assert len(rows) == len(target)
        expected = reference_delta(w[rows], ft_state[key][rows])
        check_table(_row(table, key, part), {(None, None, key): expected})
