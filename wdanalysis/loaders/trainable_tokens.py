"""PEFT's trainable tokens (``LoraConfig(trainable_token_indices=…)``, PEFT ≥ 0.15).

Beside its LoRA factors, such an adapter trains chosen rows of an embedding table (new
special tokens, say). It saves ``<embedding>.token_adapter.trainable_tokens_delta``, of
shape ``(n_tokens, dim)``, and despite the name these are the rows' new *values*: PEFT's
merge is ``W.index_copy(0, indices, delta)``. The indices are in the adapter config: a list
(for the model's input embedding) or a mapping from module names to lists.
"""

from __future__ import annotations

from pathlib import Path

import torch

from wdanalysis.errors import AdapterMismatchError, CheckpointFormatError

SUFFIX = ".token_adapter.trainable_tokens_delta"


def token_module(key: str) -> str | None:
    """The embedding's module path for a trainable-tokens key, else ``None``."""
    if key.endswith(SUFFIX):
        return key[: -len(SUFFIX)]
    head, dot, _adapter_name = key.rpartition(".")  # a live state dict: ``….delta.default``
    return head[: -len(SUFFIX)] if dot and head.endswith(SUFFIX) else None


def indices_for(module: str, raw: dict, where: Path) -> tuple[int, ...]:
    """The token indices the config gives for ``module``."""
    given = raw.get("trainable_token_indices")
    if isinstance(given, dict):
        leaf_matches = [v for k, v in given.items() if module == k or module.endswith("." + k)]
        given = leaf_matches[0] if len(leaf_matches) == 1 else None
    if not (isinstance(given, list) and all(isinstance(i, int) for i in given) and given):
        raise CheckpointFormatError(
            f"the adapter trains tokens of {module!r} but its config gives no "
            "trainable_token_indices for it",
            where,
            "copy the adapter_config.json PEFT saved beside the weights",
        )
    return tuple(given)


def check_rows(module: str, indices, rows_shape, table_shape, where: Path) -> None:
    if len(table_shape) != 2 or tuple(rows_shape) != (len(indices), table_shape[1]):
        raise AdapterMismatchError(
            f"{module}: trainable tokens {list(rows_shape)} for {len(indices)} indices do not "
            f"fit the embedding table {list(table_shape)}",
            where,
            "pass the base model this adapter was trained on",
        )
    if max(indices) >= table_shape[0] or min(indices) < -table_shape[0]:
        raise AdapterMismatchError(
            f"{module}: token index {max(indices)} is outside the table of "
            f"{table_shape[0]} tokens (a vocabulary resized after the base was saved?)",
            where,
            "pass the resized base model the adapter was trained on",
        )


def with_rows(w0: torch.Tensor, indices, rows: torch.Tensor) -> torch.Tensor:
    """PEFT's merge: the table with the trained rows written in, in float64."""
    index = torch.tensor(indices, dtype=torch.long)
    return w0.to(torch.float64).index_copy(0, index, rows.to(torch.float64))
