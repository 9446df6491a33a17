"""diffusers LoRA files: ``pytorch_lora_weights.safetensors`` without an adapter config.

Keys are PEFT's, under the pipeline component they adapt: ``unet.<module>.lora_A.weight``,
``transformer.…``, ``text_encoder.…``, ``text_encoder_2.…`` (DoRA:
``….lora_magnitude_vector``). The scaling is found as diffusers finds it: the LoraConfig
per component in the file's ``lora_adapter_metadata`` (``r``, ``lora_alpha``,
``use_rslora``, ``rank_pattern``, ``alpha_pattern``), else a module's ``.alpha`` tensor
(network alphas), else alpha = r (scale 1), as diffusers assumes. UNet modules are
matched in the base's own layout, diffusers or original (single-file ``model.diffusion_model.``).
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

from safetensors import safe_open

from wdanalysis.errors import AdapterMismatchError, CheckpointFormatError
from wdanalysis.loaders.formats import sdlayout
from wdanalysis.loaders.formats.foreign import (
    ForeignAdapter,
    ForeignModule,
    ViewStore,
    check_rank,
    lora_view,
    plain_config,
)
from wdanalysis.loaders.key_alignment import KeyAligner
from wdanalysis.loaders.peft_adapter import AdapterConfig
from wdanalysis.storage.tensor_store import TensorStore

WEIGHT_FILE = "pytorch_lora_weights.safetensors"
COMPONENTS = (
    "unet",
    "transformer",
    "text_encoder",
    "text_encoder_2",
    "text_encoder_3",
    "prior",
    "decoder",
)
_ROLES = (  # suffix → role
    (".lora_A.weight", "down"),
    (".lora_B.weight", "up"),
    (".lora.down.weight", "down"),
    (".lora.up.weight", "up"),
    (".lora_magnitude_vector.weight", "dora"),
    (".lora_magnitude_vector", "dora"),
    (".lora_B.bias", "bias"),
    (".alpha", "alpha"),
)


def is_diffusers_keys(keys: list[str]) -> bool:
    return any(
        k.split(".", 1)[0] in COMPONENTS and k.endswith((".lora_A.weight", ".lora.down.weight"))
        for k in keys
    )


def _split(key: str, path: Path) -> tuple[str, str, str]:
    component, _, rest = key.partition(".")
    for suffix, role in _ROLES:
        if rest.endswith(suffix):
            return component, rest[: -len(suffix)], role
    raise CheckpointFormatError(
        f"unsupported tensor {key!r} in a diffusers LoRA file (expected lora_A/lora_B"
        ", lora_magnitude_vector or alpha)",
        path,
        "wdanalysis reads LoRA and DoRA on Linear and Conv layers",
    )


def component_configs(path: Path) -> dict[str, AdapterConfig]:
    """The LoraConfig of each component from ``lora_adapter_metadata``, if the file has it."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            raw = (handle.metadata() or {}).get("lora_adapter_metadata")
    except Exception:  # noqa: BLE001 - the header was validated already; no metadata then
        return {}
    if not raw:
        return {}
    try:
        flat = json.loads(raw)
        if not isinstance(flat, dict):
            raise ValueError("not an object")
    except ValueError as error:
        raise CheckpointFormatError(
            f"malformed lora_adapter_metadata in the file's header ({error})",
            path,
            "re-save the LoRA with diffusers",
        ) from None
    grouped: dict[str, dict] = defaultdict(dict)
    for key, value in flat.items():
        component, dot, field = key.partition(".")
        if dot and component in COMPONENTS:
            grouped[component][field] = value
        else:
            grouped[""][key] = value  # one model's config, saved without a prefix
    return {c: _config(fields, path) for c, fields in grouped.items()}


def _config(fields: dict, path: Path) -> AdapterConfig:
    r, alpha = fields.get("r"), fields.get("lora_alpha")
    if not (isinstance(r, int) and r > 0) or not isinstance(alpha, (int, float)):
        raise CheckpointFormatError(
            f"lora_adapter_metadata lacks a valid r / lora_alpha (r={r!r}, lora_alpha={alpha!r})",
            path,
            "re-save the LoRA with diffusers",
        )
    return AdapterConfig(
        format="peft",
        r=r,
        lora_alpha=float(alpha),
        use_rslora=bool(fields.get("use_rslora", False)),
        use_dora=bool(fields.get("use_dora", False)),
        rank_pattern=dict(fields.get("rank_pattern") or {}),
        alpha_pattern=dict(fields.get("alpha_pattern") or {}),
    )


def open_diffusers(path: Path, source: TensorStore, step: int | None):
    from wdanalysis.loaders.checkpoint_kinds import AdapterCheckpoint

    configs = component_configs(path)
    parts: dict[tuple[str, str], dict[str, str]] = defaultdict(dict)
    for key in source.keys():
        component, name, role = _split(key, path)
        parts[(component, name)][role] = key
    store = ViewStore.over(source, source.format)
    modules, how = {}, set()
    for (component, name), found in parts.items():
        module = ForeignModule(name, component=component)
        if "down" in found or "up" in found:
            if not ("down" in found and "up" in found):
                raise AdapterMismatchError(f"{component}.{name} has only one LoRA factor", path)
            lora_view(store, module, found["down"], found["up"], False, False)
            rank = check_rank(store, module, path)
            config = configs.get(component) or configs.get("")
            if config is not None:
                module.scaling = config.rank_and_scaling(name, rank, path)[1]
                how.add("LoraConfig from the file's lora_adapter_metadata")
            elif "alpha" in found:
                alpha = float(source.get(found["alpha"]).double().reshape(-1)[0])
                module.scaling = alpha / rank
                how.add("alpha / r from the .alpha tensors (network alphas)")
            else:
                module.scaling = 1.0
                how.add("alpha = r, as diffusers assumes without metadata or alphas")
        if "dora" in found:
            size = math.prod(source.shape(found["dora"]))
            module.magnitude = store.add(
                f"{component}.{name}.lora_magnitude_vector",
                found["dora"],
                (size,),
                lambda t: t.reshape(-1),
            )
        modules[f"{component}.{name}"] = module
    adapter = ForeignAdapter(
        path,
        store,
        plain_config("diffusers"),
        modules,
        ecosystem="diffusers",
        scaling_note="; ".join(sorted(how)),
    )
    adapter.resolver = _resolver(adapter.add_note)
    layout = sdlayout.names_layout(n for c, n in parts if c == "unet")
    if layout:
        adapter.add_note(f"UNet names in the {layout} layout", warn=False)
    return AdapterCheckpoint(path, adapter, step)


def _resolver(note: Callable[[str], None]):
    """Names by unique dotted suffix; a UNet module the base does not name is looked up
    again under its name in the other layout (diffusers ↔ original, as in a single-file
    checkpoint's ``model.diffusion_model.``), :mod:`wdanalysis.loaders.formats.sdlayout`."""

    def find(module: ForeignModule, aligner: KeyAligner) -> str | None:
        found = aligner.find(module.name + ".weight")
        if found is None and module.component.startswith("text_encoder"):
            # a single file holds both SDXL encoders: the one in this component's tree
            inside = [
                key
                for key in aligner.matches(module.name + ".weight")
                if not sdlayout.outside_its_tree(module.component, key)
            ]
            return inside[0] if len(inside) == 1 else None
        if module.component != "unet" or _whole(found, module.name):
            return found

        def whole_name(converted: str) -> str | None:  # never a shorter tail of it
            key = aligner.find(f"diffusion_model.{converted}.weight")
            key = key or aligner.find(converted + ".weight")
            return key if _whole(key, converted) else None

        # a UNet name of the other layout, before any shorter tail of this one
        return sdlayout.find_converted(module.name, ".", whole_name, note) or found

    return find


def _whole(key: str | None, name: str) -> bool:
    """``key`` is module ``name``'s weight under some prefix, not one of a shorter tail."""
    return key is not None and (key == name + ".weight" or key.endswith(f".{name}.weight"))
