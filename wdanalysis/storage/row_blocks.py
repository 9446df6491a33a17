"""A matrix that a store reads a block of rows at a time, so that the engine never holds it
whole: weights that are transformed on read (FP8 dequantized with their scales,
:mod:`wdanalysis.loaders.formats.fp8quant`) stream as bounded as those read with ``pread``.

A store offers them with ``row_blocks(key) -> RowBlocks | None``; the engine takes the rows
it streams with ``blocks.view(rows, cols)[start:stop]``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

__all__ = ["RowBlocks"]


@dataclass(frozen=True)
class RowBlocks:
    """A stored tensor of ``shape`` whose stored rows (dim 0) ``start:stop`` are given by
    ``read(start, stop)`` as a tensor of shape ``(stop - start, *shape[1:])``."""

    shape: tuple[int, ...]
    read: Callable[[int, int], torch.Tensor]

    def view(self, rows: int, cols: int) -> _StreamRows:
        """The tensor as the ``(rows, cols)`` matrix the engine streams: dim 0 kept and the
        rest flattened, each stored row possibly cut into ``rows / shape[0]`` pieces."""
        stored = self.shape[0] if self.shape else 1
        numel = 1
        for n in self.shape:
            numel *= n
        if rows * cols != numel or rows % max(stored, 1):
            raise ValueError(f"a tensor of shape {list(self.shape)} is no ({rows}, {cols}) matrix")
        return _StreamRows(self, rows, cols, rows // max(stored, 1))


@dataclass(frozen=True)
class _StreamRows:
    blocks: RowBlocks
    rows: int
    cols: int
    pieces: int  # stream rows per stored row

    @property
    def shape(self) -> tuple[int, int]:
        return (self.rows, self.cols)

    def __getitem__(self, index: slice) -> torch.Tensor:
        """Stream rows ``index`` (a slice with step 1), read from the stored rows holding them."""
        start, stop, step = index.indices(self.rows)
        if step != 1:
            raise ValueError("row blocks are read with a step of 1")
        first, last = start // self.pieces, -(-stop // self.pieces)
        data = self.blocks.read(first, max(first, last)).reshape(-1, self.cols)
        offset = first * self.pieces
        return data[start - offset : stop - offset]
