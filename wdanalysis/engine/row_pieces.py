"""How the engine walks a stored tensor: a matrix of rows, in row blocks, and rows split
into pieces when one row alone is larger than a block.

A weight is analysed as the matrix ``(shape[0], rest)`` (conv kernels flattened, as PEFT's
DoRA norm runs). A stacked expert weight ``(experts, out, in)`` of a full fine-tuned run
(:mod:`wdanalysis.loaders.formats.moe`) is such a matrix with one row per expert: a single
row of Mixtral's ``(8, 14336, 4096)`` is 470 MB in float64, more than the whole read budget.
Such rows are streamed as ``pieces`` consecutive stretches of the same bytes (the tensor
read as ``(shape[0]·pieces, rest/pieces)``), and the sums of each piece are added into its
stored row (one vector per row) or into its stretch of stored columns (one per column), so
that a block never holds more than a block's bytes, whatever the stored shape.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from wdanalysis.engine.decomposition import accumulate_sums

WIDEST = 8  # bytes per value as computed (float64)


@dataclass(frozen=True)
class Block:
    """Stored rows ``start:start+n`` of one weight, and how its vectors run."""

    key: str
    start: int  # in stream rows (stored rows × pieces)
    n: int
    cols: int
    mode: str  # "rows" | "cols"
    transposed: bool
    pieces: int = 1


@dataclass(frozen=True)
class Geometry:
    """A stored tensor as the engine streams it."""

    rows: int  # stored rows (dim 0)
    cols: int  # values per stored row
    pieces: int = 1  # stretches per stored row

    @property
    def stream_rows(self) -> int:
        return self.rows * self.pieces

    @property
    def stream_cols(self) -> int:
        return self.cols // self.pieces

    def vectors(self, mode: str) -> int:
        return self.rows if mode == "rows" else self.cols


def geometry(shape, max_row_bytes: int, splittable: bool) -> Geometry:
    """Rows of at most ``max_row_bytes`` (in float64) where the tensor can be split: a row
    is cut along its leading dims (``out`` of ``(experts, out, in)``), never inside one."""
    rows = shape[0] if len(shape) else 1
    cols = max(1, numel(shape) // max(rows, 1))
    pieces = 1
    for n in shape[1:-1] if splittable else ():
        if (cols // pieces) * WIDEST <= max_row_bytes:
            break
        pieces *= n
    return Geometry(rows, cols, pieces)


def accumulate_block(a, b, sums, mode: str, start: int, pieces: int, diff: bool, backend: str):
    """Add one block's sums (stream rows ``start:start+len(a)``) into ``sums`` (3, vectors);
    returns the backends that ran."""
    n = a.shape[0]
    if pieces == 1:
        target = sums[:, start : start + n] if mode == "rows" else sums
        return {accumulate_sums(a, b, target, mode, diff, backend)}
    if mode == "rows":  # stream row r is a piece of stored row r // pieces
        part = torch.zeros(3, n, dtype=torch.float64, device=a.device)
        used = {accumulate_sums(a, b, part, "rows", diff, backend)}
        owner = torch.arange(start, start + n, device=a.device) // pieces
        sums.index_add_(1, owner, part)
        return used
    width, used = a.shape[1], set()
    for piece in range(pieces):  # stream row r holds stored columns (r % pieces)·width + …
        first = (piece - start) % pieces
        if first < n:
            target = sums[:, piece * width : (piece + 1) * width]
            used.add(
                accumulate_sums(a[first::pieces], b[first::pieces], target, "cols", diff, backend)
            )
    return used


def numel(shape) -> int:
    total = 1
    for n in shape:
        total *= n
    return total


def itemsize(dtype) -> int:
    return dtype.itemsize if isinstance(dtype, torch.dtype) else WIDEST
