"""A checkpoint matched to the selected base weights, and what the engine asks of it.

Below the streaming engine and the analysis alike: both use :class:`BoundCheckpoint`, the
whole-matrix effective weight (for the rare adapter layouts the engine does not stream) and
the NaN/Inf check with its one-line message.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from wdanalysis.errors import NumericalError
from wdanalysis.loaders.runs import AdapterCheckpoint, Checkpoint, FullModel, Run
from wdanalysis.storage.store_protocol import WeightStore


@dataclass
class BoundCheckpoint:
    """A checkpoint whose weights have been matched to the selected base keys."""

    run: Run
    checkpoint: Checkpoint
    method: str
    keys: dict  # base key → checkpoint key (full) or AdapterModule (adapter)


def effective_weight(bound: BoundCheckpoint, key: str, w0: torch.Tensor, transposed):
    """The checkpoint's whole weight for base ``key`` (adapters: merged in float64)."""
    ckpt = bound.checkpoint
    if isinstance(ckpt, AdapterCheckpoint):
        module = bound.keys.get(key)
        if module is None:  # this module was not adapted: unchanged
            return w0
        return ckpt.adapter.effective_weight(module, w0, transposed(key))
    return ckpt.store.get(bound.keys[key])


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
