"""Issue 33: DeepSeek MLA, ModernBERT, NomicBERT, Jina-v3, timm, ``--whole`` (experts:
``test_fused_experts.py``).

Every model is a tiny one built by transformers 5 from its config and saved with
``save_pretrained``; adapters are PEFT's (``merge_and_unload`` on a float64 copy is the
truth). Which output features form each part is read from the model itself where it can be
(the q, k, v its forward hands its attention; the live modules' own weights, where
transformers saves the fused layout), and ΔM/ΔD of those float64 slices
(``builders.reference_delta``) must equal the table's rows. Shapes are non-square.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from builders import check_table, finetuned, make_peft_adapter, reference_delta
from fused_builders import forward_features, noisy, one_row, save

from wdanalysis import compare
from wdanalysis.errors import WDAnalysisError

pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
]


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
    return noisy(model)


@pytest.mark.parametrize(("version", "q_lora_rank"), [(3, 12), (2, None)])
def test_mla_query_value_and_kv_parts(tmp_path, version, q_lora_rank):
    model = deepseek(version, q_lora_rank)
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    ft_state = finetuned(base_state, seed=3)
    base, ft = save(model, tmp_path / "base"), save(model, tmp_path / "ft", ft_state)
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
        check_table(one_row(table, key, part), {(None, None, key): reference_delta(w0, wt)})
    default = compare(base, ft, progress=False)  # the paper's query/value on MLA
    assert sorted(default["module"]) == ["q_proj", "v_proj"]
    assert set(default["parameter"]) == {query, f"{stem}.kv_b_proj.weight"}


def test_mla_peft_lora_on_kv_b_proj(tmp_path):
    model = deepseek(3, 12)
    merged = make_peft_adapter(
        model, tmp_path / "adapter", r=2, lora_alpha=4, target_modules=["q_b_proj", "kv_b_proj"]
    )
    base = save(model, tmp_path / "base")
    table = compare(base, tmp_path / "adapter", progress=False)
    key = "model.layers.0.self_attn.kv_b_proj.weight"
    values = forward_features(model, "model.layers.0.self_attn.kv_b_proj")["v"]
    w0 = model.state_dict()[key]
    expected = reference_delta(w0[values], merged[key][values])
    check_table(one_row(table, key, "v_proj"), {(None, None, key): expected}, rtol=1e-8)


# ------------------------------------------------------------------------- ModernBERT


def modernbert():
    import transformers as tf

    ids = dict(pad_token_id=0, bos_token_id=0, eos_token_id=0, cls_token_id=0, sep_token_id=0)
    config = tf.ModernBertConfig(
        hidden_size=32, intermediate_size=20, num_hidden_layers=1, num_attention_heads=4,
        vocab_size=64, global_attn_every_n_layers=1, **ids,
    )  # fmt: skip
    torch.manual_seed(0)
    return noisy(tf.AutoModel.from_config(config, attn_implementation="eager"))


def test_modernbert_wqkv_and_wi_parts(tmp_path):
    model = modernbert()
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    ft_state = finetuned(base_state, seed=4)
    base, ft = save(model, tmp_path / "base"), save(model, tmp_path / "ft", ft_state)
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
            check_table(one_row(table, key, part, run), {(None, None, key): expected}, rtol=1e-8)
    mlp_only = compare(base, ft, modules=["gate_proj", "up_proj"], progress=False)
    assert sorted(mlp_only["module"]) == ["gate_proj", "up_proj"]  # Wqkv blocks nothing


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
            check_table(one_row(table, key, part), {(None, None, key): expected})

    lora = _timm_like_lora(state, tmp_path / "lora")  # PEFT LoRA on the qkv modules
    table = compare(base, tmp_path / "lora", progress=False)
    for i in range(2):
        key = f"blocks.{i}.attn.qkv.weight"
        for part, rows in (("q_proj", slice(0, 16)), ("v_proj", slice(32, 48))):
            expected = reference_delta(state[key][rows], lora[key][rows])
            check_table(one_row(table, key, part), {(None, None, key): expected}, rtol=1e-8)

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
    model = noisy(model)
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
        check_table(one_row(table, key, part), {(None, None, key): expected}, rtol=1e-8)


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
    model = noisy(tf.AutoModel.from_config(config))
    base = save(model, tmp_path / "base")
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
        check_table(one_row(table, key, part), {(None, None, key): value})


def test_jina_embeddings_v3_mixer_wqkv_as_transformers_saves_it(tmp_path):
    import transformers as tf
    from safetensors.torch import load_file

    config = tf.JinaEmbeddingsV3Config(
        hidden_size=16, intermediate_size=12, num_hidden_layers=1, num_attention_heads=4,
        vocab_size=32, pad_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    model = noisy(tf.AutoModel.from_config(config))
    base = save(model, tmp_path / "base")
    moved = {k: v.detach() + 0.05 * torch.randn_like(v) for k, v in model.state_dict().items()}
    ft = save(model, tmp_path / "ft", moved)
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
        check_table(one_row(table, key, part), {(None, None, key): expected})
