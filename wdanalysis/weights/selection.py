"""Which weight matrices to analyse, and how to name them in the table.

Architectures name their attention projections differently (LLaMA ``q_proj``, BERT
``query``, T5 ``q``, DistilBERT ``q_lin``). The defaults pick the query and value projections
of the paper; any list of leaf module names can be asked for. Fused projections (GPT-2's
``c_attn``, Phi-3's ``qkv_proj``, …) are split into parts named ``q_proj``/``k_proj``/
``v_proj`` (:mod:`wdanalysis.weights.fused`), so ``q_proj`` means the query everywhere.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from wdanalysis.errors import WDAnalysisError
from wdanalysis.weights.fused import FusedLayouts, Part
from wdanalysis.weights.fused_parts import requested

QUERY_NAMES = ("q_proj", "query", "q", "q_lin", "wq", "query_proj", "to_q")
VALUE_NAMES = ("v_proj", "value", "v", "v_lin", "wv", "value_proj", "to_v")
# Fused q/k/v leaves (split by weights.fused; refused when they cannot be). Mamba's
# ``in_proj`` (x | z) is not attention and is not among them.
FUSED_QKV_NAMES = (
    "c_attn",
    "query_key_value",
    "qkv_proj",
    "Wqkv",
    "wqkv",
    "qkv",
    "to_qkv",
    "linear_qkv",
    "W_pack",
    "kv_b_proj",
)
# Leaf names that only mean "attention projection" inside an attention block.
_SHORT_NAMES = {"q", "v", "wq", "wv", "qkv"}
_ATTENTION_HINT = re.compile(r"attn|attention", re.IGNORECASE)


@dataclass(frozen=True)
class WeightName:
    """How one weight key appears in the table."""

    parameter: str  # the base model's key, e.g. model.layers.3.self_attn.q_proj.weight
    module: str  # leaf module name, e.g. q_proj
    layer: int | None  # block index
    stack: str  # encoder | decoder | "" (see wdanalysis.weights.identity)
    component: str = ""  # pipeline component: unet, text_encoder, text_encoder_2, …
    attention: str = ""  # self | cross | "" (models with one kind of attention)


def module_path(key: str) -> str:
    """``a.b.q_proj.weight`` → ``a.b.q_proj``."""
    return key[: -len(".weight")] if key.endswith(".weight") else key


def part_key(key: str, part: Part) -> str:
    """The key the part would have unfused: ``a.attn.c_attn.weight`` → ``a.attn.q_proj.weight``."""
    head = module_path(key).rpartition(".")[0]
    return f"{head}.{part.name}.weight" if head else f"{part.name}.weight"


def _is_candidate(key: str, shape: Sequence[int]) -> bool:
    return key.endswith(".weight") and len(shape) >= 2


def _leaf_matches(key: str, names: Iterable[str]) -> bool:
    path = module_path(key)
    leaf = path.rsplit(".", 1)[-1]
    if leaf not in names:
        return False
    return leaf not in _SHORT_NAMES or bool(_ATTENTION_HINT.search(path))


def select_targets(
    shapes: dict[str, Sequence[int]],
    modules: Sequence[str] | None,
    source: str,
    fused: FusedLayouts,
    whole: Sequence[str] = (),
) -> tuple[list[str], dict[str, tuple[Part, ...]]]:
    """Base keys to analyse, in file order, and the parts chosen of the fused ones.

    ``modules`` are leaf names (``q_proj``) or full module paths / regular expressions
    matched against the whole key; a fused weight's part matches as its unfused key would
    (:func:`part_key`), and naming the fused weight itself takes all its parts. ``None``
    selects query and value projections, the parts of fused weights too. A fused weight
    that cannot be split (:class:`~wdanalysis.weights.fused.FusedLayouts` ``refused``)
    raises its one-line error when it is asked for by name, or when nothing else was found;
    left out of the default selection, it is named in a warning. ``whole``: fused weights
    asked for unsplit (``--whole``), selected as stored.
    """
    candidates = [k for k, s in shapes.items() if _is_candidate(k, s) or k in fused.refused]
    if modules:
        wanted = lambda key: _requested(key, modules)  # noqa: E731
    else:
        wanted = lambda key: _leaf_matches(key, QUERY_NAMES + VALUE_NAMES)  # noqa: E731
    chosen, parts = [], {}
    for key in candidates:
        if key in fused.parts:
            named = bool(modules) and _requested(key, modules)  # the fused weight itself
            picked = tuple(p for p in fused.parts[key] if named or wanted(part_key(key, p)))
            if picked:
                chosen.append(key)
                parts[key] = picked
        elif key in fused.refused:
            if modules and _requested(key, modules):
                raise fused.refused[key]
        elif wanted(key) or (whole and _requested(key, whole)):
            chosen.append(key)
    if chosen:
        _warn_left_out(candidates, modules, fused)
        return chosen, parts
    refused = [k for k in candidates if k in fused.refused]
    attention = [k for k in refused if _leaf_matches(k, FUSED_QKV_NAMES)]
    if attention or (modules and refused):  # the attention one says most
        raise fused.refused[(attention or refused)[0]]
    names = ", ".join(_leaf_examples(candidates, fused))
    if modules:
        raise WDAnalysisError(
            f"--modules {' '.join(modules)} selects no weight matrix",
            source,
            f"leaf names here include: {names}",
        )
    raise WDAnalysisError(
        "found no attention query/value weights",
        source,
        f"name them with --modules; leaf names here include: {names}",
    )


def _warn_left_out(candidates: list[str], modules, fused: FusedLayouts) -> None:
    """The default selection leaves fused attention weights it cannot split: say so."""
    left = [k for k in candidates if k in fused.refused and _leaf_matches(k, FUSED_QKV_NAMES)]
    if left and not modules:
        warnings.warn(
            f"{len(left)} fused attention weight(s) cannot be split and are left out, e.g. "
            f"{left[0]!r}: {fused.refused[left[0]]}",
            stacklevel=4,
        )


_requested = requested  # fused_parts.requested: a leaf, a module path or a regex


def _leaf_examples(keys: Iterable[str], fused: FusedLayouts, limit: int = 12) -> list[str]:
    seen: dict[str, None] = {}
    for key in keys:
        for name in [module_path(key).rsplit(".", 1)[-1]] + [
            p.name for p in fused.parts.get(key, ())
        ]:
            seen.setdefault(name, None)
    names = list(seen)
    return names[:limit] + (["…"] if len(names) > limit else [])
