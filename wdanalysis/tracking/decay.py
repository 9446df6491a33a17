"""The weight decay's shrink factor ``S`` of a model being trained, for the tracker's
``decay_shrink``/``delta_m_learned`` columns (issue 36).

Decoupled decay (``torch.optim.AdamW``, or ``Adam(decoupled_weight_decay=True)``) multiplies
every parameter of a group by ``1 − lr·wd`` at each update, the group's current ``lr``, so
``W_t = S_t·W_0 + L_t`` with ``S_t = Π (1 − lr_s·wd)`` and the magnitude change training
learned is ``mean_n |m_t[n] − S_t·m_0[n]|`` (:mod:`wdanalysis.loaders.decay_shrink`).

* The bundled trainer knows ``S`` at every step: its
  :class:`~wdanalysis.train.decay_record.ShrinkTracker` (``of(param)``).
* A ``transformers.Trainer`` callback multiplies the very factors the optimizer is about to
  apply, read from its ``param_groups`` just before each update (:class:`LiveShrink`); an
  update the optimizer skipped (fp16 overflow) is not counted.

Where ``S`` is unknown (an optimizer without decoupled decay, a run resumed by a callback
that did not see its first updates) the columns stay empty, with a note, as ``compare``
leaves them.
"""

from __future__ import annotations

from typing import Protocol

import torch

from wdanalysis.table.decay import carrier


class ShrinkSource(Protocol):
    def of(self, param: torch.Tensor) -> float | None:
        """``S`` of ``param`` now (1 for a parameter in no group: never decayed)."""


def inner_optimizer(optimizer):
    """The torch optimizer under accelerate's or DeepSpeed's wrapper."""
    while hasattr(optimizer, "optimizer") and not hasattr(optimizer, "param_groups"):
        optimizer = optimizer.optimizer
    inner = getattr(optimizer, "optimizer", None)
    return inner if isinstance(inner, torch.optim.Optimizer) else optimizer


def decoupled(optimizer) -> str:
    """Why ``optimizer``'s decay is not a known decoupled ``1 − lr·wd`` (empty: it is)."""
    if isinstance(optimizer, torch.optim.AdamW):
        return ""
    groups = getattr(optimizer, "param_groups", None) or []
    if isinstance(optimizer, torch.optim.Adam) and all(
        g.get("decoupled_weight_decay") for g in groups
    ):
        return ""
    if groups and all(float(g.get("weight_decay", 0.0)) == 0.0 for g in groups):
        return ""  # no decay at all: S = 1 whatever the optimizer
    return f"{type(optimizer).__name__} is not an optimizer with known decoupled weight decay"


class LiveShrink:
    """``S`` per parameter, multiplied from the optimizer's groups at every update."""

    def __init__(self) -> None:
        self.shrink: dict[int, float] = {}
        self.pending: dict[int, float | None] | None = None
        self.updates = 0  # updates counted (the optimizer did not skip them)
        self.calls = 0  # updates announced by before_update
        self.unknown = ""  # why S is unknown; empty while it is known

    def before_update(self, optimizer) -> None:
        """The factors of the update about to run (``on_pre_optimizer_step``)."""
        self.calls += 1
        inner = inner_optimizer(optimizer)
        why = decoupled(inner)
        if why:
            self.unknown = why
            return
        self.pending = {}
        for group in inner.param_groups:
            lr, wd = float(group["lr"]), float(group["weight_decay"])
            for param in group["params"]:
                self.pending[id(param)] = None if wd == 0 else 1 - lr * wd

    def after_update(self, optimizer) -> None:
        """Count the update unless the optimizer skipped it (``on_optimizer_step``)."""
        pending, self.pending = self.pending, None
        if pending is None or getattr(optimizer, "step_was_skipped", False):
            return
        for key, factor in pending.items():
            if factor is not None:  # wd = 0: no multiplication, exactly as AdamW
                self.shrink[key] = self.shrink.get(key, 1.0) * factor
        self.updates += 1

    def of(self, param: torch.Tensor) -> float | None:
        return None if self.unknown else self.shrink.get(id(param), 1.0)


def fill(live, keys, source: ShrinkSource | None) -> str:
    """Set ``live.bound.decay_shrink`` for ``keys`` from ``source``; returns why it stays
    empty for some (empty when every key has its ``S``)."""
    bound = live.bound
    bound.decay_shrink.clear()
    if source is None:
        return "no decay record (pass the optimizer's shrink source)"
    why = getattr(source, "unknown", "")
    if why:
        return why
    missing = ""
    for key in keys:
        found = carrier(bound, key)
        if isinstance(found, float):
            bound.decay_shrink[key] = found
            continue
        param = _held(bound, found) if found is not None else None
        shrink = None if param is None else source.of(param)
        if shrink is None:
            missing = missing or f"no known S for {key}"
        else:
            bound.decay_shrink[key] = float(shrink)
    return missing


def _held(bound, key: str):
    """The model's own tensor behind a live store's key (not a detached copy)."""
    checkpoint = bound.checkpoint
    store = checkpoint.adapter.store if hasattr(checkpoint, "adapter") else checkpoint.store
    return store.held(key) if hasattr(store, "held") else None
