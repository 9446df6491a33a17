"""OpenCLIP text encoders of original Stable Diffusion checkpoints, read as CLIP modules.

SD2.x (``cond_stage_model.model.``) and SDXL's second text encoder
(``conditioner.embedders.1.model.``) are stored in OpenCLIP's layout: one
``transformer.resblocks.N.attn.in_proj_weight`` of shape ``(3·d, d)`` holds the query, key
and value projections stacked in that order (``torch.nn.MultiheadAttention``), and the
output and MLP projections are ``attn.out_proj``, ``mlp.c_fc`` and ``mlp.c_proj``. Trainers
(sd-scripts, diffusers) adapt the Hugging Face CLIP modules ``self_attn.q_proj``/``k_proj``/
``v_proj``/``out_proj``, ``mlp.fc1``/``fc2`` of the same encoder, so each is presented here
as a view under its CLIP name in the same tree
(``…model.text_model.encoder.layers.N.self_attn.q_proj.weight`` = rows ``0:d`` of the fused
weight): one table row per projection, as for a diffusers-layout encoder. Full checkpoints
compared beside are presented alike, so every run has the same rows.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from wdanalysis.loaders.checkpoint_kinds import FullModel
from wdanalysis.storage.tensor_store import TensorInfo, TensorStore

_FUSED = re.compile(
    r"^(?P<tree>(?:.*\.)?)transformer\.resblocks\.(?P<n>\d+)\.attn\.in_proj_weight$"
)
_RENAMED = {  # OpenCLIP leaf → CLIP leaf, within one block
    "attn.out_proj.weight": "self_attn.out_proj.weight",
    "mlp.c_fc.weight": "mlp.fc1.weight",
    "mlp.c_proj.weight": "mlp.fc2.weight",
}
View = tuple[str, int | None]  # (real key, which third of the fused rows, or None: whole)


def clip_views(store: TensorStore) -> dict[str, View]:
    """CLIP name → view of the OpenCLIP weights in ``store`` (empty when it has none)."""
    views: dict[str, View] = {}
    for key in store.keys():
        match = _FUSED.match(key)
        if match is None or len(store.shape(key)) != 2 or store.shape(key)[0] % 3:
            continue
        block = f"{match['tree']}transformer.resblocks.{match['n']}."
        clip = f"{match['tree']}text_model.encoder.layers.{match['n']}."
        for third, name in enumerate("qkv"):
            views[f"{clip}self_attn.{name}_proj.weight"] = (key, third)
        for theirs, ours in _RENAMED.items():
            if block + theirs in store:
                views[clip + ours] = (block + theirs, None)
    return views


@dataclass
class ClipViewStore(TensorStore):
    """``source`` with its OpenCLIP projections presented under their CLIP names."""

    reads_as_stored: ClassVar[bool] = False  # q/k/v are thirds of a fused stored weight
    source: TensorStore | None = None
    views: dict[str, View] = field(default_factory=dict)

    @classmethod
    def over(cls, source: TensorStore, views: dict[str, View]) -> ClipViewStore:
        real = {key for key, _ in views.values()}
        infos = {k: v for k, v in source.infos.items() if k not in real}
        for name, (key, third) in views.items():
            info = source.infos[key]
            shape = info.shape if third is None else (info.shape[0] // 3, *info.shape[1:])
            infos[name] = TensorInfo(tuple(shape), info.dtype, info.file)  # no extent of its own
        return cls(source.path, source.format, infos, source=source, views=views)

    def get(self, key: str) -> torch.Tensor:
        if key not in self.views:
            return self.source.get(key)
        real, third = self.views[key]
        tensor = self.source.get(real)
        if third is None:
            return tensor
        rows = tensor.shape[0] // 3
        return tensor[third * rows : (third + 1) * rows]

    def close(self) -> None:
        self.source.close()


def present_as_clip(base: FullModel, runs: list) -> bool:
    """Present the base's OpenCLIP encoders (and those of full checkpoints beside it) under
    CLIP names. Returns whether the base had any."""
    views = clip_views(base.store)
    if not views:
        return False
    base.store = ClipViewStore.over(base.store, views)
    for ckpt in (c for run in runs for c in run.checkpoints if isinstance(c, FullModel)):
        own = clip_views(ckpt.store)
        if own:
            ckpt.store = ClipViewStore.over(ckpt.store, own)
    return True
