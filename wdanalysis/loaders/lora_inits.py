"""LoRA inits that change the base weight: PiSSA, OLoRA and KaSA, rebuilt from ``W0``.

PEFT (``peft/tuners/lora/layer.py``, ``variants.py``) trains these on a modified base:

* PiSSA (``init_lora_weights="pissa"``, ``LoraLayer.pissa_init``): a full SVD of ``W0`` in
  float32, ``W0 = V S Uᴴ``; ``A₀ = diag(√(S_r/s)) Uᴴ_r``, ``B₀ = V_r diag(√(S_r/s))``, base
  ``W0 − s·B₀A₀`` (``W0`` as (out, in), i.e. transposed first for ``fan_in_fan_out``);
* OLoRA (``"olora"``, ``LoraLayer.olora_init``): a QR of ``W0`` in float32,
  ``B₀ = Q[:, :r]``, ``A₀ = R[:r]``, base ``W0 − s·B₀A₀``;
* KaSA (``kasa_config``, ``KasaLinearVariant``): a full SVD of ``W0`` in float32 drops its
  ``r`` smallest singular components (the base becomes ``W0 − T``, ``T = U_t S_t Vᴴ_t``),
  and the update is ``s·B·diag(lora_diag)·A``.

The merged weight is therefore ``W0 − s·B₀A₀ + s·B'A'`` (KaSA: ``W0 − T + s·B'·diag·A'``),
so the change a checkpoint made against the original base is ``s·(B'A' − B₀A₀)`` (KaSA:
``s·B'·diag·A' − T``). Both ``B₀A₀`` (``= P_r W0``, the rank-r SVD truncation or the
projection on the span of the first r columns) and ``T`` are products that do not depend on
the sign choices of the SVD or QR, so recomputing them from ``W0`` the way PEFT does (same
factorisation, same float32 input) gives PEFT's initial values. Embedding layers are left
alone by PEFT's PiSSA/OLoRA (their LoRA is zero-initialised), so only 2-D weights change.

The rounding of PEFT's residual base to the model's dtype (bf16, say) is not a change the
training made and is not counted: at step 0 the change is exactly zero. That holds where
the init is recomputed as PEFT computed it: MKL's float32 SVD and QR round differently with
another number of threads (a few 1e-7 of ``B₀A₀``), so the recomputation runs under this
process's torch thread count (the engine restores the caller's for it) and bit for bit
matches a training run on the same machine with the same count; a run trained elsewhere
(other threads, a GPU) starts at a ΔM of float32 rounding (a few 1e-9 on a tiny model).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from pathlib import Path

import torch

from wdanalysis.errors import AdapterMismatchError, CheckpointFormatError

_CACHE_SIZE = 8  # the engine is weight-major: every checkpoint of one weight comes in a row
_cache: OrderedDict[tuple, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()


def bind_init(module, base_init: str | None, shape, store, where: Path) -> None:
    """Mark ``module`` (a :class:`~wdanalysis.loaders.peft_adapter.AdapterModule` bound to a
    base weight of ``shape``) as merged onto a changed base where PEFT's init changed it."""
    if base_init is None or not module.lora_b:
        return
    name = {"pissa": "PiSSA", "olora": "OLoRA", "kasa": "KaSA"}[base_init]
    if module.embedding and base_init != "kasa":
        return  # PEFT zero-initialises embedding LoRA whatever init_lora_weights says
    if module.embedding or len(shape) != 2:
        raise CheckpointFormatError(
            f"{module.name}: a {name} adapter on a {'embedding' if module.embedding else 'conv'} "
            f"layer {list(shape)}, which PEFT's {name} init does not write",
            where,
            "re-save the adapter with PEFT",
        )
    if base_init == "kasa":
        rank = module.rank or 0
        if not module.diag or tuple(store.shape(module.diag)) != (rank,):
            found = list(store.shape(module.diag)) if module.diag else "none"
            raise AdapterMismatchError(
                f"{module.name}: KaSA needs lora_diag of shape [{rank}], found {found}",
                where,
                "the adapter file is incomplete; re-save it with PEFT",
            )
        dtype = store.dtype(module.diag)
        if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise AdapterMismatchError(
                f"{module.name}: lora_diag is not floating point", where, "re-save it"
            )
        if rank >= min(shape):
            raise AdapterMismatchError(
                f"{module.name}: KaSA rank {rank} leaves nothing of the base {list(shape)}",
                where,
                "pass the base model this adapter was trained on",
            )
    module.base_init = base_init


def initial_part(kind: str, w0: torch.Tensor, rank: int, scaling: float) -> torch.Tensor:
    """What the init moved out of ``w0`` (out, in): ``s·B₀A₀`` (PiSSA, OLoRA) or the dropped
    tail ``T`` (KaSA), in float64. ``scaling`` is the module's ``s`` (alpha/r or rsLoRA)."""
    left, right = _factors(kind, w0, rank, scaling)
    return left.to(torch.float64) @ right.to(torch.float64)


def _factors(kind: str, w0: torch.Tensor, rank: int, scaling: float):
    """Two factors whose product is :func:`initial_part`, cached per weight and init."""
    weight = w0.detach().to(torch.float32).contiguous()  # PEFT factors float32 copies of W0
    digest = hashlib.blake2b(weight.numpy().tobytes(), digest_size=16).digest()
    # MKL's float32 SVD/QR round differently per thread count: PEFT's own result is the one
    # under this process's threads (the engine runs this under the caller's, not its one)
    key = (kind, rank, scaling, tuple(weight.shape), digest, torch.get_num_threads())
    if key in _cache:
        _cache.move_to_end(key)
        return _cache[key]
    if kind == "pissa":
        v, s, uh = torch.linalg.svd(weight, full_matrices=False)
        s_r = s[:rank] / scaling
        a0 = torch.diag(torch.sqrt(s_r)) @ uh[:rank]
        b0 = v[:, :rank] @ torch.diag(torch.sqrt(s_r))
        found = (scaling * b0.to(torch.float64), a0)
    elif kind == "olora":
        q, r = torch.linalg.qr(weight)
        found = (scaling * q[:, :rank].to(torch.float64), r[:rank])
    elif kind == "kasa":
        u, s, vh = torch.linalg.svd(weight, full_matrices=False)
        keep = min(weight.shape) - rank
        found = (u[:, keep:] * s[keep:], vh[keep:])
    else:
        raise ValueError(f"unknown base-changing init {kind!r}")
    _cache[key] = found
    while len(_cache) > _CACHE_SIZE:
        _cache.popitem(last=False)
    return found
