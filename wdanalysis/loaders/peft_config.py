"""Adapter configs: the parts of ``adapter_config.json`` that change the merged weight.

PEFT's ``LoraConfig`` (``r``, ``lora_alpha``, ``use_rslora``, ``use_dora``,
``rank_pattern``/``alpha_pattern`` with PEFT's key matching, ``fan_in_fan_out``), the DoRA
authors' ``peft_type: "DORA"`` configs, validated with one-line errors naming the file.
Every other ``LoraConfig`` field is classified, and refused where it changes the merged
weight in a way not read, by :mod:`wdanalysis.loaders.lora_fields`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from wdanalysis.errors import AdapterMismatchError, CheckpointFormatError
from wdanalysis.loaders import lora_fields, tuner_kinds
from wdanalysis.storage.safe_regex import check_pattern, peft_pattern_key
from wdanalysis.storage.small_files import read_json

SUPPORTED_PEFT_TYPES = {"LORA", "DORA"}


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
    # An init that changed the base ("pissa", "olora", "kasa"): loaders.lora_inits
    base_init: str | None = None
    notes: list[str] = field(default_factory=list)  # for inspect, e.g. aLoRA's activation

    def rank_and_scaling(self, module: str, actual_rank: int, where: Path) -> tuple[int, float]:
        if self.format == "dora-vlbart":  # the VL-BART code applies B@A unscaled
            return actual_rank, 1.0
        if self.format == "peft-tuner":  # merged by PEFT itself (loaders/peft_tuners.py)
            raise CheckpointFormatError(
                f"a {self.raw.get('peft_type')} adapter has no LoRA rank and scaling", where
            )
        rank = int(self.rank_pattern.get(_pattern_key(self.rank_pattern, module), self.r))
        alpha = float(
            self.alpha_pattern.get(_pattern_key(self.alpha_pattern, module), self.lora_alpha)
        )
        if rank != actual_rank:
            raise AdapterMismatchError(
                f"config gives rank {rank} for {module} but its lora_A has rank {actual_rank}",
                where,
                "check r / rank_pattern in adapter_config.json",
            )
        scale = alpha / math.sqrt(rank) if self.use_rslora else alpha / rank
        return rank, scale


def _pattern_key(patterns: dict, module: str) -> str | None:
    """PEFT's rule: a pattern key applies when ``(.*\\.)?(key)$`` matches the module name
    (matched by RE2 in linear time: :mod:`wdanalysis.storage.safe_regex`)."""
    return peft_pattern_key(patterns, module)


def read_adapter_config(path: Path) -> AdapterConfig:
    """Parse and validate ``adapter_config.json``."""
    try:
        raw = read_json(path)
    except OSError as error:
        raise CheckpointFormatError(
            f"cannot read adapter config: {error.strerror}",
            path,
            "check the path and its permissions",
        ) from None
    except ValueError as error:  # JSONDecodeError, UnicodeDecodeError
        raise CheckpointFormatError(
            f"malformed adapter_config.json: {error}", path, _FIX_CONFIG
        ) from None
    if not isinstance(raw, dict):
        raise CheckpointFormatError(
            "malformed adapter_config.json: not a JSON object", path, _FIX_CONFIG
        )
    if "peft_type" not in raw:  # PEFT reads the adapter's kind from it, and refuses too
        raise CheckpointFormatError(
            "adapter_config.json names no peft_type, so the kind of adapter is not known "
            "(PEFT itself refuses to load such a config)",
            path,
            'add the peft_type it was trained with, e.g. "peft_type": "LORA"',
        )
    peft_type = str(raw["peft_type"]).upper()
    if peft_type not in SUPPORTED_PEFT_TYPES:
        # PEFT's other tuners: merged by PEFT itself (wdanalysis.loaders.peft_tuners), or
        # refused here in one line saying why
        tuner_kinds.check_readable(raw, path)
        return AdapterConfig(
            format="peft-tuner",
            r=None,
            lora_alpha=None,
            fan_in_fan_out=bool(raw.get("fan_in_fan_out", False)),
            raw=raw,
        )
    r, alpha = raw.get("r"), raw.get("lora_alpha")
    if not _is_rank(r):
        raise CheckpointFormatError(
            f"r must be a positive integer, got {r!r}",
            path,
            "set r to the LoRA rank the adapter was trained with (lora_A has r rows)",
        )
    if not _is_number(alpha):
        raise CheckpointFormatError(
            f"lora_alpha is missing or not a number ({alpha!r})",
            path,
            "the scaling alpha/r cannot be known without it; set the lora_alpha used in training",
        )
    _check_patterns(raw, path)
    notes, base_init = [], None
    if peft_type == "LORA":  # every LoraConfig field classified (loaders.lora_fields)
        notes = lora_fields.check_lora_fields(raw, path)
        base_init = lora_fields.base_init(raw, path)
    magnitude_only = raw.get("Wdecompose_target_modules") or []
    if isinstance(magnitude_only, str):  # the authors' code also takes one regex (fullmatch)
        magnitude_only = [magnitude_only]
    if not isinstance(magnitude_only, list) or not all(isinstance(m, str) for m in magnitude_only):
        raise CheckpointFormatError(
            "Wdecompose_target_modules must be a module name, a regex or a list of names, "
            f"got {magnitude_only!r}",
            path,
            _FIX_CONFIG,
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
        magnitude_only_modules=list(magnitude_only),
        raw=raw,
        base_init=base_init,
        notes=notes,
    )


_FIX_CONFIG = "fix the JSON by hand or re-save the adapter with PEFT"


def _is_rank(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_patterns(raw: dict, path: Path) -> None:
    """``rank_pattern``/``alpha_pattern``: objects of regular expression → rank / alpha."""
    for field_name, valid, what in (
        ("rank_pattern", _is_rank, "a positive integer"),
        ("alpha_pattern", _is_number, "a number"),
    ):
        patterns = raw.get(field_name) or {}
        if not isinstance(patterns, dict):
            raise CheckpointFormatError(
                f"{field_name} must be an object, got {patterns!r}",
                path,
                _FIX_CONFIG,
            )
        for key, value in patterns.items():
            if not valid(value):
                raise CheckpointFormatError(
                    f"{field_name}[{key!r}] must be {what}, got {value!r}",
                    path,
                    _FIX_CONFIG,
                )
            check_pattern(key, f"{field_name} key", path)  # linear time, or refused


def refuse_missing_magnitude(config: AdapterConfig, modules: dict, where: Path) -> None:
    """``use_dora: true`` but a LoRA module without its ``lora_magnitude_vector``: PEFT would
    merge it with the magnitude of its init (the base's norms), neither DoRA as trained
    nor LoRA, so it is refused."""
    if config.format != "peft" or not config.use_dora:
        return
    missing = [name for name, m in modules.items() if m.lora_b and not m.magnitude]
    if missing:
        raise CheckpointFormatError(
            f"use_dora is true but {len(missing)} adapted module(s) have no "
            f"lora_magnitude_vector in the file, e.g. {missing[0]!r}: PEFT would merge them "
            "with the magnitude of its init, not as trained",
            where,
            "re-save the DoRA adapter with its magnitudes, or set use_dora to false if it "
            "was trained as plain LoRA",
        )


VLBART_CONFIG = AdapterConfig(format="dora-vlbart", r=None, lora_alpha=None, use_dora=True)
