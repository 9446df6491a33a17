"""The streaming engine's jobs: one (checkpoint, weight) comparison each, typed by where the
checkpoint's rows come from.

:func:`plan_job` picks the kind; :class:`~wdanalysis.engine.streaming.Engine` then streams
every block of base rows through the jobs of one weight:

* :class:`FileJob`: stored rows read from a safetensors file by the reader thread (``pread``);
* :class:`DenseJob`: a stored matrix read whole (``.bin``, a model in memory, a store that
  transforms on read), compared block by block;
* :class:`UnchangedJob`: a weight the adapter leaves alone (ΔM = ΔD = 0);
* :class:`AdapterJob`: a LoRA/DoRA update formed for the rows at hand, never ``W'`` whole;
* :class:`MergedJob`: a rare adapter layout, merged whole at the end
  (:meth:`~wdanalysis.loaders.peft_adapter.AdapterModule.merged_whole`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch

from wdanalysis.engine.decomposition import DecompositionChange, as_matrix
from wdanalysis.loaders.checkpoint_kinds import AdapterCheckpoint
from wdanalysis.loaders.layer_shapes import factor_matrices
from wdanalysis.loaders.peft_adapter import AdapterModule
from wdanalysis.storage.row_reader import Extent, extent_of
from wdanalysis.storage.store_protocol import WeightStore
from wdanalysis.weights.bound_checkpoint import BoundCheckpoint

# An adapter's factors on the compute device, in float64: ``A`` (r, in·k…), ``s·B``
# (out, r) and the DoRA magnitude; ``None`` where the module has none.
Factors = tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]


@dataclass(eq=False)
class Job:
    """One (checkpoint, weight) comparison: where its sums go, and what they came to."""

    index: int  # position of the checkpoint in the engine's ``bound``
    # Per vector Σa², Σa·d, Σd² (3, n_vectors), float64 on the compute device.
    sums: torch.Tensor | None = field(default=None, init=False)
    # one change, or one per part of a fused weight (engine.part_sums)
    changes: list[DecompositionChange] = field(default_factory=list, init=False)

    def release(self) -> None:
        """Drop the tensors this job holds once its change is computed."""
        self.sums = None


@dataclass(eq=False)
class FileJob(Job):
    """Stored rows that the reader thread streams from a safetensors file."""

    extent: Extent


@dataclass(eq=False)
class DenseJob(Job):
    """A stored matrix that cannot be streamed from a file: read whole, compared in blocks."""

    load: Callable[[], torch.Tensor]
    matrix: torch.Tensor | None = field(default=None, init=False)

    def read(self) -> None:
        self.matrix = as_matrix(self.load())


@dataclass(eq=False)
class UnchangedJob(Job):
    """A weight the adapter does not adapt: its change is computed from the base's sums."""


@dataclass(eq=False)
class AdapterJob(Job):
    """A LoRA update ``s·B@A`` (DoRA: with the magnitude ``m``), formed per block of rows."""

    module: AdapterModule
    dora: bool
    factors: Factors | None = field(default=None, init=False)

    def load_factors(self, store: WeightStore, device: torch.device) -> None:
        """``A``, ``s·B`` and ``m`` of the module, float64 on ``device``."""
        module, f64 = self.module, torch.float64
        a = b = m = None
        if module.lora_b:  # conv factors as (r, in·k…) and (out, r) matrices
            a, b = factor_matrices(store.get(module.lora_a), store.get(module.lora_b))
            a, b = a.to(device, f64), b.to(device, f64) * module.scaling
        if module.magnitude:
            m = store.get(module.magnitude).to(device, f64).reshape(-1)
        self.factors = (a, b, m)

    @property
    def magnitude(self) -> torch.Tensor | None:
        """DoRA's ``m`` once loaded: the new norms on the output axis."""
        return self.factors[2] if self.dora and self.factors else None

    def release(self) -> None:
        self.factors = None
        super().release()


@dataclass(eq=False)
class MergedJob(Job):
    """A rare adapter layout: merged whole by the adapter once every block is done."""

    module: AdapterModule


def plan_job(index: int, item: BoundCheckpoint, key: str, axis: str, transposed: bool) -> Job:
    """The job comparing checkpoint ``item`` (at ``index`` in ``bound``) on base ``key``.

    ``transposed``: whether the base stores ``key`` as (in, out).
    """
    ckpt = item.checkpoint
    if isinstance(ckpt, AdapterCheckpoint):
        module = item.keys.get(key)
        if module is None:
            return UnchangedJob(index)
        if module.merged_whole(axis, transposed):
            return MergedJob(index, module)
        return AdapterJob(index, module, dora=bool(module.magnitude))
    store: WeightStore = ckpt.store
    ckey = item.keys[key]
    extent = extent_of(store, ckey)
    added = item.rows_added.get(key, 0)  # a resized vocabulary: the base's rows only
    if extent is not None:
        return FileJob(index, _first_rows(extent, extent.shape[0] - added) if added else extent)
    if added:
        return DenseJob(index, lambda: store.get(ckey)[: store.shape(ckey)[0] - added])
    return DenseJob(index, lambda: store.get(ckey))


def _first_rows(extent: Extent, rows: int) -> Extent:
    """The leading ``rows`` of a stored matrix (row-major: one contiguous range)."""
    row_bytes = extent.nbytes // extent.shape[0]
    return replace(extent, nbytes=rows * row_bytes, shape=(rows, *extent.shape[1:]))
