"""The whole float tensor behind a parameter of a model being trained.

A live parameter is not always a plain tensor:

* **bitsandbytes 4-bit** (``Params4bit``, QLoRA): the data is packed (shape ``[n/2, 1]``,
  ``uint8``) and its ``quant_state`` holds the logical shape, block absmax (itself quantized
  under double quantization) and the nf4/fp4 code. The weight the layer computes with is
  ``bitsandbytes.functional.dequantize_4bit(data, quant_state)``, the call PEFT's
  ``dequantize_bnb_weight`` makes when it merges a LoRA into such a layer
  (``peft/utils/integrations.py``).
* **bitsandbytes 8-bit** (``Int8Params`` of ``Linear8bitLt``): ``int8`` rows with one scale
  per row (``SCB``, on the parameter or on the layer's ``state``); PEFT dequantizes with
  ``bitsandbytes.functional.int8_vectorwise_dequant(data, SCB)`` (``row * SCB / 127``).
* **FSDP2** (``DTensor``, also what accelerate's FSDP2 makes): each rank holds a shard;
  ``full_tensor()`` all-gathers it, so every rank must make the same calls in the same order.
* **DeepSpeed ZeRO-3**: each rank holds a flat piece and the parameter an empty
  placeholder (``ds_shape`` is the real shape); ``deepspeed.zero.GatheredParameters``
  gathers it, collectively too.

:func:`materialize` returns that tensor; :func:`logical_shape` the shape a model's config
gives it, without gathering or dequantizing anything.
"""

from __future__ import annotations

import torch

__all__ = ["is_sharded", "logical_shape", "materialize", "quantization"]


def _is_dtensor(tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch built without distributed
        return False
    return isinstance(tensor, DTensor)


def _is_zero3(tensor) -> bool:
    return hasattr(tensor, "ds_id") and hasattr(tensor, "ds_shape")


def is_sharded(tensor) -> bool:
    """Whether reading ``tensor`` whole is a collective call (FSDP2 or ZeRO-3)."""
    return _is_dtensor(tensor) or _is_zero3(tensor)


def _bnb_kind(tensor) -> str | None:
    # by class name, as PEFT's get_bnb_param_type does: bitsandbytes stays optional
    name = type(tensor).__name__
    if name == "Params4bit" and getattr(tensor, "quant_state", None) is not None:
        return "4bit"
    if name == "Int8Params" and tensor.dtype == torch.int8:
        return "8bit"
    return None


def quantization(tensor) -> str | None:
    """A few words naming the quantization of ``tensor`` (``None``: not quantized)."""
    kind = _bnb_kind(tensor)
    if kind == "8bit":
        return "bitsandbytes int8 (LLM.int8 row-wise)"
    if kind == "4bit":
        state = tensor.quant_state
        double = " with double quantization" if getattr(state, "nested", False) else ""
        return f"bitsandbytes 4-bit {state.quant_type}{double}, block size {state.blocksize}"
    return None


def logical_shape(tensor) -> tuple[int, ...]:
    """The shape of the weight ``tensor`` stands for (not its packed or sharded storage)."""
    if _bnb_kind(tensor) == "4bit":
        return tuple(tensor.quant_state.shape)
    if _is_zero3(tensor):
        return tuple(tensor.ds_shape)
    return tuple(tensor.shape)


def materialize(tensor, owner=None) -> torch.Tensor:
    """The whole float weight behind ``tensor``, detached; the tensor itself when plain.

    ``owner``: the module holding ``tensor`` (an 8-bit layer keeps its row scales on
    ``owner.state.SCB`` once it has run). Sharded tensors are gathered collectively.
    """
    kind = _bnb_kind(tensor)
    if kind is not None:
        import bitsandbytes.functional as bnbf

        with torch.no_grad():
            if kind == "4bit":
                return bnbf.dequantize_4bit(tensor.data, tensor.quant_state)
            scales = getattr(tensor, "SCB", None)
            state = getattr(owner, "state", None)
            if scales is None and state is not None:
                scales = state.SCB
            if scales is None:
                raise ValueError("an 8-bit weight without its row scales (SCB)")
            return bnbf.int8_vectorwise_dequant(tensor.data, scales.to(tensor.device))
    if _is_dtensor(tensor):
        with torch.no_grad():
            return tensor.detach().full_tensor()
    if _is_zero3(tensor):
        import deepspeed  # present whenever a ZeRO-3 parameter is

        with deepspeed.zero.GatheredParameters([tensor], modifier_rank=None):
            return tensor.detach().clone()
    return tensor.detach()
