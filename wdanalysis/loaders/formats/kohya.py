"""kohya-ss and LyCORIS LoRA/LoCon/DoRA files: one ``.safetensors`` of flattened names.
(LoHa, LoKr, full and Tucker LoCon networks: :mod:`wdanalysis.loaders.formats.lycoris`.)

Keys are ``<prefix>_<module path with . → _>.<role>``: prefixes ``lora_unet`` (the
diffusion model), ``lora_te``/``lora_te1``/``lora_te2``/``lora_te3`` (text encoders),
``lycoris`` (LyCORIS on any module); roles ``lora_down.weight`` ``(r, in[, k, k])``,
``lora_up.weight`` ``(out, r[, 1, 1])``, ``alpha`` (a scalar; scale = alpha / r, a missing
or zero alpha meaning alpha = r, as both libraries read it) and LyCORIS' DoRA
``dora_scale``: ``(out, 1, …)`` with ``wd_on_out=True`` (one magnitude per output
feature), ``(1, in, …)`` with ``wd_on_out=False`` (one per input channel, the norm over
the output and kernel dims). Both are merged exactly on their own axis.

Flattened names are ambiguous (``down_blocks_0`` could be ``down.blocks.0`` or
``down_blocks.0``), so they are never un-flattened: every base key is flattened the same
way and looked up. sd-scripts names SD1.x/2.x UNets in the diffusers layout and SDXL UNets
in the original (LDM) one; a UNet module the base does not name is looked up under its
name in the other layout (:mod:`wdanalysis.loaders.formats.sdlayout`).
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

from wdanalysis.errors import AdapterMismatchError, CheckpointFormatError
from wdanalysis.loaders.formats import lycoris, sdlayout
from wdanalysis.loaders.formats.foreign import (
    ForeignAdapter,
    ForeignModule,
    ViewStore,
    check_rank,
    lora_view,
    plain_config,
)
from wdanalysis.loaders.key_alignment import KeyAligner
from wdanalysis.storage.tensor_store import TensorStore, open_tensor_file

PREFIXES = {  # longest first: lora_te1_ before lora_te_
    "lora_unet_": "UNet",
    "lora_transformer_": "transformer",
    "lora_te1_": "text encoder 1",
    "lora_te2_": "text encoder 2",
    "lora_te3_": "text encoder 3",
    "lora_te_": "text encoder",
    "lycoris_": "",
}
_ROLES = {
    "lora_down.weight": "down",
    "lora_up.weight": "up",
    "alpha": "alpha",
    "dora_scale": "dora",
}
# LyCORIS' other networks, by the prefix of their tensors' roles: they mark a file as
# kohya/LyCORIS; LoHa, LoKr, full and Tucker LoCon are then read by LyCORIS' own merge
# (wdanalysis.loaders.formats.lycoris), the others refused by name.
_UNSUPPORTED = {
    "lora_mid": "LoCon with Tucker decomposition (lora_mid)",
    "hada_": "LoHa",
    "lokr_": "LoKr",
    "oft_": "OFT",
    "rescale": "OFT",
    "diff": "full-weight difference",
    "w_norm": "trained norm layers",
    "b_norm": "trained norm layers",
    "a1.weight": "GLoRA",
    "a2.weight": "GLoRA",
    "b1.weight": "GLoRA",
    "b2.weight": "GLoRA",
}


def _unsupported(role: str) -> str | None:
    return next((what for start, what in _UNSUPPORTED.items() if role.startswith(start)), None)


# Where each component lives in single-file checkpoints, to break ties.
# (Dotted components, matched whole: ``text_encoder`` is not ``text_encoder_2``.)
_COMPONENT_HINTS = {
    "UNet": ("diffusion_model", "unet"),
    "text encoder": ("text_model", "cond_stage_model", "text_encoder"),
    "text encoder 1": ("embedders.0", "text_encoder"),
    "text encoder 2": ("embedders.1", "text_encoder_2"),
}


def is_kohya_keys(keys: list[str]) -> bool:
    return any(
        k.startswith(tuple(PREFIXES)) and k.endswith((".lora_down.weight", ".lora_up.weight"))
        for k in keys
    ) or any(
        k.startswith(tuple(PREFIXES))
        and "." in k
        and (_role(k)[1] == "dora" or _unsupported(k.partition(".")[2]))
        for k in keys
    )


def _role(key: str) -> tuple[str, str | None]:
    name, _, role = key.partition(".")
    return name, _ROLES.get(role)


def open_kohya(path: Path, source: TensorStore, step: int | None):
    from wdanalysis.loaders.checkpoint_kinds import AdapterCheckpoint

    if lycoris.is_lycoris_network(source.keys()):  # LoHa, LoKr, full, Tucker LoCon
        network = lycoris.open_network(path, source, PREFIXES)
        network.resolver = _Resolver(network.add_note).find
        return AdapterCheckpoint(path, network, step)
    parts: dict[str, dict[str, str]] = defaultdict(dict)
    for key in source.keys():
        name, role = _role(key)
        if role is None:
            what = _unsupported(key.partition(".")[2])
            raise CheckpointFormatError(
                f"unsupported tensor {key!r} in a kohya/LyCORIS file"
                + (f": {what} is not a LoRA/DoRA update" if what else ""),
                path,
                "wdanalysis reads LoRA, LoCon (Tucker too), LoHa, LoKr, full and DoRA "
                "(dora_wd) networks",
            )
        parts[name][role] = key
    store = ViewStore.over(source, source.format)
    modules = {name: _module(name, found, source, store, path) for name, found in parts.items()}
    alphas = {round(_alpha_of(source, p), 9) for p in parts.values() if "alpha" in p}
    note = (
        "alpha / r per module from its .alpha tensor"
        if all("alpha" in p for p in parts.values() if "down" in p)
        else "alpha / r, alpha = r where a module has no .alpha tensor"
    )
    if len(alphas) == 1:
        note += f" (alpha = {alphas.pop():g})"
    adapter = ForeignAdapter(
        path,
        store,
        plain_config("kohya"),
        modules,
        ecosystem="kohya-ss/LyCORIS",
        scaling_note=note,
    )
    adapter.resolver = _Resolver(adapter.add_note).find
    unet = [n[len("lora_unet_") :] for n in parts if n.startswith("lora_unet_")]
    layout = sdlayout.names_layout(unet)
    if layout:
        adapter.add_note(f"UNet names in the {layout} layout", warn=False)
    return AdapterCheckpoint(path, adapter, step)


def _alpha_of(source: TensorStore, key: str | dict) -> float:
    key = key["alpha"] if isinstance(key, dict) else key
    return float(source.get(key).to("cpu").double().reshape(-1)[0])


def _module(name: str, found: dict, source: TensorStore, store: ViewStore, path: Path):
    prefix = (
        next(p for p in PREFIXES if name.startswith(p))
        if name.startswith(tuple(PREFIXES))
        else None
    )
    if prefix is None:
        raise CheckpointFormatError(
            f"module {name!r} has none of the kohya/LyCORIS prefixes "
            f"({', '.join(p.rstrip('_') for p in PREFIXES)})",
            path,
        )
    module = ForeignModule(name, component=PREFIXES[prefix])
    if "down" in found or "up" in found:
        if not ("down" in found and "up" in found):
            raise AdapterMismatchError(f"{name} has only one of lora_down/lora_up", path)
        lora_view(store, module, found["down"], found["up"], False, False)
        rank = check_rank(store, module, path)
        alpha = _alpha_of(source, found["alpha"]) if "alpha" in found else 0.0
        module.scaling = (alpha or rank) / rank  # both libraries: alpha 0 or absent → r
    if "dora" in found:
        shape = source.shape(found["dora"])
        if shape and shape[0] > 1:
            axis, size = "out", shape[0]
        elif len(shape) > 1 and shape[1] > 1:
            axis, size = "in", shape[1]
        else:
            axis, size = "auto", 1  # a single value: the base shape decides
        module.magnitude_axis = axis
        module.magnitude = store.add(
            name + ".lora_magnitude_vector", found["dora"], (size,), lambda t: t.reshape(-1)
        )
    return module


class _Resolver:
    """Flattened base names (``.`` → ``_``) → base keys, built once per base. A UNet
    module that the base does not name is looked up again under its name in the other
    layout (diffusers ↔ original, :mod:`wdanalysis.loaders.formats.sdlayout`)."""

    def __init__(self, note: Callable[[str], None]):
        self._aligner: KeyAligner | None = None
        self._flat: dict[str, list[str]] = {}
        self._note = note

    def find(self, module: ForeignModule, aligner: KeyAligner) -> str | None:
        if aligner is not self._aligner:
            self._aligner, self._flat = aligner, _flattened(aligner.base_keys)
        prefix = next(p for p in PREFIXES if module.name.startswith(p))
        name = module.name[len(prefix) :]
        candidates = self._candidates(name, module.component)
        if not candidates and module.component == "UNet":  # the other layout's whole name
            found = sdlayout.find_converted(name, "_", self._whole_name, self._note)
            if found is not None:
                return found
        # The base may also name fewer wrappers than the trainer did (transformers 5 saves
        # CLIPTextModel without ``text_model.``): then the longest tail that fits decides.
        tails = (name[i + 1 :] for i, ch in enumerate(name) if ch == "_")
        while not candidates:
            tail = next(tails, None)
            if tail is None:
                return None
            candidates = self._candidates(tail, module.component)
        return candidates[0] if len(candidates) == 1 else None

    def _candidates(self, flat: str, component: str) -> list[str]:
        candidates = self._flat.get(flat, [])
        if len(candidates) > 1:  # e.g. a single-file checkpoint: prefer the component's
            hints = _COMPONENT_HINTS.get(component, ())
            candidates = [c for c in candidates if any(f".{h}." in f".{c}" for h in hints)]
        return candidates

    def _whole_name(self, flat: str) -> str | None:
        """A converted UNet name: only the whole name counts, never a shorter tail."""
        candidates = self._candidates(flat, "UNet")
        return candidates[0] if len(candidates) == 1 else None


def _flattened(base_keys) -> dict[str, list[str]]:
    flat: dict[str, list[str]] = defaultdict(list)
    for key in base_keys:
        if not key.endswith(".weight"):
            continue
        parts = key[: -len(".weight")].split(".")
        for start in range(len(parts)):
            flat["_".join(parts[start:])].append(key)
    return flat


# sd-scripts saves ``<name>-000003.safetensors`` per epoch and ``<name>-step00000500`` per
# step; the final ``<name>.safetensors`` carries no number and is not a step of the run.
STEP_FILE = re.compile(r"^(?P<stem>.+)-(?P<kind>step)?(?P<n>\d{6,})\.safetensors$")


def step_files(folder: Path) -> list[tuple[int, Path]]:
    """Numbered saves of one kohya network (one name), steps preferred over epochs."""
    found: dict[tuple[str, str], list[tuple[int, Path]]] = defaultdict(list)
    for child in folder.iterdir() if folder.is_dir() else ():
        match = STEP_FILE.match(child.name)
        if match and child.is_file():
            found[(match["stem"], match["kind"] or "")].append((int(match["n"]), child))
    stems = {stem for stem, _ in found}
    if len(stems) != 1:
        return []
    stem = stems.pop()
    files = found.get((stem, "step")) or found[(stem, "")]
    first = open_tensor_file(files[0][1])
    return sorted(files) if is_kohya_keys(first.keys()) else []
