"""A model being trained, seen as a checkpoint the streaming engine can compare.

Nothing is copied: :class:`LiveStore` hands the engine the model's own tensors (detached,
on the model's device). Quantized (bitsandbytes 4/8-bit) and sharded (FSDP2, ZeRO-3)
parameters are handed over dequantized or gathered, one weight at a time
(:mod:`wdanalysis.engine.live_tensors`).

* Full fine-tuning: every selected weight of the model is compared, block by block, with
  the base read from disk by the engine (:mod:`wdanalysis.storage.row_reader`), so the base
  never sits in memory whole.
* LoRA/DoRA (PEFT's ``LoraLayer`` or the bundled trainer's layers): the base is the frozen
  ``base_layer.weight`` inside the model, and the update is formed from the adapter's own
  ``lora_A``, ``lora_B``, scaling and magnitude, exactly as for a saved adapter.

:func:`bind_model` matches the model's weights to the base on disk and refuses, with one
line, a base that is missing or belongs to another model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from wdanalysis.engine.live_tensors import is_sharded, logical_shape, materialize, quantization
from wdanalysis.errors import AdapterMismatchError
from wdanalysis.loaders import lora_fields
from wdanalysis.loaders.key_alignment import strip_peft_prefix
from wdanalysis.loaders.peft_adapter import Adapter, AdapterConfig, AdapterModule
from wdanalysis.loaders.runs import AdapterCheckpoint, FullModel, Run, aligner_for
from wdanalysis.storage.store_protocol import WeightStore
from wdanalysis.storage.tensor_store import TensorInfo
from wdanalysis.weights.bound_checkpoint import BoundCheckpoint

_FROZEN_WRAPPERS = (".base_layer.", ".original_module.")
_WRONG_BASE = "pass the pretrained model this model was loaded from"


class LiveStore:
    """A :class:`~wdanalysis.storage.store_protocol.WeightStore` over in-memory tensors: what
    the engine reads from a store, and nothing of a file's (no slices, nothing to close).

    ``infos`` is empty, so the engine never looks for these tensors in a file. ``owners``:
    the module holding each tensor, where its dequantization needs it (8-bit row scales).
    """

    def __init__(self, path: Path, tensors: dict[str, torch.Tensor], owners: dict | None = None):
        self.path = Path(path)  # the base on disk, named in error messages
        self.format = "live"
        self.infos: dict[str, TensorInfo] = {}
        self._tensors = tensors
        self._owners = owners or {}

    def keys(self) -> list[str]:
        return list(self._tensors)

    def held(self, key: str) -> torch.Tensor:
        """The model's own tensor (the parameter itself, e.g. to find its optimizer group)."""
        return self._tensors[key]

    def __contains__(self, key: str) -> bool:
        return key in self._tensors

    def shape(self, key: str) -> tuple[int, ...]:
        return logical_shape(self._tensors[key])

    def dtype(self, key: str) -> torch.dtype:
        tensor = self._tensors[key]
        if not quantization(tensor):
            return tensor.dtype
        state = getattr(tensor, "quant_state", None)  # 4-bit: its original dtype
        return state.dtype if state is not None else torch.float32

    def get(self, key: str) -> torch.Tensor:
        return materialize(self._tensors[key], self._owners.get(key))

    def quantized(self) -> str | None:
        """The quantization of the first quantized tensor (``None``: none is)."""
        return next(filter(None, map(quantization, self._tensors.values())), None)

    def sharded(self) -> bool:
        """Whether reading a tensor whole is a collective call (every rank must take part)."""
        return any(map(is_sharded, self._tensors.values()))


@dataclass
class LiveModel:
    """What the engine needs to compare a model being trained with its base."""

    base: FullModel  # the base on disk (FT) or the frozen weights inside the model (adapters)
    bound: BoundCheckpoint  # the model's current weights, bound to the selected base keys
    transposed: object  # base key -> stored (in, out)
    method: str  # "FT", "LoRA" or "DoRA"
    device: torch.device

    @property
    def quantized(self) -> str | None:
        """The base's quantization when the model trains over a quantized base (QLoRA)."""
        store = self.base.store
        return store.quantized() if isinstance(store, LiveStore) else None

    @property
    def sharded(self) -> bool:
        """Whether the model's weights are sharded over ranks (FSDP2, ZeRO-3)."""
        ckpt = self.bound.checkpoint
        stores = [self.base.store, ckpt.adapter.store if hasattr(ckpt, "adapter") else ckpt.store]
        return any(s.sharded() for s in stores if isinstance(s, LiveStore))


def adapter_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every LoRA/DoRA-wrapped layer: PEFT's ``LoraLayer`` or the bundled trainer's."""
    return {
        name: module
        for name, module in model.named_modules()
        if hasattr(module, "base_layer") and hasattr(module, "lora_A")
    }


def _factors(layer: nn.Module) -> tuple:
    """``(A, B, scaling, magnitude)`` of the layer's active adapter (PEFT or bundled)."""
    if isinstance(layer.lora_A, nn.ModuleDict):  # PEFT: one entry per adapter name
        names = [n for n in getattr(layer, "active_adapters", []) if n in layer.lora_A]
        if not names:
            return None, None, 1.0, None
        name = names[0]
        magnitude = getattr(layer, "lora_magnitude_vector", None)
        m = magnitude[name].weight if magnitude is not None and name in magnitude else None
        return layer.lora_A[name].weight, layer.lora_B[name].weight, layer.scaling[name], m
    m = getattr(layer, "lora_magnitude_vector", None)
    return layer.lora_A.weight, layer.lora_B.weight, float(layer.scaling), m


def bind_model(
    model: nn.Module, base_path: Path, selected: list[str], base: FullModel, run: Run, layout=None
) -> LiveModel:
    """Match ``model``'s weights to the ``selected`` keys of ``base`` (opened from disk).

    ``layout(key)``: whether the base stores ``key`` as (in, out), as ``compare`` decides it
    (default: the base's own rule); an adapted layer's ``fan_in_fan_out`` overrides it.
    """
    if any(type(m).__name__ == "FullyShardedDataParallel" for m in model.modules()):
        raise AdapterMismatchError(  # FSDP1 flat parameters: no weight has its own shape
            "the model is wrapped by FSDP1 (flat parameters), which live tracking does not read",
            base_path,
            "train with FSDP2 (accelerate launch --fsdp_version 2), or compare saved checkpoints",
        )
    device = next(iter(model.parameters())).device
    layout = layout or base.transposed
    layers = adapter_layers(model)
    if layers:
        return _bind_adapters(model, layers, base_path, selected, base, run, device, layout)
    aligner = aligner_for(base)
    params = dict(model.named_parameters())
    mapping = aligner.map_keys(params)
    _require_all(selected, mapping, base_path)
    for key in selected:
        _require_shape(key, logical_shape(params[mapping[key]]), base.store.shape(key), base_path)
        if quantization(params[mapping[key]]):
            raise AdapterMismatchError(
                f"weight {key!r} is {quantization(params[mapping[key]])} quantized and the model "
                "has no LoRA/DoRA adapter: a quantized weight is not trained in full",
                base_path,
                "track a PEFT LoRA/DoRA model over the quantized base (QLoRA)",
            )
    store = LiveStore(base_path, {key: params[mapping[key]] for key in selected})
    ckpt = FullModel(Path(run.path), store)
    bound = BoundCheckpoint(run, ckpt, "FT", {key: key for key in selected})
    return LiveModel(base, bound, layout, "FT", device)


def _bind_adapters(
    model, layers, base_path, selected, base: FullModel, run, device, layout
) -> LiveModel:
    aligner = aligner_for(base)
    for config in (getattr(model, "peft_config", None) or {}).values():
        variant = lora_fields.live_unsupported(vars(config))  # PiSSA/KaSA/…: a changed base
        if variant:
            raise AdapterMismatchError(
                f"live tracking of {variant} adapters is not supported",
                base_path,
                "save checkpoints during training and compare them with the original base",
            )
    frozen = {}
    for name, param in model.named_parameters():
        if ".lora_" in name or ".modules_to_save." in name:
            continue
        for wrapper in _FROZEN_WRAPPERS:
            name = name.replace(wrapper, ".")
        frozen[name] = param
    mapping = aligner.map_keys(frozen)
    _require_all(selected, mapping, base_path)
    weights = {key: frozen[mapping[key]] for key in selected}
    owner_of = {id(p): m for m in model.modules() for p in m.parameters(recurse=False)}
    owners = {key: owner_of.get(id(weights[key])) for key in selected}
    for key in selected:
        if is_sharded(weights[key]) and type(owners[key]).__module__.startswith("bitsandbytes"):
            raise AdapterMismatchError(  # its shards hold packed data, its quant_state no shape
                f"weight {key!r} is bitsandbytes-quantized and sharded (FSDP-QLoRA), which live "
                "tracking does not read",
                base_path,
                "track the QLoRA run unsharded, or compare saved checkpoints with the base",
            )
    tensors, modules, flips = {}, {}, {}
    for path, layer in layers.items():
        key = aligner.find(strip_peft_prefix(path) + ".weight")
        if key not in weights:
            continue
        if len(getattr(layer, "lora_embedding_A", ())):
            raise AdapterMismatchError(
                f"{path}: live tracking of embedding adapters is not supported",
                base_path,
                "leave the embedding out of modules, or compare saved checkpoints",
            )
        a, b, scaling, m = _factors(layer)
        module = AdapterModule(strip_peft_prefix(path), scaling=float(scaling))
        for role, tensor in (("lora_a", a), ("lora_b", b), ("magnitude", m)):
            if tensor is not None:
                tensors[f"{path}.{role}"] = tensor
                setattr(module, role, f"{path}.{role}")
        module.rank = None if a is None else a.shape[0]
        modules[key] = module
        flips[key] = bool(getattr(layer, "fan_in_fan_out", False))
    for key in selected:
        _require_shape(key, logical_shape(weights[key]), base.store.shape(key), base_path)
        if key not in modules and weights[key].requires_grad:
            raise AdapterMismatchError(
                f"weight {key!r} is trained in full beside the adapter; tracking it needs the "
                "base read from disk, which adapter tracking does not do",
                base_path,
                "leave it out of modules",
            )
    method = "DoRA" if any(m.magnitude for m in modules.values()) else "LoRA"
    config = AdapterConfig(format="peft", r=None, lora_alpha=None, use_dora=method == "DoRA")
    adapter = Adapter(Path(run.path), LiveStore(base_path, tensors), config, {})
    ckpt = AdapterCheckpoint(Path(run.path), adapter)
    inner = FullModel(base.path, LiveStore(base_path, weights, owners), base.model_type)

    def transposed(key: str) -> bool:
        return flips[key] if key in flips else layout(key)

    return LiveModel(inner, BoundCheckpoint(run, ckpt, method, modules), transposed, method, device)


def check_same_weights(live: LiveModel, disk: FullModel, key: str, where: Path) -> None:
    """Refuse a base whose weight ``key`` is not the model's (another model, same shapes).

    Compared with the model's frozen weight (adapters) or its weight before the first step
    (FT), allowing for a lower-precision copy (bf16 rounds to 2⁻⁸ relative). A quantized
    base is compared as a whole: nf4/fp4 move single values by up to a sixth of their
    block's absmax, but the relative Frobenius error stays near 0.1 (int8: 0.01), against
    √2 for two unrelated weights of the same scale.
    """
    store: WeightStore = live.base.store if live.base is not disk else live.bound.checkpoint.store
    mine = store.get(key).to("cpu", torch.float64)
    theirs = disk.store.get(key).to(torch.float64)
    if live.quantized:
        far = float((mine - theirs).norm()) > 0.3 * (float(theirs.norm()) or 1.0)
    else:
        far = float((mine - theirs).abs().max()) > 1e-2 * (float(theirs.abs().max()) or 1.0)
    if far:
        raise AdapterMismatchError(
            f"weight {key!r} of the base differs from the model's own: base and model come "
            "from different models",
            where,
            _WRONG_BASE,
        )


def _require_all(selected: list[str], mapping: dict, where: Path) -> None:
    missing = [key for key in selected if key not in mapping]
    if missing:
        raise AdapterMismatchError(
            f"the model lacks {len(missing)} of the {len(selected)} selected base weights, "
            f"e.g. {missing[0]!r}: base and model come from different models",
            where,
            _WRONG_BASE,
        )


def _require_shape(key: str, mine, theirs, where: Path) -> None:
    if tuple(mine) != tuple(theirs):
        raise AdapterMismatchError(
            f"weight {key!r} has shape {list(theirs)} in the base but {list(mine)} in the "
            "model: base and model come from different models",
            where,
            _WRONG_BASE,
        )
