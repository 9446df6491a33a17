"""Fused and renamed projections of the 2025–26 architectures, split by the model's forward.

Each rule below was read from the forward of the model in transformers 5 (or timm 1.0) and is
checked in ``tests/test_fused_modern.py`` against the tiny model itself:

* **ModernBERT** ``attn.Wqkv``: ``qkv.view(..., 3, -1, head_dim)``: q | k | v.
  ``mlp.Wi``: ``input, gate = Wi(x).chunk(2, dim=-1)``, ``Wo(act(input) * gate)``: the
  activated half plays LLaMA's ``gate_proj``, the multiplier ``up_proj``; named so.
* **NomicBERT** (its original ``encoder.layers.N.attn.Wqkv``, which transformers' weight
  conversion chunks into q, k, v) and **Jina-embeddings-v3** (``mixer.Wqkv``): q | k | v.
  NomicBERT's ``fc11``/``fc12`` are renamed ``up_proj``/``gate_proj`` as transformers does.
* **DeepSeek-V2/V3, Kimi-K2** (multi-head latent attention): ``q_b_proj`` (after
  ``q_a_proj``) is the query, named ``q_proj``; ``kv_b_proj`` holds per head
  ``[qk_nope_head_dim k | v_head_dim v]``, named ``k_nope`` and ``v_proj``;
  ``kv_a_proj_with_mqa`` holds ``[kv_lora_rank latent | qk_rope_head_dim rope key]``, named
  ``kv_latent`` and ``k_rope``.
* **Mixtral**: the experts' ``w1``/``w3``/``w2`` are ``gate_proj``/``up_proj``/``down_proj``.
* **gpt-oss** experts ``gate_up_proj``, presented per expert and stored (in, out)
  (:mod:`wdanalysis.loaders.formats.stacked_experts`): ``gate_up[..., ::2]`` is the gate,
  ``[..., 1::2]`` the up projection.
* **timm** ViT/DeiT/EVA/BEiT/Swin ``attn.qkv``: ``reshape(B, N, 3, num_heads, head_dim)``:
  q | k | v. timm's ``config.json`` names ``architecture`` (no ``model_type``); only the
  families listed in :data:`TIMM_QKV_FAMILIES` are split, any other is refused.

A rule returns ``(groups, [(part name, size), …])``: ``groups`` repetitions of the pattern
along the output features (:func:`wdanalysis.weights.fused_parts.interleave`).
"""

from __future__ import annotations

from collections.abc import Callable

from wdanalysis.weights.fused_parts import Missing, config_int, heads_of, qkv

__all__ = ["MODERN_RULES", "RENAMED_LEAVES", "STORED_OUT", "TIMM_QKV_FAMILIES", "model_type_of"]

#: The config entry :func:`wdanalysis.weights.fused.fused_layouts` adds for a rule that
#: sizes its parts from the stored weight (timm's configs hold no head counts).
STORED_OUT = "_stored_output_features"

#: timm model families whose ``attn.qkv`` is reshaped ``(3, num_heads, head_dim)``.
TIMM_QKV_FAMILIES = frozenset(
    {"vit", "deit", "deit3", "eva", "eva02", "beit", "beitv2", "swin", "flexivit"}
)
#: Leaves that are one matrix under another name: renamed where a rule knows the model,
#: left as they are elsewhere (never refused: they are not fused).
RENAMED_LEAVES = frozenset({"q_b_proj", "w1", "w2", "w3", "fc11", "fc12"})


def model_type_of(config: dict) -> str | None:
    """``model_type``; ``"timm"`` for a timm ``config.json`` (it names ``architecture``)."""
    model_type = config.get("model_type")
    if model_type is None and isinstance(config.get("architecture"), str):
        return "timm"
    return model_type


def _thirds(config: dict, key: str):
    """q | k | v, each ``hidden_size`` (``num_attention_heads · head_dim``) rows."""
    hidden = config_int(config, "hidden_size", "n_embd", "d_model")
    heads, head_dim = heads_of(config, hidden, "num_attention_heads", "n_head")
    size = heads * config_int(config, "head_dim", default=head_dim)
    return 1, qkv(size, size)


def _modernbert(config: dict, key: str):
    if key.endswith(".Wi.weight"):
        size = config_int(config, "intermediate_size")
        return 1, [("gate_proj", size), ("up_proj", size)]  # act(input) * gate
    return _thirds(config, key)


def _nomic_mlp(config: dict, key: str):
    """transformers' conversion renames ``fc11`` → ``up_proj``, ``fc12`` → ``gate_proj``."""
    size = config_int(config, "n_inner", "intermediate_size")
    return 1, [("up_proj" if key.endswith(".fc11.weight") else "gate_proj", size)]


def _mla_sizes(config: dict) -> tuple[int, int, int, int]:
    heads = config_int(config, "num_attention_heads")
    nope = config_int(config, "qk_nope_head_dim")
    rope = config_int(config, "qk_rope_head_dim")
    v = config_int(config, "v_head_dim")
    return heads, nope, rope, v


def _mla(config: dict, key: str):
    """DeepSeek-V2/V3 ``…Attention.forward``: ``q.view(..., -1, qk_head_dim)``;
    ``kv_a_proj_with_mqa(x).split([kv_lora_rank, qk_rope_head_dim])``;
    ``kv_b_proj(...).view(..., -1, nope + v).split([nope, v])``."""
    heads, nope, rope, v = _mla_sizes(config)
    if key.endswith(".q_b_proj.weight"):
        return 1, [("q_proj", heads * (nope + rope))]
    if key.endswith(".kv_b_proj.weight"):
        return heads, [("k_nope", nope), ("v_proj", v)]
    if key.endswith(".kv_a_proj_with_mqa.weight"):
        return 1, [("kv_latent", config_int(config, "kv_lora_rank")), ("k_rope", rope)]
    raise Missing(f"{key!r} is no MLA projection")


def _mixtral(config: dict, key: str):
    """``MixtralBlockSparseTop2MLP``: ``w2(act(w1(x)) * w3(x))``."""
    if ".experts." not in key:
        raise Missing("it is not an expert's weight")
    leaf = key.rsplit(".", 2)[-2]
    hidden, inner = config_int(config, "hidden_size"), config_int(config, "intermediate_size")
    roles = {"w1": ("gate_proj", inner), "w3": ("up_proj", inner), "w2": ("down_proj", hidden)}
    return 1, [roles[leaf]]


def _gpt_oss(config: dict, key: str):
    """``GptOssExperts._apply_gate``: ``gate_up[..., ::2]``, ``gate_up[..., 1::2]``."""
    return config_int(config, "intermediate_size"), [("gate_proj", 1), ("up_proj", 1)]


def _timm(config: dict, key: str):
    """timm ``Attention``: ``qkv(x).reshape(B, N, 3, num_heads, head_dim)``. timm's config
    holds no head counts: the thirds are those of the stored weight's output features."""
    family = str(config.get("architecture", "")).split(".")[0].split("_")[0].lower()
    if family not in TIMM_QKV_FAMILIES:
        raise Missing(f"timm architecture {config.get('architecture')!r} is not a known family")
    out = config_int(config, STORED_OUT)
    if out % 3:
        raise Missing(f"its {out} output features are not three equal parts")
    return 1, qkv(out // 3, out // 3)


MLA_TYPES = ("deepseek_v2", "deepseek_v3", "kimi_k2")
# transformers converts these checkpoints with its Mixtral mapping (w1 | w3 → gate_up_proj)
MIXTRAL_TYPES = ("mixtral", "minimax", "minimax_m2")
MODERN_RULES: dict[tuple[str | None, str], Callable] = {
    ("modernbert", "Wqkv"): _modernbert,
    ("modernbert", "Wi"): _modernbert,
    ("nomic_bert", "Wqkv"): _thirds,
    ("nomic_bert", "fc11"): _nomic_mlp,
    ("nomic_bert", "fc12"): _nomic_mlp,
    ("jina_embeddings_v3", "Wqkv"): _thirds,
    **{(t, leaf): _mla for t in MLA_TYPES for leaf in ("q_b_proj", "kv_b_proj")},
    **{(t, "kv_a_proj_with_mqa"): _mla for t in MLA_TYPES},
    **{(t, leaf): _mixtral for t in MIXTRAL_TYPES for leaf in ("w1", "w2", "w3")},
    ("gpt_oss", "gate_up_proj"): _gpt_oss,
    ("timm", "qkv"): _timm,
}
