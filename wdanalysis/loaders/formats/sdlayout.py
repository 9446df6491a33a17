"""Stable Diffusion UNet module names in its two layouts, both ways.

The same UNet is saved in the **diffusers** layout (``unet/diffusion_pytorch_model.safetensors``:
``down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q``) and in the **original**
(LDM) layout of single-file checkpoints (``model.diffusion_model.input_blocks.4.1.…``);
trainers name LoRA modules after either (sd-scripts: SD1.x/2.x in diffusers names, SDXL in
original names). The correspondence, as diffusers' ``convert_diffusers_to_original_stable_
diffusion.py`` and sd-scripts' ``model_util``/``sdxl_model_util`` state it:

* SD1.x, SD2.x and SDXL have ``LAYERS_PER_BLOCK = 2`` ResNets per down block (three per up
  block), so level ``i`` of the down path is ``input_blocks.3i+1 … 3i+3`` (``3i+j+1`` for
  ResNet/attention ``j``, ``3(i+1)`` for the downsampler) and level ``i`` of the up path is
  ``output_blocks.3i … 3i+2``. Inside an original block, ``.0`` is the ResNet (or the
  downsampler, ``.0.op``), ``.1`` the attention, and the upsampler is ``.1.conv`` in a level
  without attention, ``.2.conv`` in one with it (SD1.x/2.x ``output_blocks.2.1.conv``; SDXL
  ``output_blocks.2.2.conv``) — both are offered, the base has one of them.
* ResNet internals are renamed (``norm1``/``conv1`` ↔ ``in_layers.0``/``.2`` …); names inside
  attention blocks (``proj_in``, ``transformer_blocks.0.attn1.to_q`` …) are the same in both.

Names are converted with the separator they use: ``.`` for dotted module paths, ``_`` for
kohya's flattened ones (``down_blocks_0_resnets_1_conv1``); only the block indices are
parsed, so a flattened name is never guessed back into dots.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from functools import cache

DIFFUSERS = "diffusers"
ORIGINAL = "original (LDM)"
LAYERS_PER_BLOCK = 2  # SD1.x, SD2.x, SDXL
_PER_LEVEL = LAYERS_PER_BLOCK + 1  # original blocks per level: 2 + down/upsampler

# (diffusers, original) whole module names, dotted.
FIXED = (
    ("conv_in", "input_blocks.0.0"),
    ("time_embedding.linear_1", "time_embed.0"),
    ("time_embedding.linear_2", "time_embed.2"),
    ("add_embedding.linear_1", "label_emb.0.0"),  # SDXL's size/crop conditioning
    ("add_embedding.linear_2", "label_emb.0.2"),
    ("conv_norm_out", "out.0"),
    ("conv_out", "out.2"),
)
# (diffusers, original) leaf names inside a ResNet block, dotted.
RESNET = (
    ("norm1", "in_layers.0"),
    ("conv1", "in_layers.2"),
    ("norm2", "out_layers.0"),
    ("conv2", "out_layers.3"),
    ("time_emb_proj", "emb_layers.1"),
    ("conv_shortcut", "skip_connection"),
)

Rule = tuple[str, Callable[[re.Match, str], list[str]]]


def _resnet_leaf(rest: str, s: str, to_original: bool) -> str | None:
    for diffusers, original in RESNET:
        src, dst = (diffusers, original) if to_original else (original, diffusers)
        if rest == src.replace(".", s):
            return dst.replace(".", s)
    return None


def _join(s: str, *parts) -> str:
    return s.join(str(p) for p in parts)


# ---------------------------------------------------------------- diffusers → original


def _down(m: re.Match, s: str) -> list[str]:
    i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
    if j >= LAYERS_PER_BLOCK:
        return []
    block = _PER_LEVEL * i + j + 1
    if kind == "attentions":
        return [_join(s, "input_blocks", block, 1, rest)]
    leaf = _resnet_leaf(rest, s, to_original=True)
    return [_join(s, "input_blocks", block, 0, leaf)] if leaf else []


def _up(m: re.Match, s: str) -> list[str]:
    i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
    if j >= _PER_LEVEL:
        return []
    block = _PER_LEVEL * i + j
    if kind == "attentions":
        return [_join(s, "output_blocks", block, 1, rest)]
    leaf = _resnet_leaf(rest, s, to_original=True)
    return [_join(s, "output_blocks", block, 0, leaf)] if leaf else []


def _mid(m: re.Match, s: str) -> list[str]:
    kind, j, rest = m[1], int(m[2]), m[3]
    if kind == "attentions":
        return [_join(s, "middle_block", 1, rest)] if j == 0 else []
    leaf = _resnet_leaf(rest, s, to_original=True)
    return [_join(s, "middle_block", 2 * j, leaf)] if leaf and j < 2 else []


_TO_ORIGINAL: tuple[Rule, ...] = (
    (r"down_blocks{s}(\d+){s}(resnets|attentions){s}(\d+){s}(.+)", _down),
    (
        r"down_blocks{s}(\d+){s}downsamplers{s}0{s}conv",
        lambda m, s: [_join(s, "input_blocks", _PER_LEVEL * (int(m[1]) + 1), 0, "op")],
    ),
    (r"mid_block{s}(resnets|attentions){s}(\d+){s}(.+)", _mid),
    (r"up_blocks{s}(\d+){s}(resnets|attentions){s}(\d+){s}(.+)", _up),
    (
        r"up_blocks{s}(\d+){s}upsamplers{s}0{s}conv",
        lambda m, s: [
            _join(s, "output_blocks", _PER_LEVEL * int(m[1]) + 2, at, "conv") for at in (1, 2)
        ],
    ),
)

# ---------------------------------------------------------------- original → diffusers


def _input(m: re.Match, s: str) -> list[str]:
    n, at, rest = int(m[1]), int(m[2]), m[3]
    if n == 0:
        return []  # input_blocks.0.0 is conv_in, a fixed name
    level, j = divmod(n - 1, _PER_LEVEL)
    if j == LAYERS_PER_BLOCK:  # the level's last block: the downsampler
        return [_join(s, "down_blocks", level, "downsamplers", 0, "conv")] if rest == "op" else []
    if at == 1:
        return [_join(s, "down_blocks", level, "attentions", j, rest)]
    leaf = _resnet_leaf(rest, s, to_original=False) if at == 0 else None
    return [_join(s, "down_blocks", level, "resnets", j, leaf)] if leaf else []


def _output(m: re.Match, s: str) -> list[str]:
    n, at, rest = int(m[1]), int(m[2]), m[3]
    level, j = divmod(n, _PER_LEVEL)
    if rest == "conv" and at in (1, 2) and j == _PER_LEVEL - 1:  # attention has no .conv
        return [_join(s, "up_blocks", level, "upsamplers", 0, "conv")]
    if at == 1:
        return [_join(s, "up_blocks", level, "attentions", j, rest)]
    leaf = _resnet_leaf(rest, s, to_original=False) if at == 0 else None
    return [_join(s, "up_blocks", level, "resnets", j, leaf)] if leaf else []


def _middle(m: re.Match, s: str) -> list[str]:
    n, rest = int(m[1]), m[2]
    if n == 1:
        return [_join(s, "mid_block", "attentions", 0, rest)]
    leaf = _resnet_leaf(rest, s, to_original=False)
    return [_join(s, "mid_block", "resnets", n // 2, leaf)] if leaf and n in (0, 2) else []


_TO_DIFFUSERS: tuple[Rule, ...] = (
    (r"input_blocks{s}(\d+){s}(\d+){s}(.+)", _input),
    (r"middle_block{s}(\d+){s}(.+)", _middle),
    (r"output_blocks{s}(\d+){s}(\d+){s}(.+)", _output),
)


@cache
def _compiled(to: str, s: str) -> tuple[tuple[re.Pattern, Callable], ...]:
    rules = _TO_ORIGINAL if to == ORIGINAL else _TO_DIFFUSERS
    return tuple((re.compile(p.format(s=re.escape(s)) + "$"), fn) for p, fn in rules)


def convert(name: str, to: str, sep: str = ".") -> list[str]:
    """The names UNet module ``name`` (a path inside the UNet, without ``.weight``) has in
    layout ``to`` (:data:`ORIGINAL` or :data:`DIFFUSERS`); ``[]`` when ``name`` is not a
    module path of the other layout. Two names for an upsampler (``.1.conv``/``.2.conv``)."""
    if to not in (ORIGINAL, DIFFUSERS):
        raise ValueError(f"unknown UNet layout {to!r}")
    for diffusers, original in FIXED:
        src, dst = (diffusers, original) if to == ORIGINAL else (original, diffusers)
        if name == src.replace(".", sep):
            return [dst.replace(".", sep)]
    for pattern, build in _compiled(to, sep):
        match = pattern.match(name)
        if match:
            return build(match, sep)
    return []


def layout_of(name: str, sep: str = ".") -> str | None:
    """:data:`DIFFUSERS` or :data:`ORIGINAL` for a UNet module path of that layout."""
    if convert(name, ORIGINAL, sep):
        return DIFFUSERS
    if convert(name, DIFFUSERS, sep):
        return ORIGINAL
    return None


def find_converted(
    name: str, sep: str, lookup: Callable[[str], str | None], note: Callable[[str], None]
) -> str | None:
    """The base key of UNet module ``name`` found under its name in the other layout by
    ``lookup`` (converted name → base key or ``None``); ``note`` is told the conversion."""
    for to in (ORIGINAL, DIFFUSERS):
        for candidate in convert(name, to, sep):
            found = lookup(candidate)
            if found is not None:
                source = DIFFUSERS if to == ORIGINAL else ORIGINAL
                note(f"UNet names converted from the {source} to the {to} layout of the base")
                return found
    return None


def names_layout(names) -> str | None:
    """The layout most of these UNet module paths (dotted or flattened) are named in."""
    counts = {DIFFUSERS: 0, ORIGINAL: 0}
    for name in names:
        layout = layout_of(name, ".") or layout_of(name, "_")
        if layout:
            counts[layout] += 1
    if not any(counts.values()):
        return None
    return max(counts, key=counts.get)


# Where each pipeline component lives in a single-file (original) checkpoint: a module
# found by its tail outside its component's tree (SDXL's second text encoder's layer 0 in
# the first one's) is not that module.
SINGLE_FILE_UNET = "model.diffusion_model."
_TREES = {
    "unet": (SINGLE_FILE_UNET,),
    "text_encoder": ("cond_stage_model.", "conditioner.embedders.0."),
    "text_encoder_1": ("conditioner.embedders.0.",),
    "text_encoder_2": ("conditioner.embedders.1.",),
}


def is_single_file(base_keys) -> bool:
    return any(key.startswith(SINGLE_FILE_UNET) for key in base_keys)


def outside_its_tree(component: str, key: str) -> bool:
    """In a single-file checkpoint: ``key`` is not where ``component`` lives."""
    trees = _TREES.get(component.lower().replace(" ", "_"))
    return trees is not None and not key.startswith(trees)
