"""Binding: each checkpoint's keys matched to the selected base weights, with the checks
that a checkpoint and its base come from the same model and hold float weights."""

from __future__ import annotations

from wdanalysis.errors import AdapterMismatchError, NumericalError
from wdanalysis.loaders.key_alignment import KeyAligner
from wdanalysis.loaders.runs import (
    AdapterCheckpoint,
    FullModel,
    is_float,
    refuse_quantized,
    refuse_unreadable,
)
from wdanalysis.weights.bound_checkpoint import BoundCheckpoint, vocabulary_rows_added


def check_base_dtypes(base: FullModel, selected: list[str]) -> None:
    for key in selected:
        refuse_unreadable(base.store, key)
        if not is_float(base.store.dtype(key)):
            raise NumericalError(
                f"weight {key!r} has dtype {_dtype_name(base.store.dtype(key))}; quantized or "
                "integer weights are not supported",
                base.store.infos[key].file,
                "analyse the unquantized (fp32/fp16/bf16) model",
            )


def _dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")


def bind(run, ckpt, shapes, selected, aligner: KeyAligner, transposed):
    if isinstance(ckpt, AdapterCheckpoint):
        keys = ckpt.adapter.bind(aligner, shapes, transposed)
        added = {
            key: n
            for key, module in keys.items()
            if module.replacement and not (module.lora_b or module.magnitude)
            for n in [vocabulary_rows_added(key, shapes[key], _saved_shape(ckpt, module))]
            if n
        }
    else:
        keys = _bind_full(ckpt, selected, aligner, shapes)
        added = {
            key: n
            for key in selected
            for n in [vocabulary_rows_added(key, shapes[key], ckpt.store.shape(keys[key]))]
            if n
        }
    return BoundCheckpoint(run, ckpt, ckpt.method, keys, added)


def _saved_shape(ckpt: AdapterCheckpoint, module) -> tuple[int, ...]:
    return tuple(ckpt.adapter.store.shape(module.replacement))


def _bind_full(ckpt: FullModel, selected, aligner: KeyAligner, shapes) -> dict:
    refuse_quantized(ckpt.store, "checkpoint")
    mapping = aligner.map_keys(ckpt.store.keys())
    missing = [key for key in selected if key not in mapping]
    if missing:
        raise AdapterMismatchError(
            f"checkpoint lacks {len(missing)} of the {len(selected)} selected weights, "
            f"e.g. {missing[0]!r}: base and checkpoint come from different models",
            ckpt.store.path,
            "pass the base model this run was fine-tuned from",
        )
    for key in selected:
        refuse_unreadable(ckpt.store, mapping[key])
        shape = ckpt.store.shape(mapping[key])
        if shape != tuple(shapes[key]) and not vocabulary_rows_added(key, shapes[key], shape):
            raise AdapterMismatchError(
                f"weight {mapping[key]!r} has shape {list(ckpt.store.shape(mapping[key]))} "
                f"but the base has {list(shapes[key])}: base and checkpoint come from "
                "different models",
                ckpt.store.path,
                "pass the base model this run was fine-tuned from",
            )
        if not is_float(ckpt.store.dtype(mapping[key])):
            raise NumericalError(
                f"weight {mapping[key]!r} has dtype {_dtype_name(ckpt.store.dtype(mapping[key]))}; "
                "quantized or integer weights are not supported",
                ckpt.store.infos[mapping[key]].file,
                "analyse an unquantized (fp32/fp16/bf16) checkpoint",
            )
    return {key: mapping[key] for key in selected}
