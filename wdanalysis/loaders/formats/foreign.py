"""The shared representation of adapters from other ecosystems (mlx-lm, kohya/LyCORIS,
diffusers, torchtune).

Each loader presents its factors in PEFT's layout through a :class:`ViewStore` (``lora_A``
as ``(r, in·k…)``, ``lora_B`` as ``(out, r)``, the magnitude as a vector), with the rank and
scaling of every module found at load time, so the streaming engine reads them like a PEFT
adapter. Convolution weights are handled as ``(out, in·k…)`` matrices throughout.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch

from wdanalysis.errors import AdapterMismatchError
from wdanalysis.loaders.formats import sdlayout
from wdanalysis.loaders.key_alignment import KeyAligner, strip_peft_prefix
from wdanalysis.loaders.peft_adapter import (
    Adapter,
    AdapterConfig,
    AdapterModule,
    explain_unmatched,
    refuse_non_float,
)
from wdanalysis.storage.tensor_store import TensorInfo, TensorStore

Transform = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class ViewStore(TensorStore):
    """A store whose keys are views of another store's tensors (renamed, reshaped,
    transposed, rows reordered); read lazily like the store beneath it."""

    reads_as_stored: ClassVar[bool] = False  # every key is a transform of a stored tensor
    source: TensorStore | None = None
    views: dict[str, tuple[str, Transform]] = field(default_factory=dict)

    @classmethod
    def over(cls, source: TensorStore, fmt: str) -> ViewStore:
        return cls(source.path, fmt, {}, source=source)

    def add(self, key: str, real: str, shape: tuple[int, ...], transform: Transform) -> str:
        info = self.source.infos[real]
        self.infos[key] = TensorInfo(tuple(shape), info.dtype, info.file)
        self.views[key] = (real, transform)
        return key

    def get(self, key: str) -> torch.Tensor:
        real, transform = self.views[key]
        return transform(self.source.get(real))

    def close(self) -> None:
        self.source.close()


def as_rows(n: int) -> Transform:
    """A tensor as an ``(n, rest)`` matrix (conv factors, magnitudes)."""
    return lambda t: t.reshape(n, -1)


def transposed(t: torch.Tensor) -> torch.Tensor:
    return t.T


@dataclass
class ForeignModule(AdapterModule):
    """An adapted module of another ecosystem. ``magnitude_axis`` is ``"out"`` (one per
    output feature, as PEFT) or ``"in"`` (LyCORIS ``wd_on_out=False``: one per input
    channel, the norm taken over the output and kernel dims)."""

    magnitude_axis: str = "out"
    component: str = ""  # diffusion models: unet / text encoder / …; "" for one model
    resolved: str | None = None  # the base key, once bound
    # One expert of a stacked (experts, out, in) weight (see formats/moe.py): the stacked
    # module's name and the number of experts; 0 for an ordinary module.
    stacked: str = ""
    experts: int = 0

    def merged_whole(self, axis: str, transposed: bool) -> bool:
        """As for PEFT modules, and a magnitude per input channel (LyCORIS
        ``wd_on_out=False``) too: its norm runs over whole stored columns."""
        return super().merged_whole(axis, transposed) or self.magnitude_axis != "out"


@dataclass
class ForeignAdapter(Adapter):
    """An adapter read from another ecosystem's files, in the PEFT representation."""

    ecosystem: str = ""
    scaling_note: str = ""  # how the scaling was found, for ``inspect``
    notes: list[str] = field(default_factory=list)
    resolver: Callable[[ForeignModule, KeyAligner], str | None] | None = None

    def describe(self) -> dict:
        scales = sorted({round(m.scaling, 12) for m in self.adapted.values() if m.lora_b})
        info = {
            "format": f"{self.ecosystem} {self.method} adapter ({self.store.format})",
            "scaling": ", ".join(f"{s:.6g}" for s in scales) + f" ({self.scaling_note})",
        }
        axes = {m.magnitude_axis for m in self.adapted.values() if m.magnitude}
        if axes:
            info["magnitude_axis"] = ", ".join(
                "per output feature" if a == "out" else "per input channel (wd_on_out=False)"
                for a in sorted(axes)
            )
        components: dict[str, int] = {}
        for module in self.adapted.values():
            if module.component:
                components[module.component] = components.get(module.component, 0) + 1
        if components:
            info["components"] = [f"{c}: {n} modules" for c, n in sorted(components.items())]
        if self.notes:
            info["notes"] = list(self.notes)
        return info

    def add_note(self, note: str, warn: bool = True) -> None:
        """Record ``note`` for ``inspect``/the report once, and warn with it."""
        if note not in self.notes:
            self.notes.append(note)
            if warn:
                warnings.warn(f"{self.path}: {note}", stacklevel=4)

    def bind(self, aligner: KeyAligner, shapes: dict, transposed) -> dict:
        bound: dict[str, AdapterModule] = {}
        unmatched: list[ForeignModule] = []
        single_file = sdlayout.is_single_file(aligner.base_keys)
        for module in self.adapted.values():
            base_key = _component_key(module, aligner) or (
                self.resolver(module, aligner)
                if self.resolver
                else aligner.find(module.name + ".weight")
            )
            if base_key and single_file and sdlayout.outside_its_tree(module.component, base_key):
                base_key = None  # found by its tail in another component's tree
            if base_key is None:
                unmatched.append(module)
                continue
            if transposed(base_key) and not module.embedding:
                raise AdapterMismatchError(
                    f"{module.name}: {self.ecosystem} adapters on (in, out) Conv1D weights "
                    "are not supported",
                    self.path,
                    "pass --fan-in-fan-out no if the base stores (out, in) weights",
                )
            self._check_foreign(module, base_key, tuple(shapes[base_key]))
            module.resolved = base_key
            bound[base_key] = module
        unmatched = self._drop_absent_components(unmatched, bound)
        if unmatched:
            why, hint = explain_unmatched(unmatched[0].name, aligner.base_keys)
            raise AdapterMismatchError(
                f"{len(unmatched)} of {len(self.adapted)} adapted modules match no base weight, "
                f"e.g. {unmatched[0].name!r}: {why}",
                self.path,
                hint,
            )
        return bound

    def _drop_absent_components(self, unmatched: list, bound: dict) -> list:
        """A diffusion LoRA covers several models (UNet, text encoders); the base is one
        of them. A component none of whose modules matches is left out, with a note."""
        matched = {m.component for m in bound.values()}
        if not matched or not any(m.component for m in unmatched):
            return unmatched
        kept, dropped = [], {}
        for module in unmatched:
            if module.component and module.component not in matched:
                dropped[module.component] = dropped.get(module.component, 0) + 1
            else:
                kept.append(module)
        for component, count in sorted(dropped.items()):
            self.add_note(f"{count} {component} modules left out: the base holds no {component}")
        return kept

    def _check_foreign(self, module: ForeignModule, key: str, shape: tuple) -> None:
        if len(shape) < 2:
            raise AdapterMismatchError(
                f"{module.name} adapts {key!r} of shape {list(shape)}; expected a matrix or "
                "a convolution kernel",
                self.path,
            )
        if module.embedding and len(shape) != 2:
            raise AdapterMismatchError(
                f"{module.name}: an embedding adapter on the base weight {key!r} "
                f"{list(shape)}, which is not an embedding table",
                self.path,
                "pass the base model this adapter was trained on",
            )
        # An embedding (num_embeddings, dims) is an (in, out) weight
        # (wdanalysis.loaders.layer_shapes).
        out_features, in_features = (
            (shape[1], shape[0]) if module.embedding else (shape[0], _prod(shape[1:]))
        )
        in_channels = shape[0] if module.embedding else shape[1]
        if module.lora_a or module.lora_b:
            if not (module.lora_a and module.lora_b):
                raise AdapterMismatchError(
                    f"{module.name} has only one of its two LoRA factors",
                    self.path,
                    "the adapter file is incomplete; re-save it",
                )
            a_shape, b_shape = self.store.shape(module.lora_a), self.store.shape(module.lora_b)
            if b_shape != (out_features, a_shape[0]) or a_shape[1] != in_features:
                raise AdapterMismatchError(
                    f"{module.name}: its LoRA factors (up {list(b_shape)}, down "
                    f"{list(a_shape)}) do not fit the base weight {key!r} {list(shape)}",
                    self.path,
                    "this adapter was trained on a model of another size",
                )
        if module.magnitude:
            if module.magnitude_axis == "auto":  # a one-element magnitude: out == 1 or in == 1
                module.magnitude_axis = "out" if out_features == 1 else "in"
            want = out_features if module.magnitude_axis == "out" else in_channels
            m_shape = self.store.shape(module.magnitude)
            if _prod(m_shape) != want:
                raise AdapterMismatchError(
                    f"{module.name}: magnitude has shape {list(m_shape)} but the base weight "
                    f"{key!r} {list(shape)} has {want} "
                    f"{'output' if module.magnitude_axis == 'out' else 'input'} features",
                    self.path,
                    "this adapter was trained on a model of another size",
                )
        refuse_non_float(self.store, (module.lora_a, module.lora_b, module.magnitude), self.path)

    def effective_weight(self, module, w0: torch.Tensor, transposed: bool):
        """The merged weight in float64 and the base's shape: ``W0 + s·B@A`` (over the
        kernel flattened to ``(out, in·k…)``, an embedding transposed to ``(dims,
        num_embeddings)``), then DoRA's ``m · V/‖V‖`` on its axis."""
        shape = w0.shape
        v = w0.to(torch.float64)
        v = v.T if module.embedding else v.reshape(shape[0], -1)
        in_channels = shape[0] if module.embedding else shape[1]
        if module.lora_b:
            a = self.store.get(module.lora_a).to(torch.float64)
            b = self.store.get(module.lora_b).to(torch.float64)
            v = v + module.scaling * (b @ a)
        if module.magnitude:
            m = self.store.get(module.magnitude).to(torch.float64).reshape(-1)
            if module.magnitude_axis == "out":
                norm = torch.linalg.vector_norm(v, dim=1)
                v = v * (m / _nonzero(norm))[:, None]
            else:  # per input channel: the norm over output and kernel positions
                cube = v.reshape(v.shape[0], in_channels, -1)
                norm = torch.linalg.vector_norm(cube, dim=(0, 2))
                v = (cube * (m / _nonzero(norm))[None, :, None]).reshape(v.shape[0], -1)
        return (v.T if module.embedding else v).reshape(shape)


def _component_key(module: ForeignModule, aligner: KeyAligner) -> str | None:
    """A pipeline base (:mod:`wdanalysis.loaders.formats.pipeline`) names each component's keys
    ``<component>.<key>``, as diffusers LoRA files do: SDXL's two text encoders share
    module names, so the component decides."""
    key = f"{module.component}.{strip_peft_prefix(module.name)}.weight"
    return key if module.component and key in aligner.base_keys else None


def _nonzero(norm: torch.Tensor) -> torch.Tensor:
    # A zero vector has no direction: it stays zero (counted as a zero-norm vector).
    return torch.where(norm > 0, norm, torch.ones_like(norm))


def _prod(shape) -> int:
    total = 1
    for n in shape:
        total *= n
    return total


def plain_config(fmt: str) -> AdapterConfig:
    """The config the engine consults (layout only); scalings live on the modules."""
    return AdapterConfig(format=fmt, r=None, lora_alpha=None)


def lora_view(
    store: ViewStore, module: ForeignModule, down: str, up: str, down_t: bool, up_t: bool
) -> None:
    """Register ``down`` as ``lora_A`` ``(r, in·k…)`` and ``up`` as ``lora_B`` ``(out, r)``;
    ``*_t``: the source stores that factor transposed (mlx-lm: ``(in, r)``, ``(r, out)``)."""
    src = store.source
    d_shape, u_shape = src.shape(down), src.shape(up)
    if down_t:
        a_shape, a_fn = (d_shape[-1], _prod(d_shape[:-1])), transposed
    else:
        a_shape, a_fn = (d_shape[0], _prod(d_shape[1:])), as_rows(d_shape[0])
    if up_t:
        b_shape, b_fn = (u_shape[-1], _prod(u_shape[:-1])), transposed
    else:
        b_shape, b_fn = (u_shape[0], _prod(u_shape[1:])), as_rows(u_shape[0])
    # Components may share module names (SDXL's two text encoders): views are keyed by both.
    label = f"{module.component}.{module.name}" if module.component else module.name
    module.lora_a = store.add(label + ".lora_A.weight", down, a_shape, a_fn)
    module.lora_b = store.add(label + ".lora_B.weight", up, b_shape, b_fn)
    module.rank = a_shape[0]


def check_rank(store: ViewStore, module: ForeignModule, path: Path) -> int:
    """The rank, checked to agree between the two factors."""
    a_shape, b_shape = store.shape(module.lora_a), store.shape(module.lora_b)
    if len(store.source.shape(store.views[module.lora_a][0])) < 2 or a_shape[0] != b_shape[1]:
        raise AdapterMismatchError(
            f"{module.name}: its LoRA factors have different ranks "
            f"({list(store.source.shape(store.views[module.lora_a][0]))} and "
            f"{list(store.source.shape(store.views[module.lora_b][0]))})",
            path,
            "the adapter file is damaged or not of this format",
        )
    return a_shape[0]
