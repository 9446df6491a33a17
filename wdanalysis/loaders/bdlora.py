"""BD-LoRA (``LoraConfig(use_bdlora=BdLoraConfig(…))``, PEFT ≥ 0.19): block-diagonal factors.

For sharded multi-LoRA serving, BD-LoRA makes ``lora_A`` block-diagonal on the modules that
match ``target_modules_bd_a`` and ``lora_B`` on those that match ``target_modules_bd_b``
(PEFT's ``pattern in target_name``, the module's full name). PEFT's ``BlockDiagonalLinear``
saves only the ``nblocks`` diagonal blocks stacked along dim 0 — ``lora_A`` as
``(r, in/nblocks)``, ``lora_B`` as ``(out, r/nblocks)`` — and merges ``s·B@A`` with the full
factor ``block_diag(*chunk(weight, nblocks, dim=0))``
(``BlockDiagonalLinear.weight_as_blockdiagonal_matrix`` in ``peft/tuners/lora/variants.py``).
"""

from __future__ import annotations

from pathlib import Path

import torch

from wdanalysis.errors import CheckpointFormatError

Blocks = tuple[str, int]  # ("A" or "B", nblocks)


def blocks_for(module: str, raw: dict, where: Path) -> Blocks | None:
    """Which factor of ``module`` BD-LoRA saved block-diagonal, and in how many blocks."""
    config = raw.get("use_bdlora")
    if not config:
        return None
    if not isinstance(config, dict):
        raise CheckpointFormatError(
            f"use_bdlora must be an object, got {config!r}", where, "re-save the adapter with PEFT"
        )
    nblocks = config.get("nblocks", 1)
    if not (isinstance(nblocks, int) and not isinstance(nblocks, bool) and nblocks > 0):
        raise CheckpointFormatError(
            f"use_bdlora.nblocks must be a positive integer, got {nblocks!r}",
            where,
            "re-save the adapter with PEFT",
        )
    patterns = [config.get(f"target_modules_bd_{side}") or [] for side in "ab"]
    if not all(isinstance(p, list) and all(isinstance(x, str) for x in p) for p in patterns):
        raise CheckpointFormatError(
            f"use_bdlora.target_modules_bd_a/_b must be lists of names, got {patterns!r}",
            where,
            "re-save the adapter with PEFT",
        )
    on_a, on_b = (any(p in module for p in found) for found in patterns)
    if on_a and on_b:
        raise CheckpointFormatError(
            f"{module} matches both target_modules_bd_a and target_modules_bd_b of use_bdlora",
            where,
            "re-save the adapter with PEFT, which refuses that",
        )
    if not (on_a or on_b):
        return None  # match_strict=False: a plain LoRA module
    return ("A" if on_a else "B", nblocks)


def full_shapes(blocks: Blocks | None, a_shape, b_shape) -> tuple[tuple, tuple]:
    """The shapes of the full factors, from the stored ones."""
    if blocks is None:
        return tuple(a_shape), tuple(b_shape)
    side, n = blocks
    stacked = a_shape if side == "A" else b_shape
    if len(stacked) != 2 or stacked[0] % n:
        return tuple(a_shape), tuple(b_shape)  # not BD-LoRA's blocks: check_factors says why
    if side == "A":
        return (a_shape[0], a_shape[1] * n), tuple(b_shape)
    return tuple(a_shape), (b_shape[0], b_shape[1] * n)


def full_factors(blocks: Blocks | None, a: torch.Tensor, b: torch.Tensor):
    """``(A, B)`` with the block-diagonal one expanded as PEFT's merge expands it."""
    if blocks is None:
        return a, b
    side, n = blocks
    if side == "A":
        return torch.block_diag(*torch.chunk(a, n, dim=0)), b
    return a, torch.block_diag(*torch.chunk(b, n, dim=0))
