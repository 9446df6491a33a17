"""LoRA and DoRA adapters: parse their configs and rebuild effective weights exactly.

Formats read here (see ``shared/reference/formats-and-pitfalls.md``):

* PEFT ``LORA`` adapters, with or without ``use_dora`` (``lora_magnitude_vector``);
* the DoRA authors' LLM format (``peft_type: "DORA"``, ``weight_m_wdecomp.weight``);
* the DoRA authors' VL-BART state dicts (``weight_m``, bare ``lora_A``/``lora_B``).

The effective weight is always rebuilt from the untouched base matrix, one matrix at a time
and in float64, so merges never pile up across checkpoints and bf16 never rounds the update.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from wdanalysis.errors import AdapterMismatchError, CheckpointFormatError
from wdanalysis.keymatch import KeyAligner, strip_peft_prefix
from wdanalysis.tensors import TensorStore

# Suffix of a key → (role, is the module's own name before it).
_ROLE_SUFFIXES = (
    (".lora_A.weight", "A"),
    (".lora_B.weight", "B"),
    (".lora_magnitude_vector.weight", "m"),
    (".lora_magnitude_vector", "m"),
    (".weight_m_wdecomp.weight", "m"),
    (".weight_m", "m"),
    (".lora_A", "A"),
    (".lora_B", "B"),
)
_UNSUPPORTED_ROLES = ("lora_embedding_A", "lora_embedding_B", "lora_E", "hada_w", "lokr_w")
SUPPORTED_PEFT_TYPES = {"LORA", "DORA"}


@dataclass
class AdapterModule:
    """The adapter's pieces for one module, keyed by their names in the adapter file."""

    name: str  # module path without the PEFT prefix
    lora_a: str | None = None
    lora_b: str | None = None
    magnitude: str | None = None
    replacement: str | None = None  # a whole saved weight (PEFT modules_to_save)
    rank: int | None = None
    scaling: float = 1.0


@dataclass
class AdapterConfig:
    """The parts of an adapter config that change the merged weight."""

    format: str  # "peft", "dora-authors", "dora-vlbart"
    r: int | None
    lora_alpha: float | None
    use_rslora: bool = False
    use_dora: bool = False
    fan_in_fan_out: bool = False
    rank_pattern: dict = field(default_factory=dict)
    alpha_pattern: dict = field(default_factory=dict)
    target_modules: object = None
    magnitude_only_modules: list[str] = field(default_factory=list)
    raw: dict = field(default_factory=dict)

    def rank_and_scaling(self, module: str, actual_rank: int, where: Path) -> tuple[int, float]:
        if self.format == "dora-vlbart":  # the VL-BART code applies B@A unscaled
            return actual_rank, 1.0
        rank = int(self.rank_pattern.get(_pattern_key(self.rank_pattern, module), self.r))
        alpha = float(self.alpha_pattern.get(_pattern_key(self.alpha_pattern, module), self.lora_alpha))
        if rank != actual_rank:
            raise AdapterMismatchError(
                f"config gives rank {rank} for {module} but its lora_A has rank {actual_rank}",
                where,
                "check r / rank_pattern in adapter_config.json",
            )
        scale = alpha / math.sqrt(rank) if self.use_rslora else alpha / rank
        return rank, scale


def _pattern_key(patterns: dict, module: str) -> str | None:
    """PEFT's rule: a pattern key applies when ``(.*\\.)?(key)$`` matches the module name."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return None


def read_adapter_config(path: Path) -> AdapterConfig:
    """Parse and validate ``adapter_config.json``."""
    try:
        raw = json.loads(path.read_text())
    except OSError as error:
        raise CheckpointFormatError(f"cannot read adapter config: {error.strerror}", path) from None
    except ValueError as error:
        raise CheckpointFormatError(f"malformed adapter_config.json: {error}", path) from None
    if not isinstance(raw, dict):
        raise CheckpointFormatError("malformed adapter_config.json: not a JSON object", path)
    peft_type = str(raw.get("peft_type", "LORA")).upper()
    if peft_type not in SUPPORTED_PEFT_TYPES:
        raise CheckpointFormatError(
            f"unsupported peft_type {raw.get('peft_type')!r}",
            path,
            "wdanalysis reads LoRA and DoRA adapters (PEFT 'LORA', DoRA authors' 'DORA')",
        )
    r, alpha = raw.get("r"), raw.get("lora_alpha")
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        raise CheckpointFormatError(f"adapter_config.json: r must be a positive integer, got {r!r}", path)
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool):
        raise CheckpointFormatError(
            f"adapter_config.json: lora_alpha is missing or not a number ({alpha!r})",
            path,
            "the scaling alpha/r cannot be known without it",
        )
    return AdapterConfig(
        format="dora-authors" if peft_type == "DORA" else "peft",
        r=r,
        lora_alpha=float(alpha),
        use_rslora=bool(raw.get("use_rslora", False)),
        use_dora=bool(raw.get("use_dora", False)) or peft_type == "DORA",
        fan_in_fan_out=bool(raw.get("fan_in_fan_out", False)),
        rank_pattern=dict(raw.get("rank_pattern") or {}),
        alpha_pattern=dict(raw.get("alpha_pattern") or {}),
        target_modules=raw.get("target_modules"),
        magnitude_only_modules=list(raw.get("Wdecompose_target_modules") or []),
        raw=raw,
    )


VLBART_CONFIG = AdapterConfig(format="dora-vlbart", r=None, lora_alpha=None, use_dora=True)


def group_adapter_keys(keys: list[str], where: Path) -> dict[str, AdapterModule]:
    """Group adapter tensor names by the module they adapt."""
    modules: dict[str, AdapterModule] = {}
    for key in keys:
        if any(f".{role}" in key for role in _UNSUPPORTED_ROLES):
            raise CheckpointFormatError(
                f"unsupported adapter tensor {key!r} (embedding or non-LoRA adapter)", where
            )
        role, name = _role_of(key)
        module = modules.setdefault(name, AdapterModule(name))
        if role == "A":
            module.lora_a = key
        elif role == "B":
            module.lora_b = key
        elif role == "m":
            module.magnitude = key
        elif key.endswith(".weight"):
            module.replacement = key
    return modules


def _role_of(key: str) -> tuple[str, str]:
    for suffix, role in _ROLE_SUFFIXES:
        if key.endswith(suffix):
            return role, strip_peft_prefix(key[: -len(suffix)])
    stripped = strip_peft_prefix(key)
    stripped = stripped.replace(".modules_to_save.default.", ".").replace(".modules_to_save.", ".")
    name = stripped[: -len(".weight")] if stripped.endswith(".weight") else stripped
    return "other", name


@dataclass
class Adapter:
    """A LoRA/DoRA adapter over a base model, checked against that model's weights."""

    path: Path
    store: TensorStore
    config: AdapterConfig
    modules: dict[str, AdapterModule]

    @property
    def method(self) -> str:
        return "DoRA" if any(m.magnitude for m in self.modules.values()) else "LoRA"

    @property
    def adapted(self) -> dict[str, AdapterModule]:
        return {n: m for n, m in self.modules.items() if m.lora_b or m.magnitude}

    def bind(self, aligner: KeyAligner, shapes: dict[str, tuple[int, ...]], transposed) -> dict:
        """Map base keys to adapter modules; fail loudly on anything that does not fit."""
        bound: dict[str, AdapterModule] = {}
        unmatched = []
        for name, module in self.modules.items():
            base_key = aligner.find(name + ".weight")
            if base_key is None:
                if module.lora_b or module.magnitude:
                    unmatched.append(name)
                continue  # e.g. a task head saved with modules_to_save: not in the base
            self._check_module(module, shapes[base_key], transposed(base_key))
            bound[base_key] = module
        if unmatched:
            raise AdapterMismatchError(
                f"{len(unmatched)} adapted module(s) match no base weight, e.g. {unmatched[0]!r}",
                self.path,
                "is this adapter for another base model, or a key prefix the base lacks?",
            )
        return bound

    def _check_module(self, module: AdapterModule, shape, transposed: bool) -> None:
        out_features, in_features = _out_in(shape, transposed)
        if module.lora_a or module.lora_b:
            if not (module.lora_a and module.lora_b):
                raise AdapterMismatchError(f"{module.name} has only one of lora_A/lora_B", self.path)
            a_shape, b_shape = self.store.shape(module.lora_a), self.store.shape(module.lora_b)
            if len(a_shape) != 2 or len(b_shape) != 2:
                raise AdapterMismatchError(
                    f"{module.name}: only 2-D (Linear/Conv1D) LoRA factors are supported, "
                    f"got lora_A {list(a_shape)}",
                    self.path,
                )
            rank = a_shape[0]
            if b_shape != (out_features, rank) or a_shape[1] != in_features:
                raise AdapterMismatchError(
                    f"{module.name}: lora_B {list(b_shape)} @ lora_A {list(a_shape)} does not "
                    f"fit the base weight {list(shape)}",
                    self.path,
                    "this adapter was trained on a model of another size",
                )
            module.rank, module.scaling = self.config.rank_and_scaling(module.name, rank, self.path)
        if module.magnitude:
            m_shape = self.store.shape(module.magnitude)
            if math.prod(m_shape) != out_features:
                raise AdapterMismatchError(
                    f"{module.name}: magnitude has shape {list(m_shape)} but the base weight has "
                    f"{out_features} output features",
                    self.path,
                )
        adapted = module.lora_b or module.magnitude
        if module.replacement and not adapted and self.store.shape(module.replacement) != tuple(shape):
            raise AdapterMismatchError(
                f"{module.name}: saved weight {list(self.store.shape(module.replacement))} does "
                f"not match the base weight {list(shape)}",
                self.path,
            )

    def effective_weight(self, module: AdapterModule, w0: torch.Tensor, transposed: bool):
        """The merged weight in float64, in the base weight's stored layout.

        LoRA: ``W0 + s·B@A``; DoRA: ``m · V / ‖V‖`` with ``V = W0 + s·B@A`` and the norm
        taken per output feature, exactly as PEFT and the DoRA authors merge.
        """
        if not (module.lora_b or module.magnitude):
            return self.store.get(module.replacement).to(torch.float64)
        v = w0.to(torch.float64)
        v = v.T if transposed else v
        if module.lora_b:
            a = self.store.get(module.lora_a).to(torch.float64)
            b = self.store.get(module.lora_b).to(torch.float64)
            v = v + module.scaling * (b @ a)
        if module.magnitude:
            m = self.store.get(module.magnitude).to(torch.float64).reshape(-1, 1)
            v = m * (v / torch.linalg.vector_norm(v, dim=1, keepdim=True))
        return v.T if transposed else v


def _out_in(shape, transposed: bool) -> tuple[int, int]:
    if len(shape) != 2:
        raise AdapterMismatchError(f"adapted weight has shape {list(shape)}; expected a matrix")
    return (shape[1], shape[0]) if transposed else (shape[0], shape[1])
