"""Which matrix a weight key is: component, stack, attention kind, layer and module.

Two matrices that happen to share a layer index and a leaf name must not be pooled as if
they were one kind (``shared/reference/formats-and-pitfalls.md``, pitfall 15):

* **component**: a pipeline's parts, as diffusers names them: ``unet``/``transformer``,
  ``text_encoder``, ``text_encoder_2`` (SDXL's two CLIP encoders both have
  ``…layers.0.self_attn.q_proj``). Read from a pipeline folder's ``<component>.`` keys, or
  from a single-file checkpoint's trees (``model.diffusion_model.``,
  ``cond_stage_model.``, ``conditioner.embedders.0.``/``.1.``, the trees kohya's
  ``lora_unet_``/``lora_te1_``/``lora_te2_`` bind to); empty for a single model.
* **stack**: ``encoder``/``decoder`` where the names say so and the component has both
  (T5, BART, Whisper, a VAE); empty where it has one stack only: BERT's ``encoder.``, OPT's
  ``decoder.``, CLIP's ``text_model.encoder.`` name no distinction, so their rows say ``""``.
* **attention**: ``self``/``cross`` for attention projections of a component that has
  cross-attention (BART/Whisper ``encoder_attn``, T5 ``EncDecAttention``, a UNet's
  ``attn2``; ``attn1`` and ``self_attn`` are self-attention); empty where a model has only
  one kind.
* **layer**: the first block index of the key, except in a UNet, whose keys nest several
  indices (``down_blocks.1.attentions.0.transformer_blocks.1``): there it is the block's
  position in network order (down, mid, up) among the blocks holding the same module, so
  that each matrix of a kind has its own layer.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from wdanalysis.weights.selection import WeightName, module_path

if TYPE_CHECKING:  # the loaders import torch: the table and the figures need neither
    from wdanalysis.loaders.checkpoint_kinds import FullModel

__all__ = ["IDENTITY_COLUMNS", "describe_weight", "identity_namer", "name_weights"]

#: Table columns that, with ``module``, tell kinds of matrices apart (fits group by them).
IDENTITY_COLUMNS: tuple[str, ...] = ("component", "stack", "attention")

_CROSS = re.compile(r"^(encoder_attn|encdecattention|crossattention|cross_attn|attn2)$")
_SELF = re.compile(r"^(self_attn|selfattention|self_attention|attention|attn|attn1|self)$")
_UNET_BLOCKS = re.compile(
    r"(^|\.)(down_blocks|mid_block|up_blocks|input_blocks|middle_block|output_blocks)\."
)
# Single-file (original layout) checkpoints: tree prefix → component, longest first.
_SINGLE_FILE_TREES = (
    ("conditioner.embedders.0.", "text_encoder"),
    ("conditioner.embedders.1.", "text_encoder_2"),
    ("cond_stage_model.", "text_encoder"),
    ("first_stage_model.", "vae"),
    ("model.diffusion_model.", "unet"),
)


def _segments(path: str) -> list[str]:
    return path.lower().split(".")


def _component_of(keys: list[str], path: Path | None) -> Callable[[str], tuple[str, str]]:
    """``key → (component, key inside the component)`` for this base's keys."""
    from wdanalysis.loaders.formats.pipeline import is_pipeline

    if path is not None and Path(path).is_dir() and is_pipeline(Path(path)):
        return lambda key: tuple(key.split(".", 1)) if "." in key else ("", key)
    if not any(k.startswith("model.diffusion_model.") for k in keys):
        return lambda key: ("", key)
    # a transformer (SD3, Flux) under the same prefix has no input_blocks
    unet = any(k.startswith("model.diffusion_model.input_blocks.") for k in keys)

    def split(key: str) -> tuple[str, str]:
        for prefix, component in _SINGLE_FILE_TREES:
            if key.startswith(prefix):
                if component == "unet" and not unet:
                    component = "transformer"
                return component, key[len(prefix) :]
        return "", key

    return split


def _stack(inner: str) -> str:
    """encoder/decoder from the module path (cross-attention names do not count)."""
    parts = [p for p in _segments(module_path(inner)) if not _CROSS.match(p)]
    if any("decoder" in p for p in parts):
        return "decoder"
    if any("encoder" in p for p in parts):
        return "encoder"
    return ""


def _attention(inner: str) -> str:
    """cross/self for a weight inside an attention block, else empty."""
    parts = _segments(module_path(inner))[:-1]  # the leaf (q_proj, to_q, …) is no block
    if any(_CROSS.match(p) for p in parts):
        return "cross"
    if any(_SELF.match(p) for p in parts):
        return "self"
    return ""


def _order_key(path: str) -> tuple:
    """Network order: numbers compared as numbers (down < mid < up sorts by name)."""
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in path.split("."))


def _unet_layers(inner_keys: Iterable[str]) -> dict[str, int]:
    """Layer of each UNet key: position of its block among the blocks that hold the same
    module (``attn1.to_q``, ``conv1``), in network order."""
    by_tail: dict[str, set[str]] = {}
    for inner in inner_keys:
        path = module_path(inner)
        if not _UNET_BLOCKS.search("." + path):
            continue
        parts = path.split(".")
        last = max((i for i, p in enumerate(parts) if p.isdigit()), default=None)
        if last is None:
            continue
        block, tail = ".".join(parts[: last + 1]), ".".join(parts[last + 1 :])
        by_tail.setdefault(tail, set()).add(block)
    layers: dict[str, int] = {}
    for inner in inner_keys:
        path = module_path(inner)
        parts = path.split(".")
        last = max((i for i, p in enumerate(parts) if p.isdigit()), default=None)
        if last is None or not _UNET_BLOCKS.search("." + path):
            continue
        blocks = sorted(by_tail[".".join(parts[last + 1 :])], key=_order_key)
        layers[inner] = blocks.index(".".join(parts[: last + 1]))
    return layers


def name_weights(keys: Iterable[str], path: Path | None = None) -> dict[str, WeightName]:
    """The identity of every key of one base model (``path``: where it lies, to recognise
    a diffusers pipeline folder)."""
    keys = list(keys)
    split = _component_of(keys, path)
    parts = {key: split(key) for key in keys}
    cross_in = {c for c, inner in parts.values() if _attention(inner) == "cross"}
    stacked = components_with_two_stacks(parts.values())
    unet_layers: dict[str, dict[str, int]] = {}
    for component in {c for c, _ in parts.values()}:
        inner_keys = [inner for c, inner in parts.values() if c == component]
        unet_layers[component] = _unet_layers(inner_keys)
    names = {}
    for key, (component, inner) in parts.items():
        segments = module_path(inner).split(".")
        layer = unet_layers[component].get(inner)
        if layer is None:
            layer = next((int(p) for p in segments if p.isdigit()), None)
        attention = _attention(inner) if component in cross_in else ""
        stack = _stack(inner) if component in stacked else ""
        names[key] = WeightName(
            key, segments[-1], layer, stack, component=component, attention=attention
        )
    return names


def components_with_two_stacks(parts: Iterable[tuple[str, str]]) -> set[str]:
    """The components (of ``(component, inner key)`` pairs) that hold both an encoder and a
    decoder stack: only there does ``stack`` tell kinds apart; elsewhere it is empty."""
    seen: dict[str, set[str]] = {}
    for component, inner in parts:
        seen.setdefault(component, set()).add(_stack(inner))
    return {c for c, stacks in seen.items() if {"encoder", "decoder"} <= stacks}


def identity_namer(base: FullModel) -> Callable[[str], WeightName]:
    """``key → WeightName`` for the base's keys (other keys: named on their own)."""
    keys = list(base.store.keys())
    names = name_weights(keys, base.path)

    def name(key: str) -> WeightName:
        found = names.get(key)
        return found if found is not None else name_weights([*keys, key], base.path)[key]

    return name


def describe_weight(key: str) -> WeightName:
    """One key's identity on its own (no pipeline component; no model to tell whether its
    stack is one of two, so ``stack`` is what its names say)."""
    return replace(name_weights([key])[key], stack=_stack(key))
