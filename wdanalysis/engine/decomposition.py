"""Magnitude and direction change of one weight matrix (DoRA paper, Eqs. 2-4).

``W = m · V/‖V‖`` with ``m = ‖W‖`` taken per output feature (one value per row of an
``nn.Linear`` weight, as every DoRA implementation stores it) or, optionally, per input
feature. For a checkpoint ``W_t`` against the base ``W_0``:

* ``ΔM = mean_n |m_t[n] − m_0[n]|``
* ``ΔD = mean_n (1 − cos(W_t[n], W_0[n]))``

``1 − cos`` is computed without cancellation from the update ``d = W_t − W_0``:
``‖d‖² − (‖b‖ − ‖a‖)² = 2(‖a‖‖b‖ − a·b)``, so ``1 − cos = (‖d‖² − Δm²) / (2‖a‖‖b‖)``
with ``Δm = (2a·d + ‖d‖²)/(‖a‖ + ‖b‖)``. Every sum is accumulated in float64, in row
chunks, so a true ΔD of 1e-8 comes out right and memory stays bounded. Two backends give
the same float64 arithmetic: ``"torch"`` (chunked torch ops, any device; the reference) and
``"fused"`` (:mod:`wdanalysis.engine.c_kernel`, one pass over the stored bf16/fp16/fp32
values, CPU).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from wdanalysis.engine import c_kernel as kernel

AXES = ("out", "in")
ROW_CHUNK_ELEMENTS = 1 << 22  # ~32 MB of float64 per operand chunk


@dataclass(frozen=True)
class DecompositionChange:
    delta_m: float
    delta_d: float  # NaN only when every vector had zero norm (counted below)
    n_vectors: int
    zero_norm_vectors: int
    part: str | None = None  # the part of a fused weight (``q_proj``), None: the whole
    # mean_n |m_t[n] − S·m_0[n]|: ΔM less the decay's shrinkage S (``change_from_sums``);
    # NaN where S is unknown
    delta_m_learned: float = float("nan")


def as_matrix(weight: torch.Tensor) -> torch.Tensor:
    """The stored weight as a 2-D matrix: dim 0 kept, the rest flattened (conv kernels)."""
    return weight.reshape(weight.shape[0], -1) if weight.dim() >= 2 else weight.reshape(-1, 1)


def vector_mode(axis: str, transposed: bool) -> str:
    """Whether the vectors of ``axis`` are the rows or the columns of the *stored* matrix."""
    if axis not in AXES:
        raise ValueError(f"axis must be one of {AXES}, got {axis!r}")
    return "rows" if (axis == "out") != transposed else "cols"


def accumulate_sums(
    a: torch.Tensor,
    b: torch.Tensor,
    sums: torch.Tensor,
    mode: str,
    diff: bool = True,
    backend: str = "auto",
) -> str:
    """Add ``Σa², Σa·d, Σd²`` of one block of rows into ``sums`` (float64, shape (3, n)).

    ``a``: a block of rows of the base matrix (any float dtype, 2-D). ``b``: the same rows
    of the new weight (``diff=True``, ``d = b − a`` formed in float64) or the float64 update
    ``d`` itself (``diff=False``). ``mode`` ``"rows"``: one vector per row, ``sums`` has
    ``a.shape[0]`` columns; ``"cols"``: one per column, ``a.shape[1]`` columns.
    ``backend``: ``"fused"`` (compiled one-pass kernel, CPU), ``"torch"`` (float64 torch
    ops in chunks, any device: the reference) or ``"auto"`` (fused when it applies).
    Returns the backend that ran (``"fused"`` or ``"torch"``). Shapes, devices and the
    sums are checked first, whichever backend runs.
    """
    check_block(a, b, sums, mode)
    if backend != "torch" and a.device.type == "cpu":
        fused = kernel.load()
        if fused is not None and _fused_ok(fused, a, b, diff):
            fused.accumulate(a, b, sums[0], sums[1], sums[2], mode, diff)
            return "fused"
        if backend == "fused" and fused is None:
            raise RuntimeError(f"the fused kernel is unavailable: {kernel.describe()}")
        if fused is not None and a.is_floating_point():
            common = torch.promote_types(a.dtype, b.dtype) if diff else a.dtype
            if common not in fused.dtypes:
                common = torch.float32 if common.itemsize <= 4 else torch.float64
            if common in fused.dtypes and (diff or b.dtype == torch.float64):
                a = a.to(common).contiguous()
                b = b.to(common).contiguous() if diff else b.contiguous()
                fused.accumulate(a, b, sums[0], sums[1], sums[2], mode, diff)
                return "fused"
    _accumulate_torch(a, b, sums, mode, diff)
    return "torch"


def check_block(a: torch.Tensor, b: torch.Tensor, sums: torch.Tensor, mode: str) -> None:
    """The checks every backend needs: one 2-D shape, one device, sums of the right size."""
    if mode not in ("rows", "cols"):
        raise ValueError(f"mode must be 'rows' or 'cols', got {mode!r}")
    if a.dim() != 2 or b.shape != a.shape:
        raise ValueError(
            f"a base block and its checkpoint block must be 2-D of one shape, got "
            f"{tuple(a.shape)} and {tuple(b.shape)}"
        )
    if b.device != a.device or sums.device != a.device:
        raise ValueError(
            f"blocks and sums must be on one device, got {a.device}, {b.device}, {sums.device}"
        )
    size = a.shape[0] if mode == "rows" else a.shape[1]
    if sums.dtype != torch.float64 or tuple(sums.shape) != (3, size):
        raise ValueError(
            f"sums must be float64 of shape (3, {size}), got {sums.dtype} {tuple(sums.shape)}"
        )
    if not (a.is_floating_point() and b.is_floating_point()):
        raise ValueError(f"blocks must be floating point, got {a.dtype} and {b.dtype}")


def _fused_ok(fused, a: torch.Tensor, b: torch.Tensor, diff: bool) -> bool:
    if a.dim() != 2 or b.shape != a.shape or not fused.supports(a.dtype):
        return False
    if diff and b.dtype != a.dtype:
        return False
    if not diff and b.dtype != torch.float64:
        return False
    return (a.shape[1] <= 1 or (a.stride(1) == 1 and b.stride(1) == 1)) and b.device == a.device


def _accumulate_torch(a, b, sums, mode: str, diff: bool) -> None:
    rows = max(1, ROW_CHUNK_ELEMENTS // max(a.shape[1], 1))
    for start in range(0, a.shape[0], rows):
        x = a[start : start + rows].to(torch.float64)
        d = b[start : start + rows].to(torch.float64)
        if diff:
            d = d - x
        if mode == "rows":
            target = sums[:, start : start + rows]
            target[0] += (x * x).sum(dim=1)
            target[1] += (x * d).sum(dim=1)
            target[2] += (d * d).sum(dim=1)
        else:
            sums[0] += (x * x).sum(dim=0)
            sums[1] += (x * d).sum(dim=0)
            sums[2] += (d * d).sum(dim=0)


def matrix_sums(
    w0: torch.Tensor, wt: torch.Tensor, mode: str, backend: str = "auto"
) -> torch.Tensor:
    """``Σa², Σa·d, Σd²`` (float64, shape (3, n)) of two whole matrices in stored layout."""
    a, b = as_matrix(w0), as_matrix(wt).contiguous()
    size = a.shape[0] if mode == "rows" else a.shape[1]
    sums = torch.zeros(3, size, dtype=torch.float64, device=a.device)
    accumulate_sums(a, b, sums, mode, True, backend)
    return sums


def change_from_sums(
    aa: torch.Tensor,
    ad: torch.Tensor,
    dd: torch.Tensor,
    new_norm: torch.Tensor | None = None,
    shrink: float | None = None,
) -> DecompositionChange:
    """ΔM and ΔD from the per-vector sums (see module docstring for the algebra).

    ``new_norm``: the new vectors' norms when they are known exactly (a DoRA merge rescales
    row n to norm ``|m[n]|``), signed like ``m``; the sums then describe the direction
    update only (``d = s·B@A``, cosine being scale-free) and a negative ``m`` flips the row.
    ``shrink``: the factor ``S`` decoupled weight decay applied to the weight (or to DoRA's
    ``m``) so far; ``delta_m_learned = mean_n |m_t[n] − S·m_0[n]|``, formed as
    ``(m_t − m_0) + (1 − S)·m_0`` so that ``S = 1`` gives ΔM exactly. ``None``: NaN.
    """
    aa, ad, dd = (t.detach().to("cpu", torch.float64) for t in (aa, ad, dd))
    bb = (aa + 2 * ad + dd).clamp_min(0)
    norm_a, norm_b = aa.sqrt(), bb.sqrt()
    norm_sum = norm_a + norm_b
    delta_norm = torch.where(norm_sum > 0, (2 * ad + dd) / norm_sum, torch.zeros_like(aa))
    valid = (norm_a > 0) & (norm_b > 0)
    one_minus_cos = (dd - delta_norm**2) / (2 * norm_a * norm_b)
    if new_norm is not None:
        m = new_norm.detach().to("cpu", torch.float64).reshape(-1)
        m = torch.where(norm_b > 0, m, torch.zeros_like(m))  # a zero row of V stays zero
        one_minus_cos = torch.where(m < 0, 2 - one_minus_cos, one_minus_cos)
        delta_norm = m.abs() - norm_a
        valid = valid & (m != 0)
    one_minus_cos = one_minus_cos[valid].clamp(0, 2)
    n_valid = int(valid.sum())
    learned = float("nan")
    if shrink is not None:
        learned = float((delta_norm + (1.0 - float(shrink)) * norm_a).abs().mean())
    return DecompositionChange(
        delta_m=float(delta_norm.abs().mean()),
        delta_d=float(one_minus_cos.mean()) if n_valid else float("nan"),
        n_vectors=int(aa.numel()),
        zero_norm_vectors=int(aa.numel() - n_valid),
        delta_m_learned=learned,
    )


def decomposition_change(
    w0: torch.Tensor,
    wt: torch.Tensor,
    axis: str = "out",
    transposed: bool = False,
    backend: str = "auto",
) -> DecompositionChange:
    """ΔM and ΔD of ``wt`` against ``w0`` (any float dtypes, same shape).

    ``transposed`` marks weights stored as (in, out), e.g. GPT-2 ``Conv1D``. ``backend``:
    ``"torch"`` forces the float64 reference path; ``"auto"`` uses the fused kernel on CPU
    when it is available (same float64 arithmetic, one pass).
    """
    if w0.shape != wt.shape:
        raise ValueError(f"shape mismatch: {tuple(w0.shape)} vs {tuple(wt.shape)}")
    return change_from_sums(*matrix_sums(w0, wt, vector_mode(axis, transposed), backend))
