"""The sums of a LoRA/DoRA update without forming it: ``Σa·d`` from an r-dimensional
projection of the base rows, ``Σd²`` from the factors alone.

In stored layout an adapter's update is low rank, ``D = L @ R`` with ``L`` (stored rows, r)
and ``R`` (r, stored columns): ``L = s·B, R = A`` for an ``nn.Linear`` weight, ``L = Aᵀ,
R = (s·B)ᵀ`` for one stored (in, out) (GPT-2 ``Conv1D``). Forming ``d = L[rows] @ R`` in
float64 for every block (what the engine did) costs r multiply-adds per value *and* writes
and re-reads 8 bytes per value; the sums need much less:

* one vector per stored row ``n`` (``"rows"``): ``a_n·d_n = (a_n Rᵀ)·L[n]``, the
  projection ``a @ Rᵀ`` being the only pass over the weight (the C kernel's ``wd_proj``,
  r multiply-adds per value, nothing written back); ``‖d_n‖ = ‖L[n] Tᵀ‖`` with
  ``Rᵀ = Q T`` (QR), r² per row, computed once per weight.
* one vector per stored column ``j`` (``"cols"``): ``a_j·d_j = (Σ_rows a[i, j] L[i])·R[:, j]``
  accumulated block by block (``aᵀ @ L[rows]``), and ``‖d_j‖ = ‖T R[:, j]‖`` with ``L = Q T``.

Both are exact rewritings evaluated in float64: the QR keeps ``‖d‖²`` as accurate as
forming ``d`` (no squared condition number, unlike the Gram form ``B (A Aᵀ) Bᵀ``), and
``a·d`` is a float64 dot product of exactly stored values. ``Σa²`` is the base's own,
taken from the base's sums when the weight is finished. DoRA on the output axis uses the
same sums (its ΔD is that of ``V = W0 + s·B@A``); DoRA on the input axis needs each row's
``‖V‖`` and keeps the formed update (:func:`formed_update`).
"""

from __future__ import annotations

import numpy as np
import torch

from wdanalysis.engine import c_kernel as kernel
from wdanalysis.engine.jobs import AdapterJob

TORCH_CHUNK_ELEMENTS = 1 << 20  # base values widened to float64 at a time (torch path)
FORMED_CHUNK_ELEMENTS = 1 << 20  # float64 update values formed at a time (8 MB)


class LowRankSums:
    """``Σa·d`` and ``Σd²`` of one adapted weight's update ``L @ R`` (see module docstring)."""

    def __init__(self, left: torch.Tensor, right: torch.Tensor, mode: str):
        self.mode = mode
        self.left, self.right = left, right  # float64 (rows, r), (r, cols)
        anchor = right.T if mode == "rows" else left  # its column space is d's
        tri = torch.linalg.qr(anchor, mode="r")[1]  # anchor = Q·tri, Q orthonormal
        if mode == "rows":
            self.dd = (left @ tri.T).square().sum(dim=1)
            self.directions = right.T.contiguous()  # (cols, r): a @ directions
            self.projected = None
        else:
            self.dd = (tri @ right).square().sum(dim=0)
            self.directions = None
            self.projected = torch.zeros_like(right.T)  # (cols, r): Σ a[i, j]·L[i]
        self._packed = None

    def add_block(self, a: torch.Tensor, start: int, sums: torch.Tensor) -> str:
        """Add ``Σa·d`` of the stored rows ``start:start+len(a)`` into ``sums[1]``;
        returns the backend that ran (``"fused"`` or ``"torch"``)."""
        rows = slice(start, start + a.shape[0])
        if self.mode == "cols":
            for s in range(0, a.shape[0], _chunk(a)):
                x = a[s : s + _chunk(a)].to(torch.float64)
                self.projected += x.T @ self.left[rows][s : s + x.shape[0]]
            return "torch"
        projected, used = self._project(a)
        if projected.device.type == "cpu":  # numpy: torch would start its thread pool
            ad = np.einsum("ij,ij->i", projected.numpy(), self.left[rows].numpy())
            sums[1, rows] += torch.from_numpy(ad)
        else:
            sums[1, rows] += (projected * self.left[rows]).sum(dim=1)
        return used

    def finish(self, sums: torch.Tensor, base_aa: torch.Tensor) -> None:
        """Complete ``sums`` (3, vectors): ``Σa²`` from the base, ``Σd²`` from the factors."""
        sums[0] = base_aa
        sums[2] = self.dd
        if self.mode == "cols":
            sums[1] += (self.projected * self.right.T).sum(dim=1)

    def _project(self, a: torch.Tensor) -> tuple[torch.Tensor, str]:
        """``a @ directions`` in float64: the C kernel on CPU, torch matmuls elsewhere."""
        fused = kernel.load() if a.device.type == "cpu" else None
        r = self.directions.shape[1]
        if fused is not None and fused.supports(a.dtype) and _rows_contiguous(a):
            if self._packed is None:
                self._packed = kernel.pack_directions(self.directions)
            # numpy's zeros: a per-block torch fill would wake torch's thread pool, whose
            # spinning cost more than the projection itself on a busy 2-core machine
            out = torch.from_numpy(np.zeros((a.shape[0], self._packed.shape[0] * 8)))
            fused.project(a, self._packed, out)
            return out[:, :r], "fused"
        out = torch.empty(a.shape[0], r, dtype=torch.float64, device=a.device)
        for s in range(0, a.shape[0], _chunk(a)):
            x = a[s : s + _chunk(a)]
            out[s : s + x.shape[0]] = x.to(torch.float64) @ self.directions
        return out, "torch"


def low_rank(factors, transposed: bool, mode: str) -> LowRankSums | None:
    """The sums of an adapter job's update, or ``None`` where it has no ``B@A`` part."""
    lora_a, lora_b, _ = factors
    if lora_b is None:
        return None
    left, right = (lora_a.T, lora_b.T) if transposed else (lora_b, lora_a)
    return LowRankSums(left, right, mode)


def plan(job: AdapterJob, axis: str, mode: str, transposed: bool) -> None:
    """Sums from the factors unless the update must be formed: DoRA on the input axis
    (each row's ``‖V‖``), or a fused weight's parts on the input axis (3-D sums)."""
    job.formed = (job.dora and axis == "in") or job.sums.dim() == 3
    if not job.formed:
        job.low_rank = low_rank(job.factors, transposed, mode)


def add_block(job: AdapterJob, a, start: int, axis: str, transposed: bool, accumulate) -> set:
    """Add the stored rows ``start:start+len(a)`` of an adapted weight into ``job.sums``;
    returns the backends that ran. ``accumulate(rows, d, first)`` adds the sums of a formed
    float64 update ``d`` of stored rows ``first:first+len(rows)`` (the formed path)."""
    if not job.formed:  # low_rank None: magnitude only, d = 0
        return set() if job.low_rank is None else {job.low_rank.add_block(a, start, job.sums)}
    m, n, cols = job.factors[2], a.shape[0], a.shape[1]
    step = max(1, FORMED_CHUNK_ELEMENTS // max(cols, 1))
    for s in range(0, n, step):
        e = min(n, s + step)
        rows = slice(start + s, start + e)
        d = formed_update(job.factors, rows, transposed, cols, a)
        if job.dora and axis == "in":
            # axis "in" with output rows stored as rows: W' − W0 = (c−1)·a + c·u,
            # c = m/‖V‖ per row, (c−1) = (m − ‖V‖)/‖V‖ formed without cancellation.
            x = a[s:e].to(torch.float64)
            norm_v = torch.linalg.vector_norm(x + d, dim=1)
            safe = torch.where(norm_v > 0, norm_v, torch.ones_like(norm_v))
            c = m[rows] / safe
            d = d * c[:, None] + x * ((m[rows] - norm_v) / safe)[:, None]
        accumulate(a[s:e], d.contiguous(), start + s)
    return set()


def complete(job: AdapterJob, base_sums: torch.Tensor) -> None:
    """``Σa²`` from the base's sums, and the factors' ``Σa·d, Σd²`` (not the formed path)."""
    if job.low_rank is None:
        job.sums[0] = base_sums[0]
    else:
        job.low_rank.finish(job.sums, base_sums[0])


def formed_update(factors, rows: slice, transposed: bool, n_cols: int, like: torch.Tensor):
    """The update ``d`` of stored ``rows``, formed in float64 (zeros: magnitude only)."""
    lora_a, lora_b, _ = factors
    if lora_b is None:  # magnitude only (DoRA authors' Wdecompose modules)
        n = rows.stop - rows.start
        return torch.zeros(n, n_cols, dtype=torch.float64, device=like.device)
    if transposed:  # stored (in, out): rows are input features
        return lora_a[:, rows].T @ lora_b.T
    return lora_b[rows] @ lora_a


def _chunk(a: torch.Tensor) -> int:
    return max(1, TORCH_CHUNK_ELEMENTS // max(a.shape[1], 1))


def _rows_contiguous(a: torch.Tensor) -> bool:
    return a.dim() == 2 and (a.shape[1] <= 1 or a.stride(1) == 1) and a.stride(0) >= a.shape[1]
