"""Which weight matrices to analyse, and how to name them in the table.

Architectures name their attention projections differently (LLaMA ``q_proj``, BERT
``query``, T5 ``q``, DistilBERT ``q_lin``, GPT-2's fused ``c_attn``). The defaults pick the
query and value projections of the paper; any list of leaf module names can be asked for.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from wdanalysis.errors import WDAnalysisError

QUERY_NAMES = ("q_proj", "query", "q", "q_lin", "wq", "query_proj", "to_q")
VALUE_NAMES = ("v_proj", "value", "v", "v_lin", "wv", "value_proj", "to_v")
FUSED_QKV_NAMES = ("c_attn", "query_key_value", "qkv_proj", "Wqkv", "qkv", "in_proj")
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


def _is_candidate(key: str, shape: Sequence[int]) -> bool:
    return key.endswith(".weight") and len(shape) >= 2


def _leaf_matches(key: str, names: Iterable[str]) -> bool:
    path = module_path(key)
    leaf = path.rsplit(".", 1)[-1]
    if leaf not in names:
        return False
    return leaf not in _SHORT_NAMES or bool(_ATTENTION_HINT.search(path))


def select_weights(
    shapes: dict[str, Sequence[int]], modules: Sequence[str] | None, source: str
) -> list[str]:
    """Base-model keys of the matrices to analyse, in file order.

    ``modules`` are leaf names (``q_proj``) or full module paths / regular expressions
    matched against the whole key. ``None`` selects query and value projections, falling
    back to fused QKV projections for architectures that have no separate ones.
    """
    candidates = [k for k, shape in shapes.items() if _is_candidate(k, shape)]
    if modules:
        chosen = [k for k in candidates if _requested(k, modules)]
        if not chosen:
            raise WDAnalysisError(
                f"--modules {' '.join(modules)} selects no weight matrix",
                source,
                f"leaf names here include: {', '.join(_leaf_examples(candidates))}",
            )
        return chosen
    chosen = [k for k in candidates if _leaf_matches(k, QUERY_NAMES + VALUE_NAMES)]
    if not chosen:
        chosen = [k for k in candidates if _leaf_matches(k, FUSED_QKV_NAMES)]
    if not chosen:
        raise WDAnalysisError(
            "found no attention query/value weights",
            source,
            f"name them with --modules; leaf names here include: "
            f"{', '.join(_leaf_examples(candidates))}",
        )
    return chosen


def _requested(key: str, modules: Sequence[str]) -> bool:
    path = module_path(key)
    leaf = path.rsplit(".", 1)[-1]
    for name in modules:
        if name == leaf or name == path or path.endswith("." + name):
            return True
        if any(ch in name for ch in "*[]()|+?\\^$") and re.search(name, path):
            return True
    return False


def _leaf_examples(keys: Iterable[str], limit: int = 12) -> list[str]:
    seen: dict[str, None] = {}
    for key in keys:
        seen.setdefault(module_path(key).rsplit(".", 1)[-1], None)
    names = list(seen)
    return names[:limit] + (["…"] if len(names) > limit else [])
