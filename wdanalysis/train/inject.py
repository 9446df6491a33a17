"""Put LoRA/DoRA layers into any ``nn.Module``, choose what trains, and merge them back out.

Targets are matched the way PEFT matches ``target_modules`` given as a list: a module whose
full name equals a target or ends with ``"." + target``. So ``["query", "value"]`` picks
every ``...attention.self.query`` and ``...attention.self.value``.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from wdanalysis.errors import WDAnalysisError
from wdanalysis.train.layers import DoRALinear, LoRALinear, is_adaptable, is_conv1d, is_norm


@dataclass(frozen=True)
class AdapterSpec:
    """How adapters are built; the same values end up in ``adapter_config.json``."""

    method: str  # "lora" or "dora"
    r: int = 8
    alpha: float = 16.0
    use_rslora: bool = False
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ("query", "value")
    magnitude_only_modules: tuple[str, ...] = ()  # DoRA only: train m, not A/B (Table 6)
    modules_to_save: tuple[str, ...] = ()  # trained in full, saved whole (e.g. a class head)
    detach_norm: bool = True  # DoRA Sec. 4.3
    bias: str = "none"  # PEFT's field: "all" trains and saves every bias beside the adapters


def matches(name: str, targets: Iterable[str]) -> bool:
    return any(name == t or name.endswith("." + t) for t in targets)


def find_modules(model: nn.Module, targets: Sequence[str]) -> list[str]:
    """Names of modules matching ``targets``; every target must match at least once."""
    names = [name for name, _ in model.named_modules() if name and matches(name, targets)]
    for target in targets:
        if not any(matches(name, [target]) for name in names):
            raise WDAnalysisError(
                f"target module {target!r} matches no module of the model",
                hint="use names as in model.named_modules(), e.g. 'query' or 'q_proj'",
            )
    return names


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def inject_adapters(model: nn.Module, spec: AdapterSpec) -> dict[str, LoRALinear]:
    """Swap each target for a LoRA/DoRA wrapper in place; returns them by module name.

    Freezes everything else except ``spec.modules_to_save``. Magnitude-only modules are
    targets too (DoRA with frozen zero A/B), which keeps the saved adapter PEFT-loadable.
    """
    if spec.method not in ("lora", "dora"):
        raise WDAnalysisError(f"unknown adapter method {spec.method!r}", hint="use lora or dora")
    if spec.magnitude_only_modules and spec.method != "dora":
        raise WDAnalysisError("magnitude-only modules need --method dora")
    mag_only = set(find_modules(model, spec.magnitude_only_modules))
    names = sorted(set(find_modules(model, spec.target_modules)) | mag_only)
    model.requires_grad_(False)
    adapters: dict[str, LoRALinear] = {}
    for name in names:
        base = model.get_submodule(name)
        if not is_adaptable(base):
            raise WDAnalysisError(
                f"target {name!r} is a {type(base).__name__}, not nn.Linear or Conv1D",
                hint="target the linear layers inside it",
            )
        adapters[name] = _wrap(base, spec, magnitude_only=name in mag_only)
        _replace(model, name, adapters[name])
    for name in find_modules(model, spec.modules_to_save):
        model.get_submodule(name).requires_grad_(True)
    return adapters


def _wrap(base: nn.Module, spec: AdapterSpec, magnitude_only: bool) -> LoRALinear:
    common = dict(r=spec.r, alpha=spec.alpha, use_rslora=spec.use_rslora, dropout=spec.dropout)
    if spec.method == "lora":
        return LoRALinear(base, **common)
    return DoRALinear(base, **common, detach_norm=spec.detach_norm, magnitude_only=magnitude_only)


def norm_modules(model: nn.Module) -> list[str]:
    """Full names of the normalisation layers (LayerNorm, RMSNorm ...) of ``model``."""
    return [name for name, module in model.named_modules() if name and is_norm(module)]


def unfreeze_biases(model: nn.Module) -> list[str]:
    """Train every bias (PEFT's ``bias="all"``: each parameter named ``bias``)."""
    names = [name for name, p in model.named_parameters() if name.rsplit(".", 1)[-1] == "bias"]
    for name in names:
        model.get_parameter(name).requires_grad_(True)
    return names


def adapter_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def select_full_finetune(model: nn.Module, modules: Sequence[str] = ()) -> list[str]:
    """Full fine-tuning: train every parameter, or only those of the named modules."""
    if not modules:
        model.requires_grad_(True)
    else:
        model.requires_grad_(False)
        for name in find_modules(model, modules):
            model.get_submodule(name).requires_grad_(True)
    return [name for name, p in model.named_parameters() if p.requires_grad]


@torch.no_grad()
def merge_adapters(model: nn.Module) -> nn.Module:
    """Replace every adapter wrapper by its base layer holding the merged weight, in place.

    The base layer is a fresh copy, so a base model shared elsewhere never accumulates
    merges (pitfall 3 of the reference notes).
    """
    for name, layer in adapter_layers(model).items():
        new = copy.deepcopy(layer.base_layer)
        merged = layer.merged_weight().to(new.weight.dtype)
        new.weight = nn.Parameter(merged.T.contiguous() if is_conv1d(new) else merged)
        _replace(model, name, new)
    return model


def merged_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """Effective (out, in) weight of every adapted module, without touching the model."""
    with torch.no_grad():
        return {name: layer.merged_weight() for name, layer in adapter_layers(model).items()}


def unwrap_key(key: str) -> str:
    """State-dict key of a wrapped model -> key of the original model."""
    return key.replace(".base_layer.", ".")
