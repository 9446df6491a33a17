"""Fused projections split into the matrices they hold, by the model's own ``config.json``.

Some architectures store several projections in one weight: GPT-2 ``c_attn`` (``Conv1D``,
q | k | v), Phi-3 ``qkv_proj`` (q | k | v, grouped-query sizes) and ``gate_up_proj``
(gate | up), GPT-NeoX/Pythia and Bloom ``query_key_value`` (per head: q, k, v), Falcon
``query_key_value`` (three layouts), MPT and DBRX ``Wqkv`` (q | k | v; DBRX with fewer kv
heads), GPT-BigCode ``c_attn`` (an ``nn.Linear``; multi-query: q | one k head | one v head).
Each layout below was read from the model's forward in transformers (``modeling_<type>.py``,
the line that splits the fused output) and is checked in ``tests/test_fused_projections.py``
against the k and v the tiny model itself caches.

ΔM and ΔD are per output feature, so a part is a set of output features (index ranges, one
per head where heads are interleaved) of the stored weight: the streaming engine reads the
fused weight once and sums each part apart (:mod:`wdanalysis.engine.part_sums`), exactly.
Parts are named as the unfused architectures name them (``q_proj``, ``k_proj``, ``v_proj``,
``gate_proj``, ``up_proj``); the table keeps the stored key in ``parameter``.

A fused weight whose layout cannot be read (no ``config.json``, a head count missing, an
unknown model type) is refused with one line when it is selected, never averaged.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from wdanalysis.errors import WDAnalysisError
from wdanalysis.storage.small_files import read_json
from wdanalysis.weights.fused_parts import Missing as _Missing
from wdanalysis.weights.fused_parts import Part, requested
from wdanalysis.weights.fused_parts import config_int as _int
from wdanalysis.weights.fused_parts import heads_of as _heads
from wdanalysis.weights.fused_parts import interleave as _interleave
from wdanalysis.weights.fused_parts import qkv as _qkv
from wdanalysis.weights.fused_rules import MODERN_RULES, RENAMED_LEAVES, STORED_OUT, model_type_of

__all__ = ["FUSED_LEAVES", "FusedLayouts", "Part", "fused_layouts", "read_config"]

# Leaf names that are fused in some architecture: such a weight is split by a rule below
# (or in :mod:`wdanalysis.weights.fused_rules`) or refused when selected, never averaged,
# unless asked for whole (``whole=``, ``--whole NAME``). Mamba's ``in_proj`` is x | z (and
# more in Mamba-2), Baichuan's ``W_pack`` and InternLM2's ``wqkv`` q | k | v, DINOv2's
# ``w12`` gate | up, Megatron's ``linear_qkv`` per-group q, k, v, PVT/Twins' ``kv`` k | v.
FUSED_LEAVES = frozenset(
    {
        "c_attn",
        "query_key_value",
        "qkv_proj",
        "Wqkv",
        "wqkv",
        "qkv",
        "to_qkv",
        "kv",
        "linear_qkv",
        "gate_up_proj",
        "gate_up",
        "w12",
        "w13",
        "W_pack",
        "Wi",
        "in_proj",
        "kv_a_proj_with_mqa",
        "kv_b_proj",
    }
)
# GPT-2's cross-attention query ``q_attn`` and the leaves of fused_rules: one matrix each,
# renamed where a rule knows the model type, left alone elsewhere.
_RENAMED_LEAVES = {"q_attn"} | RENAMED_LEAVES
# Leaves of stacked expert parameters ``(experts, …)`` saved without ``.weight``.
_EXPERT_LEAVES = {"gate_up_proj", "down_proj", "gate_proj", "up_proj", "w1", "w2", "w3"}
GPT2_TYPES = {"gpt2", "openai-gpt", "imagegpt", "decision_transformer"}
_FIX = "pass the base model's folder with its config.json"
_WHOLE = "or analyse it unsplit, rows of its parts averaged, with --whole {leaf} (whole=)"


@dataclass
class FusedLayouts:
    """The parts of every fused weight of a base, and why the others cannot be split."""

    parts: dict[str, tuple[Part, ...]]
    refused: dict[str, WDAnalysisError]

    def __contains__(self, key: str) -> bool:
        return key in self.parts or key in self.refused


def read_config(path: Path) -> tuple[dict | None, Path]:
    """The ``config.json`` beside a model file or in its folder (``None`` if absent)."""
    folder = path if path.is_dir() else path.parent
    file = folder / "config.json"
    try:
        config = read_json(file)
    except (OSError, ValueError):
        return None, file
    return (config if isinstance(config, dict) else None), file


def fused_layouts(
    path: Path, shapes: dict, transposed: Callable[[str], bool], whole: Sequence[str] = ()
) -> FusedLayouts:
    """Split every fused weight of the model at ``path`` (``shapes``: its keys' shapes).

    ``whole``: names (leaf, path or regular expression, as ``--modules`` takes them) of
    fused weights to analyse unsplit; they are neither split nor refused here.
    """
    config, file = read_config(Path(path))
    parts: dict[str, tuple[Part, ...]] = {}
    refused: dict[str, WDAnalysisError] = {}
    for key, shape in shapes.items():
        leaf = _leaf(key)
        renamed = leaf in _RENAMED_LEAVES and config is not None
        if whole and requested(key, whole):
            continue
        if _stacked_expert(key, leaf, shape):
            refused[key] = _stacked_refusal(key, shape, config, file)
            continue
        if not key.endswith(".weight") or len(shape) != 2:
            continue
        if leaf not in FUSED_LEAVES and not renamed:
            continue
        if leaf in ("qkv", "kv") and "attn" not in key.lower() and "attention" not in key.lower():
            continue
        try:
            if config is None:
                raise _Missing(
                    "its config.json cannot be read"
                    if file.exists()
                    else "no config.json beside the base, so its head counts are unknown"
                )
            out = shape[1] if transposed(key) else shape[0]  # the layout rule may refuse
            parts[key] = _split(config, key, leaf, out)
        except WDAnalysisError as error:
            refused[key] = error
        except _Missing as missing:
            if renamed:
                continue
            into = "gate_proj/up_proj" if leaf == "gate_up_proj" else "its parts"
            where = file if config is not None else file.parent
            refused[key] = WDAnalysisError(
                f"cannot split the fused projection {key!r} into {into}: {missing}",
                where,
                f"{_FIX}; {_WHOLE.format(leaf=leaf)}",
            )
    return FusedLayouts(parts, refused)


def _stacked_expert(key: str, leaf: str, shape) -> bool:
    """A stacked ``(experts, …)`` parameter saved without ``.weight`` (gpt-oss's layout
    before :mod:`wdanalysis.loaders.formats.stacked_experts` presents it per expert)."""
    return (
        len(shape) == 3
        and not key.endswith(".weight")
        and leaf in _EXPERT_LEAVES
        and ".experts" in key
    )


def _stacked_refusal(key: str, shape, config: dict | None, file: Path) -> WDAnalysisError:
    from wdanalysis.loaders.formats.stacked_experts import STACKED_IN_OUT

    model_type = None if config is None else model_type_of(config)
    where = file if config is not None else file.parent
    if model_type in STACKED_IN_OUT:  # compare presents them per expert; this path did not
        return WDAnalysisError(
            f"stacked expert parameter {key!r} {list(shape)} is read per expert by compare "
            "only (live tracking reads no stacked experts)",
            where,
            "compare saved checkpoints, or track the attention weights",
        )
    return WDAnalysisError(
        f"stacked expert parameter {key!r} {list(shape)}: its per-expert layout "
        f"((experts, in, out) or (experts, out, in), parts interleaved or not) is not known for "
        f"model_type {model_type!r}",
        where,
        "only gpt-oss's stacked experts are read; save the model with one weight per expert",
    )


def _leaf(key: str) -> str:
    path = key[: -len(".weight")] if key.endswith(".weight") else key
    return path.rsplit(".", 1)[-1]


def _split(config: dict, key: str, leaf: str, out: int) -> tuple[Part, ...]:
    model_type = model_type_of(config)
    rule = _RULES.get((model_type, leaf))
    if rule is None:
        raise _Missing(f"the layout of {leaf!r} in model_type {model_type!r} is not known")
    groups, pattern = rule({**config, STORED_OUT: out}, key)
    total = groups * sum(size for _, size in pattern)
    if total != out:
        raise _Missing(f"config.json gives {total} output features for it but the weight has {out}")
    return _interleave(groups, pattern)


def _gpt2(config: dict, key: str):
    """GPT-2 ``Attention``: ``c_attn(x).split(embed_dim, dim=2)``; cross-attention's
    ``c_attn`` holds k | v and its ``q_attn`` the query (renamed ``q_proj``)."""
    hidden = _int(config, "n_embd", "hidden_size")
    if key.endswith(".q_attn.weight"):
        return 1, [("q_proj", hidden)]
    if ".crossattention." in key:
        return 1, [("k_proj", hidden), ("v_proj", hidden)]
    return 1, _qkv(hidden, hidden)


def _bigcode(config: dict, key: str):
    """GPT-BigCode: multi-query ``split((embed_dim, kv_dim, kv_dim))``; otherwise
    ``view(..., num_heads, 3 * head_dim).split(3 * [head_dim])``: per head q, k, v."""
    hidden = _int(config, "n_embd", "hidden_size")
    heads, head_dim = _heads(config, hidden, "n_head", "num_attention_heads")
    if key.endswith(".q_attn.weight"):
        return 1, [("q_proj", hidden)]
    if ".crossattention." in key:  # upstream splits it into (head_dim, head_dim): broken
        raise _Missing("GPT-BigCode's cross-attention c_attn has no working split upstream")
    if config.get("multi_query", True):
        return 1, _qkv(hidden, head_dim)
    return heads, _qkv(head_dim, head_dim)


def _phi3(config: dict, key: str):
    """Phi-3: ``qkv[..., :query_pos]``, then ``num_key_value_heads·head_dim`` for k and v;
    ``gate_up_proj(x).chunk(2, dim=-1)``."""
    if key.endswith(".gate_up_proj.weight"):
        size = _int(config, "intermediate_size")
        return 1, [("gate_proj", size), ("up_proj", size)]
    hidden = _int(config, "hidden_size")
    heads, head_dim = _heads(config, hidden, "num_attention_heads")
    head_dim = _int(config, "head_dim", default=head_dim)
    kv = _int(config, "num_key_value_heads")
    return 1, _qkv(heads * head_dim, kv * head_dim)


def _per_head(*head_names: str):
    """GPT-NeoX ``view(..., -1, 3 * head_size).chunk(3)``, Bloom ``view(..., num_heads, 3,
    head_dim)``: q, k, v of head 0, then of head 1, …"""

    def rule(config: dict, key: str):
        hidden = _int(config, "hidden_size", "n_embed", "d_model")
        heads, head_dim = _heads(config, hidden, *head_names)
        return heads, _qkv(head_dim, head_dim)

    return rule


def _falcon(config: dict, key: str):
    """Falcon ``_split_heads``: new decoder architecture ``view(..., -1, heads/kv + 2,
    head_dim)`` (per kv group: its q heads, one k, one v); multi-query ``view(..., heads
    + 2, head_dim)`` (all q heads, one k, one v); else ``view(..., heads, 3, head_dim)``."""
    hidden = _int(config, "hidden_size", "n_embed")
    heads, head_dim = _heads(config, hidden, "num_attention_heads", "n_head")
    if config.get("new_decoder_architecture", False):
        kv = _int(config, "num_kv_heads", "n_head_kv")
        if heads % kv:
            raise _Missing(f"{heads} heads are not a multiple of {kv} kv heads")
        return kv, _qkv(head_dim * (heads // kv), head_dim)
    if config.get("multi_query", True):
        return 1, _qkv(hidden, head_dim)
    return heads, _qkv(head_dim, head_dim)


def _refined_web(config: dict, key: str):
    """Falcon's remote code before transformers: ``RefinedWeb`` (40B) splits as the new
    decoder architecture (``n_head_kv`` groups), ``RefinedWebModel`` (7B) as the old one."""
    new = config.get("model_type") == "RefinedWeb"
    return _falcon({**config, "new_decoder_architecture": new}, key)


def _mpt(config: dict, key: str):
    """MPT ``Wqkv(x).chunk(3, dim=2)``; llm-foundry's other ``attn_type``s are not read."""
    attn = config.get("attn_config") or {}
    kind = attn.get("attn_type", "multihead_attention") if isinstance(attn, dict) else None
    if kind != "multihead_attention":
        raise _Missing(f"attn_config.attn_type {kind!r} (only multihead_attention is read)")
    hidden = _int(config, "d_model", "hidden_size")
    return 1, _qkv(hidden, hidden)


def _dbrx(config: dict, key: str):
    """DBRX ``split([hidden_size, kv_n_heads·head_dim, kv_n_heads·head_dim])``."""
    hidden = _int(config, "d_model", "hidden_size")
    _, head_dim = _heads(config, hidden, "n_heads", "num_attention_heads")
    attn = config.get("attn_config") or {}
    kv = _int(attn if isinstance(attn, dict) else {}, "kv_n_heads", default=1)
    return 1, _qkv(hidden, kv * head_dim)


_RULES: dict[tuple[str | None, str], Callable] = {
    **{(t, "c_attn"): _gpt2 for t in GPT2_TYPES},
    **{(t, "q_attn"): _gpt2 for t in GPT2_TYPES},
    ("gpt_bigcode", "c_attn"): _bigcode,
    ("gpt_bigcode", "q_attn"): _bigcode,
    ("phi3", "qkv_proj"): _phi3,
    ("phi3", "gate_up_proj"): _phi3,
    ("gpt_neox", "query_key_value"): _per_head("num_attention_heads"),
    ("bloom", "query_key_value"): _per_head("n_head", "num_attention_heads"),
    ("falcon", "query_key_value"): _falcon,
    ("RefinedWeb", "query_key_value"): _refined_web,
    ("RefinedWebModel", "query_key_value"): _refined_web,
    ("mpt", "Wqkv"): _mpt,
    ("dbrx", "Wqkv"): _dbrx,
    **MODERN_RULES,
}
