"""mlx-lm references shared by the mlx tests: each adapted layer fused by mlx-lm itself."""

from __future__ import annotations

import numpy as np


def adapted_layers(model) -> list:
    """``(name, layer)`` of every mlx-lm LoRA/DoRA layer of ``model``."""
    return [(n, layer) for n, layer in model.named_modules() if hasattr(layer, "lora_b")]


def fused_in_float64(model) -> dict:
    """Each adapted layer (Linear, Embedding, SwitchLinear) fused by mlx-lm's own ``fuse``
    in float64 (factors and base cast, then put back): base key → merged weight."""
    import mlx.core as mx

    out = {}
    for name, layer in adapted_layers(model):
        inner = "embedding" if hasattr(layer, "embedding") else "linear"
        saved = {a: getattr(layer, a) for a in ("lora_a", "lora_b", "m") if hasattr(layer, a)}
        weight = getattr(layer, inner).weight
        for attr, value in saved.items():
            setattr(layer, attr, value.astype(mx.float64))
        getattr(layer, inner).weight = weight.astype(mx.float64)
        with mx.stream(mx.cpu):
            out[name + ".weight"] = np.array(layer.fuse().weight.astype(mx.float64))
        getattr(layer, inner).weight = weight
        for attr, value in saved.items():
            setattr(layer, attr, value)
    return out


def saved_weights(folder) -> dict:
    """A saved mlx base's ``model.safetensors`` as numpy arrays."""
    from safetensors.numpy import load_file

    return load_file(str(folder / "model.safetensors"))
