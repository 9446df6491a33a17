"""Layer types and their LoRA factors: Linear, GPT-2 ``Conv1D``, ``nn.Conv1d/2d/3d``,
``nn.Embedding``.

Every weight is analysed as a matrix of shape ``(out, in·k…)`` in the *output-rows*
convention, where one magnitude per output feature is one per row:

* ``nn.Linear`` ``(out, in)``: as stored; GPT-2 ``Conv1D`` ``(in, out)``: transposed.
* ``nn.Conv1d/2d/3d`` ``(out, in/groups, k…)``: flattened to ``(out, in·k…)``, as PEFT's
  DoRA takes its norm over every dim but 0. PEFT's conv LoRA stores ``lora_A`` as a conv
  ``(r, in, k…)`` and ``lora_B`` as a 1×… conv ``(out, r, 1…)``; its merge
  (``conv(Aᵀ, B)ᵀ``, or ``B@A`` for 1×1 kernels) is ``B.view(out, r) @ A.view(r, -1)``.
  PEFT cannot merge conv LoRA with ``groups > 1``; neither do we.
* ``nn.Embedding`` ``(num_embeddings, embedding_dim)``: PEFT treats it as ``(in, out)``
  (``in_features = num_embeddings``), keeps ``lora_embedding_A`` ``(r, num_embeddings)``,
  ``lora_embedding_B`` ``(embedding_dim, r)``, merges ``(B@A)ᵀ`` and keeps one DoRA
  magnitude per embedding dimension. So an embedding is a transposed weight: its output
  axis runs along the embedding dimension (one vector per column of the stored weight).
"""

from __future__ import annotations

import math
from pathlib import Path

from wdanalysis.errors import AdapterMismatchError

# Leaf module names of token / position embeddings in common architectures (for full
# fine-tuned checkpoints, where no adapter says which weights are embeddings).
EMBEDDING_LEAVES = {
    "embed_tokens",
    "embed_positions",
    "word_embeddings",
    "position_embeddings",
    "token_type_embeddings",
    "tok_embeddings",
    "wte",
    "wpe",
    "embed_in",
    "shared",
}


def is_embedding_name(key: str, shape) -> bool:
    """A 2-D ``.weight`` whose module is named like a token/position embedding."""
    if len(shape) != 2 or not key.endswith(".weight"):
        return False
    return key[: -len(".weight")].rsplit(".", 1)[-1] in EMBEDDING_LEAVES


def out_in(shape, transposed: bool, where: Path | None = None) -> tuple[int, int]:
    """(output features, input features × kernel) of a stored weight."""
    if len(shape) < 2:
        raise AdapterMismatchError(
            f"adapted weight has shape {list(shape)}; expected a matrix or a conv kernel", where
        )
    if len(shape) > 2:
        if transposed:
            raise AdapterMismatchError(
                f"a conv weight {list(shape)} cannot be stored (in, out)",
                where,
                "drop --fan-in-fan-out yes / fan_in_fan_out for conv layers",
            )
        return shape[0], math.prod(shape[1:])
    return (shape[1], shape[0]) if transposed else (shape[0], shape[1])


def check_factors(name: str, a_shape, b_shape, shape, transposed: bool, where: Path) -> int:
    """Check ``lora_A``/``lora_B`` shapes against the base weight; returns the rank."""
    out_features, in_features = out_in(shape, transposed, where)
    misfit = (
        f"{name}: lora_B {list(b_shape)} @ lora_A {list(a_shape)} does not fit the base "
        f"weight {list(shape)}"
    )
    other_model = "this adapter was trained on a model of another size"
    if len(shape) == 2:
        if len(a_shape) != 2 or len(b_shape) != 2:
            raise AdapterMismatchError(misfit, where, other_model)
    else:
        if len(a_shape) != len(shape) or len(b_shape) != len(shape):
            raise AdapterMismatchError(misfit, where, other_model)
        rank, per_group = a_shape[0], max(b_shape[1], 1)
        groups = rank // per_group if rank % per_group == 0 else 0
        if groups > 1 and b_shape[0] == out_features and a_shape[1] == shape[1] * groups:
            raise AdapterMismatchError(
                f"{name}: conv LoRA on a grouped convolution (lora_B {list(b_shape)}, lora_A "
                f"{list(a_shape)}); PEFT cannot merge it either",
                where,
                "leave this module out of --modules",
            )
        if any(n != 1 for n in b_shape[2:]):
            raise AdapterMismatchError(
                f"{name}: lora_B {list(b_shape)} has a kernel larger than 1; PEFT's conv LoRA "
                "uses 1×… kernels for lora_B",
                where,
                "re-save the adapter with PEFT",
            )
        if tuple(a_shape[1:]) != tuple(shape[1:]):
            raise AdapterMismatchError(misfit, where, other_model)
    rank = a_shape[0]
    if (b_shape[0], math.prod(b_shape[1:])) != (out_features, rank) or math.prod(
        a_shape[1:]
    ) != in_features:
        raise AdapterMismatchError(misfit, where, other_model)
    return rank


def factor_matrices(a, b):
    """``lora_A``, ``lora_B`` as ``(r, in·k…)`` and ``(out, r)`` matrices (views)."""
    return a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)
