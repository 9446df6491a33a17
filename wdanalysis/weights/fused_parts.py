"""The pieces every fused-projection layout is written with (:mod:`wdanalysis.weights.fused`,
:mod:`wdanalysis.weights.fused_rules`): a part of a stored weight as runs of output features,
and the helpers that read head counts from a ``config.json``."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from wdanalysis.storage.safe_regex import REGEX_CHARS
from wdanalysis.storage.safe_regex import search as safe_search

if TYPE_CHECKING:  # imported where used: reading a table (and drawing it) needs no torch
    import torch

__all__ = ["Missing", "Part", "config_int", "heads_of", "interleave", "qkv", "requested"]


@dataclass(frozen=True)
class Part:
    """One matrix of a fused weight: its name and its output features (``[start, stop)``)."""

    name: str
    runs: tuple[tuple[int, int], ...]

    @property
    def size(self) -> int:
        return sum(stop - start for start, stop in self.runs)

    def indices(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """The output features of this part, in order (a long tensor)."""
        import torch

        return torch.cat([torch.arange(a, b, device=device) for a, b in self.runs])


class Missing(Exception):
    """The config lacks what a layout needs (the message names it)."""


def interleave(groups: int, pattern: Sequence[tuple[str, int]]) -> tuple[Part, ...]:
    """``groups`` repetitions of ``pattern`` (name, size) along the output features."""
    runs: dict[str, list[tuple[int, int]]] = {name: [] for name, _ in pattern}
    offset = 0
    for _ in range(groups):
        for name, size in pattern:
            if runs[name] and runs[name][-1][1] == offset:  # adjacent: one range
                runs[name][-1] = (runs[name][-1][0], offset + size)
            else:
                runs[name].append((offset, offset + size))
            offset += size
    return tuple(Part(name, tuple(r)) for name, r in runs.items())


def config_int(config: dict, *names: str, default: int | None = None) -> int:
    """The first of ``names`` present in ``config`` (aliases of one field), as an int."""
    for name in names:
        value = config.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    if default is not None:
        return default
    raise Missing(f"config.json has no {' / '.join(names)}")


def heads_of(config: dict, hidden: int, *names: str) -> tuple[int, int]:
    heads = config_int(config, *names)
    if hidden % heads:
        raise Missing(f"hidden size {hidden} is not a multiple of {heads} heads")
    return heads, hidden // heads


def qkv(q: int, kv: int) -> list[tuple[str, int]]:
    return [("q_proj", q), ("k_proj", kv), ("v_proj", kv)]


def requested(key: str, modules: Sequence[str]) -> bool:
    """Whether ``key`` is named by ``modules``: a leaf name, a module path (or its tail), or
    a regular expression searched in the module path."""
    path = key[: -len(".weight")] if key.endswith(".weight") else key
    leaf = path.rsplit(".", 1)[-1]
    for name in modules:
        if name == leaf or name == path or path.endswith("." + name):
            return True
        if any(ch in name for ch in REGEX_CHARS) and safe_search(name, path):
            return True
    return False
