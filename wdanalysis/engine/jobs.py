"""The streaming engine's jobs: one (checkpoint, weight) comparison each, typed by where the
checkpoint's rows come from.

:func:`plan_job` picks the kind; :class:`~wdanalysis.engine.streaming.Engine` then streams
every block of base rows through the jobs of one weight:

* :class:`FileJob`: stored rows read from a safetensors file by the reader thread (``pread``);
* :class:`DenseJob`: a stored matrix read whole (``.bin``, a model in memory, a store that
  transforms on read), compared block by block;
* :class:`UnchangedJob`: a weight the adapter leaves alone (ΔM = ΔD = 0);
* :class:`TokenJob`: PEFT trainable tokens, only the trained rows compared;
* :class:`AdapterJob`: a LoRA/DoRA update formed for the rows at hand, never ``W'`` whole;
* :class:`MergedJob`: a rare adapter layout, merged whole at the end
  (:meth:`~wdanalysis.loaders.peft_adapter.AdapterModule.merged_whole`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch

from wdanalysis.engine.decomposition import DecompositionChange, accumulate_sums, as_matrix
from wdanalysis.loaders.checkpoint_kinds import AdapterCheckpoint
from wdanalysis.loaders.layer_shapes import factor_matrices
from wdanalysis.loaders.peft_adapter import AdapterModule
from wdanalysis.storage.row_blocks import RowBlocks
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

    def read(self, shape: tuple[int, int]) -> None:
        """Read the matrix, as the engine streams it (``shape``: stream rows × columns)."""
        self.matrix = stream_matrix(self.load(), shape)


def stream_matrix(loaded, shape: tuple[int, int]):
    """A stored tensor as the ``shape`` matrix the engine slices rows of: the tensor itself,
    or rows read a block at a time where its store reads them so (:class:`RowBlocks`)."""
    if isinstance(loaded, RowBlocks):
        return loaded.view(*shape)
    return as_matrix(loaded).reshape(shape)


def dense_source(store: WeightStore, key: str):
    """What :func:`stream_matrix` takes for ``key``: its row blocks where the store offers
    them (FP8 dequantized on read), else the whole tensor."""
    row_blocks = getattr(store, "row_blocks", None)
    blocks = row_blocks(key) if row_blocks is not None else None
    return blocks if blocks is not None else store.get(key)


@dataclass(eq=False)
class UnchangedJob(Job):
    """A weight the adapter does not adapt: its change is computed from the base's sums."""


@dataclass(eq=False)
class AdapterJob(Job):
    """A LoRA update ``s·B@A`` (DoRA: with the magnitude ``m``), formed per block of rows."""

    module: AdapterModule
    dora: bool
    factors: Factors | None = field(default=None, init=False)
    # set by the engine: the update formed per block (DoRA on the input axis, parts of a
    # fused weight on it), or its sums from the factors (engine.adapter_sums; None: no B@A)
    formed: bool = field(default=True, init=False)
    low_rank: object | None = field(default=None, init=False)

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
        self.factors = self.low_rank = None
        super().release()


@dataclass(eq=False)
class TokenJob(Job):
    """PEFT trainable tokens on a table the adapter leaves otherwise alone: every other row
    equals the base's, so each block compares only the trained rows (PEFT's merge writes
    their values in, :func:`~wdanalysis.loaders.trainable_tokens.with_rows`)."""

    module: AdapterModule
    n_rows: int  # rows of the table, for negative indices
    positions: torch.Tensor | None = field(default=None, init=False)
    values: torch.Tensor | None = field(default=None, init=False)  # float64 rows

    def load_factors(self, store: WeightStore, device: torch.device) -> None:
        last = {i % self.n_rows: n for n, i in enumerate(self.module.token_indices)}
        rows = store.get(self.module.token_rows).to(device, torch.float64)
        self.positions = torch.tensor(sorted(last), dtype=torch.long, device=device)
        self.values = rows[torch.tensor([last[i] for i in sorted(last)], device=device)]

    def accumulate(self, a: torch.Tensor, start: int, mode: str, backend: str) -> set[str]:
        """Add ``Σa·d, Σd²`` of the trained rows among stored rows ``start:start+len(a)``."""
        inside = (self.positions >= start) & (self.positions < start + a.shape[0])
        if not inside.any():
            return set()
        local = self.positions[inside] - start
        x = a[local].to(torch.float64)
        d = (self.values[inside] - x).contiguous()
        part = torch.zeros(3, x.shape[0] if mode == "rows" else x.shape[1], dtype=torch.float64)
        used = {accumulate_sums(x, d, part.to(x.device), mode, False, backend)}
        if mode == "rows":
            self.sums[1:, local + start] += part[1:].to(self.sums.device)
        else:
            self.sums[1:] += part[1:].to(self.sums.device)
        return used

    def release(self) -> None:
        self.positions = self.values = None
        super().release()


@dataclass(eq=False)
class MergedJob(Job):
    """A rare adapter layout: merged whole by the adapter once every block is done."""

    module: AdapterModule


def plan_job(
    index: int, item: BoundCheckpoint, key: str, axis: str, transposed: bool, shape=None
) -> Job:
    """The job comparing checkpoint ``item`` (at ``index`` in ``bound``) on base ``key``.

    ``transposed``: whether the base stores ``key`` as (in, out); ``shape``: its shape.
    """
    ckpt = item.checkpoint
    if isinstance(ckpt, AdapterCheckpoint):
        module = item.keys.get(key)
        if module is None:
            return UnchangedJob(index)
        store = ckpt.adapter.store
        if not (module.lora_b or module.magnitude or module.saved_base):
            if module.token_rows and not module.replacement and shape and len(shape) == 2:
                return TokenJob(index, module, shape[0])
            if _streams_whole(store, module, shape):  # modules_to_save: a stored weight
                return _stored(index, store, module.replacement)
        if module.merged_whole(axis, transposed):
            return MergedJob(index, module)
        return AdapterJob(index, module, dora=bool(module.magnitude))
    added = item.rows_added.get(key, 0)  # a resized vocabulary: the base's rows only
    return _stored(index, ckpt.store, item.keys[key], added)


def _streams_whole(store: WeightStore, module: AdapterModule, shape) -> bool:
    """A ``modules_to_save`` weight read like a checkpoint's: same shape, float, as stored."""
    name = module.replacement
    if not name or module.token_rows or shape is None or store.shape(name) != tuple(shape):
        return False  # a resized table, say: the adapter's own merge decides
    dtype = store.dtype(name)
    return isinstance(dtype, torch.dtype) and dtype.is_floating_point


def _stored(index: int, store: WeightStore, key: str, added: int = 0) -> Job:
    """Rows read from the file where it allows (pread), else the tensor read whole;
    ``added`` trailing rows (tokens added to a vocabulary) are left out."""
    as_stored = getattr(store, "reads_as_stored", True)  # a view that transforms on read
    extent = extent_of(store, key) if as_stored else None
    if extent is not None:
        return FileJob(index, _first_rows(extent, extent.shape[0] - added) if added else extent)
    if added:
        return DenseJob(index, lambda: store.get(key)[: store.shape(key)[0] - added])
    return DenseJob(index, lambda: dense_source(store, key))


def _first_rows(extent: Extent, rows: int) -> Extent:
    """The leading ``rows`` of a stored matrix (row-major: one contiguous range)."""
    row_bytes = extent.nbytes // extent.shape[0]
    return replace(extent, nbytes=rows * row_bytes, shape=(rows, *extent.shape[1:]))


def profile_path(job: Job) -> str:
    """The path a job's CPU time is filed under (:mod:`wdanalysis.engine.cpu_profile`)."""
    if isinstance(job, AdapterJob):
        return "dora" if job.dora else "lora"
    return "tokens" if isinstance(job, TokenJob) else "ft"
