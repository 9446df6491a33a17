"""Magnitude and direction change of one weight matrix (DoRA paper, Eqs. 2-4).

``W = m · V/‖V‖`` with ``m = ‖W‖`` taken per output feature (one value per row of an
``nn.Linear`` weight, as every DoRA implementation stores it) or, optionally, per input
feature. For a checkpoint ``W_t`` against the base ``W_0``:

* ``ΔM = mean_n |m_t[n] − m_0[n]|``
* ``ΔD = mean_n (1 − cos(W_t[n], W_0[n]))``

``1 − cos`` is computed without cancellation from the update ``d = W_t − W_0``:
``‖d‖² − (‖b‖ − ‖a‖)² = 2(‖a‖‖b‖ − a·b)``, so ``1 − cos = (‖d‖² − Δm²) / (2‖a‖‖b‖)``
with ``Δm = (2a·d + ‖d‖²)/(‖a‖ + ‖b‖)``. Every sum is accumulated in float64, in row
chunks, so a true ΔD of 1e-8 comes out right and memory stays bounded.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

AXES = ("out", "in")
ROW_CHUNK_ELEMENTS = 1 << 22  # ~32 MB of float64 per operand chunk


@dataclass(frozen=True)
class DecompositionChange:
    delta_m: float
    delta_d: float  # NaN only when every vector had zero norm (counted below)
    n_vectors: int
    zero_norm_vectors: int


def as_out_in(weight: torch.Tensor, transposed: bool) -> torch.Tensor:
    """View a weight as (out_features, in_features[, ...]) whatever its storage layout."""
    if transposed:
        return weight.T
    return weight if weight.dim() >= 2 else weight.reshape(-1, 1)


def vector_sums(
    w0: torch.Tensor, wt: torch.Tensor, axis: str = "out"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per magnitude entry: ``Σa²``, ``Σa·d``, ``Σd²`` in float64, with ``d = wt − w0``.

    Both inputs are in (out, in, ...) layout. Rows are processed in chunks so that the
    float64 copies never exceed a few tens of MB, whatever the matrix size.
    """
    if axis not in AXES:
        raise ValueError(f"axis must be one of {AXES}, got {axis!r}")
    w0 = w0.reshape(w0.shape[0], -1)
    wt = wt.reshape(wt.shape[0], -1)
    n_out, n_in = w0.shape
    size = n_out if axis == "out" else n_in
    sums = torch.zeros(3, size, dtype=torch.float64)
    rows = max(1, ROW_CHUNK_ELEMENTS // max(n_in, 1))
    for start in range(0, n_out, rows):
        a = w0[start : start + rows].to(torch.float64)
        d = wt[start : start + rows].to(torch.float64) - a
        if axis == "out":
            target = sums[:, start : start + rows]
            target[0] += (a * a).sum(dim=1)
            target[1] += (a * d).sum(dim=1)
            target[2] += (d * d).sum(dim=1)
        else:
            sums[0] += (a * a).sum(dim=0)
            sums[1] += (a * d).sum(dim=0)
            sums[2] += (d * d).sum(dim=0)
    return sums[0], sums[1], sums[2]


def change_from_sums(aa: torch.Tensor, ad: torch.Tensor, dd: torch.Tensor) -> DecompositionChange:
    """ΔM and ΔD from the per-vector sums (see module docstring for the algebra)."""
    bb = (aa + 2 * ad + dd).clamp_min(0)
    norm_a, norm_b = aa.sqrt(), bb.sqrt()
    norm_sum = norm_a + norm_b
    delta_norm = torch.where(norm_sum > 0, (2 * ad + dd) / norm_sum, torch.zeros_like(aa))
    valid = (norm_a > 0) & (norm_b > 0)
    one_minus_cos = ((dd - delta_norm**2) / (2 * norm_a * norm_b))[valid].clamp(0, 2)
    n_valid = int(valid.sum())
    return DecompositionChange(
        delta_m=float(delta_norm.abs().mean()),
        delta_d=float(one_minus_cos.mean()) if n_valid else float("nan"),
        n_vectors=int(aa.numel()),
        zero_norm_vectors=int(aa.numel() - n_valid),
    )


def decomposition_change(
    w0: torch.Tensor, wt: torch.Tensor, axis: str = "out", transposed: bool = False
) -> DecompositionChange:
    """ΔM and ΔD of ``wt`` against ``w0`` (any float dtypes, same shape).

    ``transposed`` marks weights stored as (in, out), e.g. GPT-2 ``Conv1D``.
    """
    if w0.shape != wt.shape:
        raise ValueError(f"shape mismatch: {tuple(w0.shape)} vs {tuple(wt.shape)}")
    return change_from_sums(
        *vector_sums(as_out_in(w0, transposed), as_out_in(wt, transposed), axis)
    )
