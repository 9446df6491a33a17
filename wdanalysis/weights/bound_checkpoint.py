"""A checkpoint matched to the selected base weights, and what the engine asks of it.

Below the streaming engine and the analysis alike: both use :class:`BoundCheckpoint`, the
whole-matrix effective weight (for the rare adapter layouts the engine does not stream) and
the NaN/Inf check with its one-line message.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from wdanalysis.errors import NumericalError
from wdanalysis.loaders.layer_shapes import is_embedding_name
from wdanalysis.loaders.runs import AdapterCheckpoint, Checkpoint, FullModel, Run
from wdanalysis.storage.store_protocol import WeightStore


@dataclass
class BoundCheckpoint:
    """A checkpoint whose weights have been matched to the selected base keys."""

    run: Run
    checkpoint: Checkpoint
    method: str
    keys: dict  # base key → checkpoint key (full) or AdapterModule (adapter)
    # base key → rows the checkpoint's matrix has beyond the base's (a resized vocabulary):
    # only the base's rows are compared (:func:`vocabulary_rows_added`)
    rows_added: dict[str, int] = field(default_factory=dict)
    # base key → S, the factor decoupled weight decay applied to the tensor carrying the
    # weight's norms (the weight, or DoRA's m); keys with an unknown S are absent
    # (:mod:`wdanalysis.loaders.decay_shrink`)
    decay_shrink: dict[str, float] = field(default_factory=dict)


# Output heads over the vocabulary (rows = tokens), besides the embeddings' names.
VOCABULARY_HEADS = {"lm_head", "embed_out", "output"}


def vocabulary_rows_added(key: str, base_shape, shape) -> int | None:
    """Rows added to a vocabulary matrix (``resize_token_embeddings`` for added tokens):
    an embedding table or output head whose checkpoint has more rows (tokens) than the
    base and the same other dims. ``None`` for any other difference of shapes."""
    base_shape, shape = tuple(base_shape), tuple(shape)
    if len(shape) != 2 or len(base_shape) != 2 or shape[1] != base_shape[1]:
        return None
    leaf = key.removesuffix(".weight").rsplit(".", 1)[-1]
    if not (is_embedding_name(key, base_shape) or leaf in VOCABULARY_HEADS):
        return None
    return shape[0] - base_shape[0] if shape[0] > base_shape[0] else None


def effective_weight(bound: BoundCheckpoint, key: str, w0: torch.Tensor, transposed):
    """The checkpoint's whole weight for base ``key`` (adapters: merged in float64); of a
    resized vocabulary, the base's rows."""
    ckpt = bound.checkpoint
    added = bound.rows_added.get(key)
    if isinstance(ckpt, AdapterCheckpoint):
        module = bound.keys.get(key)
        if module is None:  # this module was not adapted: unchanged
            return w0
        if added:  # a modules_to_save copy of a resized table: PEFT saves it whole
            return ckpt.adapter.store.get(module.replacement)[: w0.shape[0]].to(torch.float64)
        return ckpt.adapter.effective_weight(module, w0, transposed(key))
    weight = ckpt.store.get(bound.keys[key])
    return weight[: weight.shape[0] - added] if added else weight


BROKEN = (
    "the checkpoint is broken (training diverged or the file is damaged); "
    "leave it out or use an earlier checkpoint"
)


def require_finite(tensor: torch.Tensor, key: str, where: Path, hint: str | None = None) -> None:
    """Refuse a weight holding NaN/Inf, counting the bad values."""
    if tensor.dtype.itemsize == 1:  # fp8: isfinite is not implemented for it
        tensor = tensor.float()
    if not torch.isfinite(tensor).all():
        bad = int((~torch.isfinite(tensor)).sum())
        raise NumericalError(
            f"weight {key!r} holds {bad} NaN/Inf value(s) of {tensor.numel()}",
            where,
            hint or BROKEN,
        )


def file_of(store: WeightStore, key: str) -> Path:
    """The file that holds ``key`` (its shard), or the store's own path when none does."""
    info = store.infos.get(key)
    return info.file if info is not None else Path(store.path)


def source_of(item: BoundCheckpoint, key: str) -> Path:
    """The file that holds ``key`` for this checkpoint (the shard, or the adapter)."""
    ckpt = item.checkpoint
    if isinstance(ckpt, FullModel):
        return file_of(ckpt.store, item.keys[key])
    return ckpt.path
