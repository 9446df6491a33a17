"""PEFT tuners other than LoRA (LoHa, LoKr, VeRA, OFT, BOFT, IA³, AdaLoRA, HRA, …), read
with PEFT's own merge.

An adapter saved by ``save_pretrained`` names each tensor ``base_model.model.<module
path>.<tuner tensor>`` (the tensor's first component starts with the tuner's prefix,
``PEFT_TYPE_TO_PREFIX_MAPPING``: ``hada_`` for LoHa, ``vera_lambda_`` for VeRA, …) and the
tensors shared by all modules ``base_model.<name>`` (VeRA's ``vera_A``/``vera_B``, VBLoRA's
vector bank, RandLoRA's bases). Each adapted module's effective weight is formed by PEFT's
own layer on the untouched base weight in float64, one module at a time
(:mod:`wdanalysis.loaders.peft_merge`). Which ``peft_type`` is read, and why the others are
refused: :mod:`wdanalysis.loaders.tuner_kinds`.
"""

from __future__ import annotations

import copy
import math
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from wdanalysis.errors import AdapterMismatchError, CheckpointFormatError
from wdanalysis.loaders import peft_merge, tuner_kinds
from wdanalysis.loaders.checkpoint_kinds import AdapterCheckpoint
from wdanalysis.loaders.key_alignment import PEFT_PREFIX, KeyAligner
from wdanalysis.loaders.peft_adapter import (
    Adapter,
    AdapterConfig,
    AdapterModule,
    explain_unmatched,
)
from wdanalysis.storage.tensor_store import TensorStore

_SHARED_PREFIX = "base_model."


@dataclass
class TunerModule(AdapterModule):
    """One module a PEFT tuner adapts: the names of its tensors in the adapter file."""

    tensors: tuple[str, ...] = ()

    def merged_whole(self, axis: str, transposed: bool) -> bool:
        """Always: PEFT's layer merges the whole weight (rotations, Hadamard and
        Kronecker products, …), which the engine's streamed ``s·B@A`` cannot express."""
        return True


@dataclass
class TunerAdapter(Adapter):
    """A PEFT adapter of a tuner other than LoRA; its weights are merged by PEFT."""

    peft_type: str = ""
    shared: tuple[str, ...] = ()
    peft_config: object = None  # PEFT's own config object
    replacements: dict = field(default_factory=dict)  # modules_to_save: module → saved weight

    @property
    def method(self) -> str:
        return tuner_kinds.tuner_name(self.peft_type)

    @property
    def adapted(self) -> dict[str, AdapterModule]:
        return dict(self.modules)

    def describe(self) -> dict:
        name, how = tuner_kinds.MERGED[self.peft_type]
        info = {
            "format": f"PEFT {name} adapter (peft_type {self.peft_type}, {self.store.format})",
            "weight": f"{how}; formed by PEFT's own layer merge on W0 in float64",
            "base_model": self.config.raw.get("base_model_name_or_path") or "not named",
        }
        if self.shared:
            info["shared_tensors"] = sorted(k[len(_SHARED_PREFIX) :] for k in self.shared)
        return info

    def bind(self, aligner: KeyAligner, shapes: dict, transposed) -> dict:
        bound: dict[str, AdapterModule] = {}
        unmatched, norms = [], []
        for name, module in self.modules.items():
            base_key = aligner.find(name + ".weight")
            if base_key is None and module.replacement and not module.tensors:
                warnings.warn(  # e.g. a task head that the base model does not have
                    f"{self.path}: saved module {name!r} (modules_to_save) is not in the base "
                    "model and is left out",
                    stacklevel=3,
                )
                continue
            if base_key is None:
                unmatched.append(name)
                continue
            if len(shapes[base_key]) < 2 and self.peft_type == "LN_TUNING":
                norms.append(name)  # a norm's trained copy: a vector, not a weight matrix
                continue
            if len(shapes[base_key]) < 2:
                raise AdapterMismatchError(
                    f"{name}: the {self.method} adapter adapts the base weight {base_key!r} "
                    f"of shape {list(shapes[base_key])}; expected a matrix or a kernel",
                    self.path,
                    "pass the base model this adapter was trained on",
                )
            bound[base_key] = module
        if unmatched:
            why, hint = explain_unmatched(unmatched[0], aligner.base_keys)
            raise AdapterMismatchError(
                f"{len(unmatched)} of {len(self.modules)} adapted modules match no base weight, "
                f"e.g. {unmatched[0]!r}: {why}",
                self.path,
                hint,
            )
        if norms:
            warnings.warn(
                f"{self.path}: the LN Tuning adapter trains {len(norms)} vector weight(s) "
                f"(norms, e.g. {norms[0]!r}), which are not weight matrices and are not "
                "analysed; the matrices it leaves alone are unchanged",
                stacklevel=3,
            )
        if getattr(self.peft_config, "proportional_parameters", False):
            self.peft_config = proportional_config(self.peft_config, bound, shapes)
        return bound

    def effective_weight(self, module, w0: torch.Tensor, transposed: bool) -> torch.Tensor:
        """``W'`` in float64 and the base's stored layout, as PEFT's layer merges it."""
        if module.replacement:
            return self.saved_weight(module, w0)
        layer = peft_merge.standalone_layer(module.name, w0, transposed)
        saved = {k: self.store.get(k) for k in (*module.tensors, *self.shared)}
        merged = peft_merge.merge_module(self.peft_config, module.name, layer, saved, self.path)
        return merged.reshape(w0.shape)


def open_tuner(path: Path, store: TensorStore, config: AdapterConfig, step) -> AdapterCheckpoint:
    """An adapter of a PEFT tuner, its tensors grouped by module and checked."""
    peft_type = str(config.raw["peft_type"]).upper()
    name = tuner_kinds.tuner_name(peft_type)
    peft_merge.require_peft(name, path)
    from peft.mapping import PEFT_TYPE_TO_PREFIX_MAPPING
    from peft.utils.peft_types import PeftType

    prefix = PEFT_TYPE_TO_PREFIX_MAPPING[PeftType(peft_type)]
    config_file = (path if path.is_dir() else path.parent) / "adapter_config.json"
    peft_config = peft_merge.peft_config(config.raw, config_file)
    if getattr(peft_config, "save_projection", True) is False:
        # PEFT regenerates the projections from a seed, sized by the largest adapted
        # module of the whole model: a one-module merge would draw other matrices
        raise CheckpointFormatError(
            f"the {name} adapter was saved with save_projection=False: its shared random "
            "projections are not in the file",
            config_file,
            "re-save the adapter with save_projection=True (the default)",
        )
    saved_whole = set(getattr(peft_config, "modules_to_save", None) or ())
    modules: dict[str, TunerModule] = {}
    shared = []
    for key in store.keys():
        if not key.startswith(PEFT_PREFIX):
            if not key.startswith(_SHARED_PREFIX):
                raise CheckpointFormatError(
                    f"adapter tensor {key!r} is not named as PEFT saves {name} adapters "
                    f"({PEFT_PREFIX}<module>.{prefix}…)",
                    path,
                    "re-save the adapter with PEFT's save_pretrained",
                )
            shared.append(key)
            continue
        parts = key[len(PEFT_PREFIX) :].split(".")
        at = next((i for i, part in enumerate(parts) if part.startswith(prefix)), None)
        if at is None or at == 0:
            module = _saved_whole(key, parts, saved_whole, name, prefix, path)
            if module is None:
                continue  # a saved head's bias: only weights are analysed
            modules.setdefault(module, TunerModule(module)).replacement = key
            continue
        module = ".".join(parts[:at])
        found = modules.setdefault(module, TunerModule(module))
        found.tensors = (*found.tensors, key)
    if not modules:
        raise CheckpointFormatError(f"the {name} adapter holds no adapted module", path)
    adapter = TunerAdapter(
        path, store, config, modules, peft_type, tuple(shared), peft_config=peft_config
    )
    return AdapterCheckpoint(path, adapter, step)


def _saved_whole(key: str, parts: list[str], saved_whole: set, name: str, prefix, path):
    """The module of a whole saved weight of a ``modules_to_save`` module (a classifier
    head; ``None`` for its bias), or a refusal naming a tensor that is neither that nor
    one of the tuner's."""
    if parts[-1] == "bias" and any(p in saved_whole for p in parts[:-1]):
        return None
    if parts[-1] == "weight" and any(p in saved_whole for p in parts[:-1]):
        kept = [p for p in parts[:-1] if p != "modules_to_save"]
        return ".".join(kept)
    raise CheckpointFormatError(
        f"adapter tensor {key!r} is not a {name} tensor (its names start with {prefix!r}) "
        "nor a modules_to_save weight",
        path,
        "unknown tensors are refused; re-save the adapter with PEFT",
    )


def proportional_config(config, bound: dict, shapes: dict):
    """WaveFT's ``proportional_parameters``: each module's ``n_frequency`` is its share of
    a budget over every target module of the whole model, so a one-module merge would
    get another count. PEFT's own allocation is run on meta ``Linear`` layers of the base
    shapes, at the names of the adapted modules (every target module of the model is in
    the adapter), and the counts are given to each module as its ``n_frequency_pattern``."""
    from peft.tuners.waveft.model import WaveFTModel

    root = nn.Module()
    for base_key, module in bound.items():
        if not getattr(module, "tensors", ()):
            continue  # a modules_to_save weight: not a target
        out, n_in = shapes[base_key][0], math.prod(shapes[base_key][1:])
        node = root
        *parents, leaf = module.name.split(".")
        for part in parents:
            if not hasattr(node, part):
                node.add_module(part, nn.Module())
            node = getattr(node, part)
        node.add_module(leaf, nn.Linear(n_in, out, bias=False, device="meta"))
    counts = WaveFTModel._calculate_proportional_parameters(None, root, config)
    config = copy.deepcopy(config)
    config.proportional_parameters = False
    ordered = sorted(counts, key=len, reverse=True)  # a longer name matches first
    config.n_frequency_pattern = {re.escape(name): counts[name] for name in ordered}
    return config
