"""LyCORIS networks beyond LoRA in kohya/LyCORIS files: LoHa (``hada_*``), LoKr (``lokr_*``),
full-weight differences (``diff``) and Tucker LoCon (``lora_mid``), merged by LyCORIS itself.

The names are those of :mod:`wdanalysis.loaders.formats.kohya` (``lora_unet_…``,
``lora_te_…``, ``lycoris_…``), found in the base the same way. Each module's weight is
what LyCORIS computes: its ``get_module`` picks the module class from the tensors present
(``weight_list_det``), ``make_module`` builds it from the saved tensors around a standalone
layer holding ``W0`` in float64, and ``get_merged_weight`` merges (alpha / rank scaling,
Tucker cores, Kronecker and Hadamard products, DoRA's ``dora_scale`` are all LyCORIS').
One module at a time; LyCORIS (``lycoris-lora``) is an optional dependency.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from wdanalysis.errors import AdapterMismatchError, CheckpointFormatError
from wdanalysis.loaders.formats.foreign import ForeignAdapter, ForeignModule, plain_config
from wdanalysis.loaders.peft_adapter import AdapterModule
from wdanalysis.storage.tensor_store import TensorStore

# Roles whose presence makes a file a LyCORIS network read by LyCORIS' own merge.
MARKERS = ("hada_", "lokr_", "diff", "lora_mid.")
# LyCORIS module class → the method column's name.
_NAMES = {
    "LoConModule": "LoCon",
    "LohaModule": "LoHa",
    "LokrModule": "LoKr",
    "FullModule": "full",
}
LYCORIS_EXTRA = "pip install lycoris-lora (or pip install 'wdanalysis[lycoris]')"


def is_lycoris_network(keys) -> bool:
    """Whether a kohya/LyCORIS file holds LoHa, LoKr, full or Tucker LoCon modules."""
    return any(key.partition(".")[2].startswith(MARKERS) for key in keys)


@dataclass
class LycorisModule(ForeignModule):
    """One module of a LyCORIS network: its saved tensors by role (``hada_w1_a``, …)."""

    tensors: dict = field(default_factory=dict)
    algo: str = ""  # the LyCORIS module class

    def merged_whole(self, axis: str, transposed: bool) -> bool:
        return True  # LyCORIS merges the whole weight


@dataclass
class LycorisAdapter(ForeignAdapter):
    """A LyCORIS network; every module's weight is LyCORIS' own merge."""

    @property
    def method(self) -> str:
        tucker = {  # a Tucker network keeps plain factors on its Linear modules
            m.algo
            for m in self.modules.values()
            if any(r in m.tensors for r in ("lora_mid.weight", "hada_t1", "lokr_t2"))
        }
        algos = {m.algo for m in self.modules.values()}
        return "/".join(sorted(_NAMES[a] + (" (Tucker)" if a in tucker else "") for a in algos))

    @property
    def adapted(self) -> dict[str, AdapterModule]:
        return dict(self.modules)

    def describe(self) -> dict:
        info = super().describe()
        info["format"] = f"{self.ecosystem} {self.method} network ({self.store.format})"
        info["scaling"] = "LyCORIS' own (alpha / rank from each module's .alpha tensor)"
        info["weight"] = "LyCORIS' get_merged_weight on W0 in float64, one module at a time"
        return info

    def effective_weight(self, module, w0: torch.Tensor, transposed: bool) -> torch.Tensor:
        from lycoris.modules import get_module, make_module

        layer = _standalone(w0, module.name, self.path)
        state = {
            f"{module.name}.{role}": self.store.get(key).to(torch.float64)
            for role, key in module.tensors.items()
        }
        cls, params = get_module(state, module.name)
        dora = state.get(f"{module.name}.dora_scale")
        if dora is not None:  # rebuilt below on its own axis
            params = tuple(None if p is dora else p for p in params)
        with torch.no_grad(), _quiet_lycoris():
            try:
                made = make_module(cls, params, module.name, layer)
            except RuntimeError:  # LyCORIS infers a LoKr factor that does not fit
                made = (
                    _lokr_by_shapes(cls, params, module, layer)
                    if cls.__name__ == ("LokrModule")
                    else None
                )
            if made is None:
                raise CheckpointFormatError(
                    f"{module.name}: LyCORIS cannot rebuild its {module.algo} from the file",
                    self.path,
                )
            made = made.double()
            for name, parameter in made.named_parameters():  # exact: saved in ≤ fp32
                saved = state.get(f"{module.name}.{name}")
                if saved is not None and saved.shape == parameter.shape:
                    parameter.copy_(saved)
            if dora is not None:
                _set_dora(made, dora)
            merged, _bias = made.get_merged_weight(multiplier=1.0, shape=made.shape)
        return merged.detach().to(torch.float64).reshape(w0.shape)


def open_network(path: Path, source: TensorStore, prefixes: dict[str, str]) -> LycorisAdapter:
    """The modules of a LyCORIS network file, each checked against LyCORIS' classes."""
    try:
        from lycoris.modules import get_module
    except ImportError:
        raise CheckpointFormatError(
            "LoHa/LoKr/full/Tucker LoCon networks are merged by LyCORIS itself, which is not "
            "installed",
            path,
            LYCORIS_EXTRA,
        ) from None
    parts: dict[str, dict[str, str]] = defaultdict(dict)
    for key in source.keys():
        name, _, role = key.partition(".")
        parts[name][role] = key
    modules = {}
    for name, roles in parts.items():
        prefix = next((p for p in prefixes if name.startswith(p)), None)
        if prefix is None:
            raise CheckpointFormatError(
                f"module {name!r} has none of the kohya/LyCORIS prefixes "
                f"({', '.join(p.rstrip('_') for p in prefixes)})",
                path,
            )
        state = {f"{name}.{role}": key for role, key in roles.items()}
        cls, _params = get_module(state, name)
        if cls is None or cls.__name__ not in _NAMES:
            what = cls.__name__ if cls is not None else "no LyCORIS module"
            raise CheckpointFormatError(
                f"{name}: its tensors ({', '.join(sorted(roles))}) make a {what}; wdanalysis "
                "reads LoRA, LoCon (Tucker too), LoHa, LoKr and full networks",
                path,
            )
        unknown = sorted(set(roles) - set(cls.weight_list))
        if unknown:
            raise CheckpointFormatError(
                f"unsupported tensor {name}.{unknown[0]} in a LyCORIS {_NAMES[cls.__name__]} "
                "module",
                path,
                "unknown tensors are refused; re-save the network with LyCORIS",
            )
        modules[name] = LycorisModule(
            name, component=prefixes[prefix], tensors=dict(roles), algo=cls.__name__
        )
    return LycorisAdapter(
        path, source, plain_config("kohya"), modules, ecosystem="kohya-ss/LyCORIS"
    )


def _standalone(w0: torch.Tensor, name: str, where: Path) -> nn.Module:
    """``nn.Linear`` or ``nn.Conv1d/2d/3d`` holding ``w0`` in float64 (LyCORIS reads the
    layer kind and its shape; the bias is not analysed)."""
    w = w0.detach().to(torch.float64)
    if w.dim() == 2:
        layer = nn.Linear(w.shape[1], w.shape[0], bias=False, dtype=torch.float64)
    elif 3 <= w.dim() <= 5:
        conv = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[w.dim() - 3]
        layer = conv(w.shape[1], w.shape[0], tuple(w.shape[2:]), bias=False, dtype=torch.float64)
    else:
        raise AdapterMismatchError(
            f"{name}: a LyCORIS module on a weight of shape {list(w.shape)}", where
        )
    with torch.no_grad():
        layer.weight.copy_(w)
    return layer


def _set_dora(made: nn.Module, scale: torch.Tensor) -> None:
    """DoRA (``dora_scale``) on the axis its saved shape says: ``(out, 1, …)`` with
    ``wd_on_out=True``, ``(1, in, …)`` without. (``make_module`` would rebuild it with
    LyCORIS' default axis only.)"""
    if not hasattr(made, "wd_on_out"):
        raise CheckpointFormatError(f"{made.lora_name}: a dora_scale on a module without DoRA")
    made.wd = True
    made.wd_on_out = not (scale.dim() > 1 and scale.shape[0] == 1 and scale.shape[1] > 1)
    made.dora_scale = nn.Parameter(scale.to(torch.float64), requires_grad=False)


_LOKR_ROLES = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")


def _lokr_by_shapes(cls, params, module: LycorisModule, layer: nn.Module):
    """A LoKr module built by LyCORIS' class with the factor whose Kronecker shapes are the
    saved ones. (``make_module_from_state_dict`` guesses the factor from the shapes and
    misses for some, e.g. a (6, 4, 3, 3) kernel split as (2, 1) ⊗ (3, 4, 3, 3).)"""
    w1, w1a, _w1b, w2, w2a, _w2b, _t1, t2, alpha, _dora = params
    rank = w1a.size(1) if w1a is not None else w2a.size(1) if w2a is not None else 1
    saved = dict(
        zip(
            ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b"),
            params[:6],
            strict=True,
        )
    )
    saved["lokr_t2"] = t2
    for factor in (-1, *range(1, max(layer.weight.shape[:2]) + 1)):
        try:
            made = cls(
                module.name,
                layer,
                1,
                rank,
                float(alpha),
                use_tucker=t2 is not None,
                decompose_both=w1 is None and w2 is None,
                factor=factor,
                full_matrix=w1a is None and w2a is None,
            )
        except (ValueError, RuntimeError, AssertionError):
            continue
        if all(
            (getattr(made, role, None) is None) == (saved[role] is None)
            and (
                saved[role] is None or tuple(getattr(made, role).shape) == tuple(saved[role].shape)
            )
            for role in _LOKR_ROLES
        ):
            for role in _LOKR_ROLES:
                if saved[role] is not None:
                    getattr(made, role).copy_(saved[role])
            return made
    return None


class _quiet_lycoris:
    """LyCORIS logs every module it builds; the merge needs none of it."""

    def __enter__(self):
        import logging

        self._logger = logging.getLogger("LyCORIS")
        self._level = self._logger.level
        self._logger.setLevel(logging.ERROR)

    def __exit__(self, *exc):
        self._logger.setLevel(self._level)
        return False
