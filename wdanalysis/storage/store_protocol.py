"""What the streaming engine reads from a store of tensors, declared once.

The engine compares a base with checkpoints whose tensors come from many places: files
(:class:`~wdanalysis.storage.tensor_store.TensorStore` and the stores of other ecosystems
built on it, which rename, reshape, dequantize or split tensors on read) and a model being
trained (:class:`~wdanalysis.engine.live_model.LiveStore`). None of them needs to inherit
from :class:`WeightStore`: it is a structural interface, so that a store over in-memory
tensors need not pretend to hold files.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch

from wdanalysis.storage.tensor_store import TensorInfo

__all__ = ["WeightStore"]


@runtime_checkable
class WeightStore(Protocol):
    """Keys → tensors, with shapes and dtypes known before any tensor is read."""

    path: Path  # named in error messages when no file of ``infos`` holds a key
    format: str  # for ``inspect`` and error messages: "safetensors", "live", …
    # Where each key lies on disk. A key missing here is never streamed with ``pread``
    # (:func:`~wdanalysis.storage.row_reader.extent_of`): it is read whole with ``get``.
    infos: Mapping[str, TensorInfo]

    def keys(self) -> list[str]: ...

    def __contains__(self, key: str) -> bool: ...

    def shape(self, key: str) -> tuple[int, ...]: ...

    def dtype(self, key: str) -> torch.dtype | str:
        """A torch dtype, or the file's name for one this torch lacks (e.g. ``"F4"``)."""
        ...

    def get(self, key: str) -> torch.Tensor:
        """The whole tensor, as the analysis sees it (views and dequantization applied)."""
        ...
