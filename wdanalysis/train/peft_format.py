"""Save and load adapters in PEFT's on-disk format (``adapter_config.json`` +
``adapter_model.safetensors``), so that both wdanalysis and ``PeftModel.from_pretrained``
read them.

Keys are exactly what PEFT 0.21 writes (checked against a real PEFT save in the tests):
``base_model.model.<module>.lora_A.weight`` (r, in), ``.lora_B.weight`` (out, r),
``.lora_magnitude_vector`` (out,) for DoRA, and each ``modules_to_save`` module's own
parameters under ``base_model.model.<module>.<param>``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from wdanalysis.errors import AdapterMismatchError, CheckpointFormatError
from wdanalysis.storage.atomic_write import atomic_path, write_text_atomic
from wdanalysis.train.inject import AdapterSpec, adapter_layers, find_modules, unwrap_key

PREFIX = "base_model.model."
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
ADAPTER_SUFFIXES = (".lora_A.weight", ".lora_B.weight", ".lora_magnitude_vector")
TASK_TYPES = {"classification": "SEQ_CLS", "causal-lm": "CAUSAL_LM"}


def adapter_state_dict(
    model: nn.Module, spec: AdapterSpec, gathered: dict[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """PEFT-keyed tensors: adapter weights of every wrapped layer plus ``modules_to_save``.

    ``gathered``: the model's full state dict when the model itself is sharded (FSDP).
    """
    full = model.state_dict() if gathered is None else gathered
    saved_whole = tuple(f"{name}." for name in find_modules(model, spec.modules_to_save))
    state = {}
    for key, value in full.items():
        if key.endswith(ADAPTER_SUFFIXES):
            state[PREFIX + key] = value
        elif key.startswith(saved_whole):
            state[PREFIX + unwrap_key(key)] = value
        elif spec.bias == "all" and key.rsplit(".", 1)[-1] == "bias":
            state[PREFIX + key] = value  # as PEFT saves them: a wrapped layer's keeps base_layer
    return {k: v.detach().to("cpu").contiguous() for k, v in state.items()}


def adapter_config(
    model: nn.Module, spec: AdapterSpec, base_model_name_or_path: str | None, task: str | None
) -> dict:
    """The subset of ``LoraConfig`` fields that define the adapter, as PEFT names them."""
    fan_in_fan_out = {layer.fan_in_fan_out for layer in adapter_layers(model).values()}
    if len(fan_in_fan_out) > 1:
        raise AdapterMismatchError("targets mix nn.Linear and Conv1D; PEFT needs one layout")
    return {
        "peft_type": "LORA",
        "task_type": TASK_TYPES.get(task or ""),
        "base_model_name_or_path": base_model_name_or_path,
        "r": spec.r,
        "lora_alpha": spec.alpha,
        "lora_dropout": spec.dropout,
        "use_rslora": spec.use_rslora,
        "use_dora": spec.method == "dora",
        "target_modules": sorted(set(spec.target_modules) | set(spec.magnitude_only_modules)),
        "modules_to_save": list(spec.modules_to_save) or None,
        "fan_in_fan_out": fan_in_fan_out == {True},
        "bias": spec.bias,
        "init_lora_weights": True,
        "inference_mode": True,
        "rank_pattern": {},
        "alpha_pattern": {},
        "layers_to_transform": None,
        "layers_pattern": None,
        "revision": None,
    }


def save_adapter(
    model: nn.Module,
    spec: AdapterSpec,
    folder: str | Path,
    base_model_name_or_path: str | None = None,
    task: str | None = None,
    gathered: dict[str, torch.Tensor] | None = None,
) -> None:
    """Write both adapter files into ``folder``, each atomically."""
    folder = Path(folder)
    config = adapter_config(model, spec, base_model_name_or_path, task)
    state = adapter_state_dict(model, spec, gathered)
    with atomic_path(folder / WEIGHTS_NAME) as tmp:
        save_file(state, str(tmp), metadata={"format": "pt"})
    write_text_atomic(folder / CONFIG_NAME, json.dumps(config, indent=2) + "\n")


def load_adapter(model: nn.Module, folder: str | Path) -> None:
    """Load a saved adapter back into a model that already has the same adapters injected."""
    model.load_state_dict(adapter_updates(model, folder), strict=False)


def adapter_updates(model: nn.Module, folder: str | Path) -> dict[str, torch.Tensor]:
    """The saved adapter's tensors under the model's own state-dict keys (shapes checked)."""
    path = Path(folder) / WEIGHTS_NAME
    if not path.is_file():
        raise CheckpointFormatError("adapter weights missing", path=path)
    saved = load_file(str(path))
    current = model.state_dict()
    wrapped = {unwrap_key(k): k for k in current}
    updates = {}
    for key, value in saved.items():
        name = key.removeprefix(PREFIX)
        target = name if name in current else wrapped.get(name)
        if target is None or current[target].shape != value.shape:
            raise AdapterMismatchError(f"adapter tensor {key} does not fit the model", path=path)
        updates[target] = value
    return updates
