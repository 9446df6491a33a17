"""Align weight names between a base model and a checkpoint saved from another wrapper.

The same matrix is ``model.layers.0.self_attn.q_proj.weight`` in a causal-LM file,
``layers.0.self_attn.q_proj.weight`` in a bare-model file, ``bert.encoder...`` in a
classification model and ``base_model.model.<module>`` in a PEFT adapter. Keys are matched
on their longest dotted suffix that identifies exactly one base key.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

PEFT_PREFIX = "base_model.model."


def strip_peft_prefix(name: str) -> str:
    return name[len(PEFT_PREFIX) :] if name.startswith(PEFT_PREFIX) else name


class KeyAligner:
    """Maps foreign names onto base-model keys by unique dotted suffix."""

    def __init__(self, base_keys: Iterable[str]):
        self.base_keys = set(base_keys)
        self._by_suffix: dict[str, list[str]] = defaultdict(list)
        for key in self.base_keys:
            parts = key.split(".")
            for start in range(len(parts) - 1):  # suffixes of two or more components
                self._by_suffix[".".join(parts[start:])].append(key)

    def find(self, name: str) -> str | None:
        """The base key that ``name`` denotes, or ``None`` when none or several fit."""
        found = self.matches(name)
        return found[0] if len(found) == 1 else None

    def matches(self, name: str) -> list[str]:
        """Every base key ``name`` fits by its longest matching dotted suffix (several when
        :meth:`find` finds it ambiguous)."""
        name = strip_peft_prefix(name)
        if name in self.base_keys:
            return [name]
        parts = name.split(".")
        for start in range(len(parts) - 1):
            found = self._by_suffix.get(".".join(parts[start:]))
            if found:
                return list(found)
        return []

    def map_keys(self, names: Iterable[str]) -> dict[str, str]:
        """base key → foreign name, for every foreign name that aligns with a base key."""
        mapped: dict[str, str] = {}
        for name in names:
            base = self.find(name)
            if base is not None and base not in mapped:
                mapped[base] = name
        return mapped
