"""ΔM/ΔD of each part of a fused weight (q, k, v of one stored matrix), from one pass over it.

A part is a set of output features (:class:`~wdanalysis.weights.fused.Part`). On the output
axis (the paper's) every vector is one output feature, so the per-vector sums the engine
accumulates for the whole stored weight already hold each part's sums: a part's change is
computed from its own columns of them, exactly. On the input axis every vector runs across
all output features, so there the sums are kept per part, shape ``(parts, 3, n_in)``, and
each block's rows (``nn.Linear``) or columns (``Conv1D``, stored (in, out)) of a part are
added to its own sums.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from wdanalysis.engine.decomposition import (
    DecompositionChange,
    accumulate_sums,
    as_matrix,
    change_from_sums,
    matrix_sums,
)
from wdanalysis.weights.fused import Part


def new_sums(parts: Sequence[Part] | None, axis: str, n_vec: int, device) -> torch.Tensor:
    """Zeroed sums for one weight: ``(3, n_vec)``, or one set per part on the input axis."""
    shape = (len(parts), 3, n_vec) if parts and axis == "in" else (3, n_vec)
    return torch.zeros(shape, dtype=torch.float64, device=device)


def accumulate_parts(a, b, sums, parts: Sequence[Part], mode, start, n, diff, backend) -> set[str]:
    """Add the block of stored rows ``start:start+n`` into each part's sums ``(P, 3, n_in)``.

    ``mode`` ``"cols"``: an ``nn.Linear`` weight, the part's output features are rows of the
    block; ``"rows"``: stored (in, out), they are columns of every row of the block.
    """
    used = set()
    for target, part in zip(sums, parts, strict=True):
        if mode == "cols":
            for first, stop in part.runs:
                lo, hi = max(first, start) - start, min(stop, start + n) - start
                if lo < hi:
                    used.add(accumulate_sums(a[lo:hi], b[lo:hi], target, mode, diff, backend))
        else:
            index = part.indices(a.device)
            a_part, b_part = a.index_select(1, index), b.index_select(1, index)
            target = target[:, start : start + n]
            used.add(accumulate_sums(a_part, b_part, target, mode, diff, backend))
    return used


def whole_sums(w0, wt, mode: str, parts: Sequence[Part] | None, axis: str, backend):
    """:func:`~wdanalysis.engine.decomposition.matrix_sums` of two whole stored matrices,
    per part on the input axis (the matrices sliced to the part's output features)."""
    if not parts or axis != "in":
        return matrix_sums(w0, wt, mode, backend)
    a, b = as_matrix(w0), as_matrix(wt)
    dim = 0 if mode == "cols" else 1  # output features: rows of a Linear, else columns
    return torch.stack(
        [
            matrix_sums(
                a.index_select(dim, p.indices(a.device)),
                b.index_select(dim, p.indices(a.device)),
                mode,
                backend,
            )
            for p in parts
        ]
    )


def changes(
    sums, parts: Sequence[Part] | None, magnitude=None, shrink: float | None = None
) -> list[DecompositionChange]:
    """One change for the whole weight, or one per part (``change.part`` naming it).

    ``magnitude``: DoRA's new norms on the output axis (one per output feature), or None.
    ``shrink``: the weight's weight-decay factor, for ``delta_m_learned`` (None: unknown).
    """
    if not parts:
        return [change_from_sums(sums[0], sums[1], sums[2], new_norm=magnitude, shrink=shrink)]
    found = []
    for p, part in enumerate(parts):
        if sums.dim() == 3:  # input axis: the part's own sums
            change = change_from_sums(sums[p][0], sums[p][1], sums[p][2], shrink=shrink)
        else:
            index = part.indices(sums.device)
            aa, ad, dd = (sums[i].index_select(0, index) for i in range(3))
            m = None if magnitude is None else magnitude.reshape(-1)[index.to(magnitude.device)]
            change = change_from_sums(aa, ad, dd, new_norm=m, shrink=shrink)
        found.append(dataclasses.replace(change, part=part.name))
    return found
