"""The streaming engine: the lower layer shared by :func:`wdanalysis.compare` and the
training callback (:mod:`wdanalysis.tracking.tracker`). It imports nothing from the analysis.

Weight-major and block-wise: for each selected weight, the base matrix is read once in
blocks of rows, and each block is compared with the same rows of every checkpoint of every
run before the next block is read. Memory therefore holds a few blocks (a fixed budget,
whatever the model or matrix size), never a whole state dict, and never the base twice.

* Full checkpoints in safetensors are read with ``pread`` (``O_DIRECT`` for large uncached
  files) into a small pool of reusable buffers by two background threads
  (:mod:`wdanalysis.storage.row_reader`), so the disk keeps streaming while the kernel runs.
  ``.bin`` checkpoints go through :class:`~wdanalysis.storage.tensor_store.TensorStore`
  (mmap); in-memory weights (a model being trained) are compared where they lie.
* LoRA/DoRA adapters never materialise ``W'`` nor even ``d = s·B@A``: ``Σa·d`` and ``Σd²``
  come from the factors and one float64 projection of the base rows
  (:mod:`wdanalysis.engine.adapter_sums`). A DoRA merge ``m·V/‖V‖`` rescales each output row
  to norm ``|m|`` without turning it, so on the output axis its ΔD is that of
  ``V = W0 + s·B@A`` and its ΔM is ``| |m| − ‖W0‖ |``, both exact.
* Per vector (per part of a fused weight: :mod:`wdanalysis.engine.part_sums`) the sums
  ``Σa², Σa·d, Σd²`` are accumulated in float64 (``decomposition.accumulate_sums``).
A row larger than a block (stacked experts of an FT run) is streamed in pieces
(:mod:`wdanalysis.engine.row_pieces`); ``modules_to_save`` weights stream like a
checkpoint's, trainable tokens compare only their rows. Each (checkpoint, weight) pair is a
job (:mod:`wdanalysis.engine.jobs`); a checkpoint whose own data fails is skipped from then
on and its error returned by :meth:`Engine.run`; a failure of the base stops the run.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor

import torch

from wdanalysis.engine import adapter_sums, cpu_profile, part_sums
from wdanalysis.engine import c_kernel as kernel
from wdanalysis.engine.decomposition import DecompositionChange, vector_mode
from wdanalysis.engine.jobs import (
    AdapterJob,
    DenseJob,
    FileJob,
    Job,
    MergedJob,
    TokenJob,
    UnchangedJob,
    dense_source,
    plan_job,
    profile_path,
    stream_matrix,
)
from wdanalysis.engine.row_pieces import Block, Geometry, accumulate_block, geometry, itemsize
from wdanalysis.errors import NumericalError, WDAnalysisError
from wdanalysis.loaders.checkpoint_kinds import FullModel
from wdanalysis.storage.row_reader import (
    Reader,
    as_matrix,
    extent_of,
    read_error,
    slice_request,
)
from wdanalysis.weights.bound_checkpoint import (
    BoundCheckpoint,
    effective_weight,
    file_of,
    require_finite,
    source_of,
)
from wdanalysis.weights.fused import Part

MEMORY_BUDGET = 256 << 20  # bytes of read buffers in flight, whatever the model size
MAX_BLOCK = 32 << 20  # largest single read
MIN_BLOCK = 4 << 20

# on_result(base key, checkpoint, its change or None: that checkpoint failed)
OnResult = Callable[[str, BoundCheckpoint, DecompositionChange | None], None]


class Engine:
    """Computes ΔM/ΔD for every (weight, checkpoint) pair; see the module docstring."""

    def __init__(
        self,
        base: FullModel,
        bound: list[BoundCheckpoint],
        axis: str,
        transposed: Callable[[str], bool],  # base key -> stored (in, out)
        device: str | torch.device = "cpu",
        workers: int = 1,
        budget: int | None = None,
        parts: Mapping[str, Sequence[Part]] | None = None,  # fused key -> its parts to report
    ):
        self.base, self.bound, self.axis, self.transposed = base, bound, axis, transposed
        self.parts = dict(parts or {})
        self._key_parts: Sequence[Part] | None = None  # those of the weight being streamed
        self.budget = budget  # bytes of read buffers; None: MEMORY_BUDGET
        # The failures of the run in progress (or the last one), by position in ``bound``;
        # kept here, not written into the caller's checkpoints, and returned by ``run``.
        self.failures: dict[int, WDAnalysisError] = {}
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise NumericalError(
                "device 'cuda' was asked for but torch sees no GPU", None, "use --device cpu"
            )
        self.backend = "auto" if self.device.type == "cpu" else "torch"
        self.backends_used: set[str] = set()  # "fused" / "torch": what the sums ran on
        self.workers = max(1, int(workers))
        self.profile = cpu_profile.CpuProfile()  # CPU by path (engine.cpu_profile)

    # -- planning -------------------------------------------------------------------

    def _jobs(self, key: str) -> list[Job]:
        transposed, shape = self.transposed(key), tuple(self.base.store.shape(key))
        return [
            plan_job(index, item, key, self.axis, transposed, shape)
            for index, item in enumerate(self.bound)
        ]

    def _geometry(self, key: str, jobs: list[Job]) -> Geometry:
        """Rows in pieces only where every job reads stored rows (no adapter maths)."""
        splittable = key not in self.parts and all(
            isinstance(j, (FileJob, DenseJob, UnchangedJob)) for j in jobs
        )
        return geometry(self.base.store.shape(key), MAX_BLOCK, splittable)

    def run(self, keys: list[str], on_result: OnResult) -> dict[int, WDAnalysisError]:
        """Compare every checkpoint on every weight of ``keys``; returns the failures.

        ``on_result(key, item, change)`` is called for each (weight, checkpoint) as soon as
        it is done, with ``change`` None when that checkpoint has failed (so that progress
        still advances); a fused weight gets one per part (``change.part``). The returned
        dict maps a failed checkpoint's position in ``bound`` to its first error.
        """
        self.failures = {}
        self.profile = cpu_profile.last = cpu_profile.CpuProfile()
        keys = sorted(keys, key=self._position)
        plans = [(key, self._jobs(key)) for key in keys]
        self._geometries = {key: self._geometry(key, jobs) for key, jobs in plans}
        n_file = max([1] + [sum(isinstance(j, FileJob) for j in jobs) for _, jobs in plans])
        block_bytes = self._block_bytes(n_file)
        blocks = [self._blocks(key, jobs, block_bytes) for key, jobs in plans]
        row_bytes = max([1] + [self._geometries[key].stream_cols * 8 for key in keys])
        size = max(block_bytes, row_bytes)
        requests = self._requests(plans, blocks)
        n_buffers = max(3, (self.budget or MEMORY_BUDGET) // size)
        n_buffers = max(n_buffers, (n_file + 2) if self.workers > 1 else 3)
        pin = self.device.type == "cuda"
        trace = cpu_profile.timeline.record if cpu_profile.timeline is not None else None
        reader = Reader(requests, n_buffers, size, pin, trace)
        pool = ThreadPoolExecutor(self.workers) if self.workers > 1 else None
        threads = self._threads = cpu_profile.one_torch_thread(self.device)  # workers = threads
        try:
            for (key, jobs), rows_per_block in zip(plans, blocks, strict=True):
                for job, change in self._run_key(key, jobs, rows_per_block, reader, pool):
                    on_result(key, self.bound[job.index], change)  # change None: failed
        finally:
            cpu_profile.restore_torch_threads(threads)
            reader.close()
            if pool is not None:
                pool.shutdown()
            self.profile.add("read", reader.cpu_seconds, reader.bytes_read)
        return self.failures

    def _position(self, key: str):
        extent = extent_of(self.base.store, key)
        return (str(extent.file), extent.offset) if extent else ("", 0)

    def _block_bytes(self, n_file: int) -> int:
        budget = self.budget or MEMORY_BUDGET
        per = budget // (n_file + 3) if self.workers > 1 else budget // 8
        return max(MIN_BLOCK, min(MAX_BLOCK, per))

    def _blocks(self, key: str, jobs: list[Job], block_bytes: int) -> int:
        """Stream rows per block, so that no read exceeds ``block_bytes``."""
        shape = self._geometries[key]
        widest = max(
            [itemsize(self.base.store.dtype(key))]
            + [j.extent.dtype.itemsize for j in jobs if isinstance(j, FileJob)]
        )
        return max(1, min(shape.stream_rows, block_bytes // (shape.stream_cols * widest)))

    def _requests(self, plans, blocks):
        for (key, jobs), per_block in zip(plans, blocks, strict=True):
            base_extent = extent_of(self.base.store, key)
            rows = self._geometries[key].stream_rows
            for start in range(0, rows, per_block):
                n = min(per_block, rows - start)
                if base_extent is not None:
                    yield slice_request(base_extent, rows, start, n)
                for job in jobs:
                    if isinstance(job, FileJob):
                        yield slice_request(job.extent, rows, start, n)

    def _run_key(self, key, jobs, per_block, reader: Reader, pool):
        """Stream one weight: every block of base rows against the same rows of every job."""
        transposed = self.transposed(key)
        mode = vector_mode(self.axis, transposed)
        shape = self._geometries[key]
        rows, cols = shape.stream_rows, shape.stream_cols
        self._key_parts = self.parts.get(key)
        self._prepare_jobs(jobs, shape, mode, transposed)
        base_sums = part_sums.new_sums(self._key_parts, self.axis, shape.vectors(mode), self.device)
        base_extent = extent_of(self.base.store, key)
        base_dense = None
        if base_extent is None:
            base_dense = stream_matrix(dense_source(self.base.store, key), (rows, cols))
        for start in range(0, rows, per_block):
            n = min(per_block, rows - start)
            block = Block(key, start, n, cols, mode, transposed, shape.pieces)
            base_buf, a = self._base_block(reader, block, base_extent, base_dense)
            args = (a, base_sums, block)  # the base's own sums: beside the jobs' in a pool
            pending = pool.submit(self._base_sums, *args) if pool else self._base_sums(*args)
            self._compare_block(block, a, jobs, reader, pool)
            _ = pending.result() if pending is not None else None
            if base_buf is not None:
                reader.release(base_buf)
        if not torch.isfinite(base_sums).all():
            self._check_base(key)
        for job in jobs:
            if isinstance(job, DenseJob):
                job.matrix = None  # before finishing: a NaN report reads the weight again
            if job.index not in self.failures:
                self._guard(job, self._finish_job, key, job, base_sums, mode)
            job.release()
            failed = [None] * len(self._key_parts or [None])
            yield from ((job, c) for c in (failed if job.index in self.failures else job.changes))

    def _base_sums(self, a, base_sums, block: Block) -> None:
        with self.profile.timed("base", a.numel() * a.element_size()):
            self._accumulate(a, a, base_sums, block, True)

    def _prepare_jobs(self, jobs: list[Job], shape: Geometry, mode: str, transposed) -> None:
        """Zero each job's sums; load what is read whole (.bin matrices, adapter factors)."""
        for job in jobs:
            job.sums = part_sums.new_sums(
                self._key_parts, self.axis, shape.vectors(mode), self.device
            )
            if job.index in self.failures:
                continue
            if isinstance(job, DenseJob):
                self._guard(job, job.read, (shape.stream_rows, shape.stream_cols))
            elif isinstance(job, (AdapterJob, TokenJob)):
                store = self.bound[job.index].checkpoint.adapter.store
                with self.profile.timed(profile_path(job)):
                    self._guard(job, job.load_factors, store, self.device)
                    if isinstance(job, AdapterJob) and job.index not in self.failures:
                        adapter_sums.plan(job, self.axis, mode, transposed)

    def _base_block(self, reader: Reader, block: Block, extent, dense):
        """The base rows of ``block`` (and the buffer holding them, to release later)."""
        if extent is None:
            return None, self._to_device(dense[block.start : block.start + block.n])
        buf, error = reader.get()
        if error is not None:
            reader.release(buf)
            raise read_error(block.key, extent, error)
        return buf, self._to_device(as_matrix(buf, extent, block.n, block.cols))

    def _compare_block(self, block: Block, a, jobs: list[Job], reader: Reader, pool) -> None:
        """Accumulate every live job's sums for this block.

        Each job starts as soon as its input is there: adapters and in-memory matrices at
        once (they need only the base rows), each file job when its read arrives, so the
        workers compute while the main thread still waits for the block's other reads.
        Every file job's buffer is taken from the reader, even for a failed checkpoint, so
        that reads stay in step with the schedule, and given back as soon as that job's
        block is done (the reader refills it while the other jobs still compute).
        """
        futures = []

        def start(task) -> None:
            if pool is None:
                self._compare_release(block, a, reader, task)
            else:
                futures.append(pool.submit(self._compare_release, block, a, reader, task))

        for job in sorted(jobs, key=lambda j: isinstance(j, FileJob)):  # reads in job order
            live = job.index not in self.failures
            if isinstance(job, FileJob):
                buf, error = reader.get()
                if live and error is not None:
                    self.failures[job.index] = read_error(block.key, job.extent, error)
                    live = False
                if live:
                    start((job, as_matrix(buf, job.extent, block.n, block.cols), buf))
                else:
                    reader.release(buf)
            elif live and isinstance(job, DenseJob):
                start((job, job.matrix[block.start : block.start + block.n], None))
            elif live and isinstance(job, (AdapterJob, TokenJob)):
                start((job, None, None))
        for future in futures:
            future.result()

    def _compare_release(self, block: Block, a, reader: Reader, task) -> None:
        """One job's block (:meth:`_compare`), then its read buffer back to the reader."""
        job, b, buf = task
        try:
            self._guard(job, self._compare, block, a, (job, b))
        finally:
            if buf is not None:
                reader.release(buf)

    def _compare(self, block: Block, a, task) -> None:
        """One job's sums for one block: a stored matrix, or an adapter's update."""
        job, b = task
        with self.profile.timed(profile_path(job), (a if b is None else b).nbytes):
            if isinstance(job, TokenJob):
                self.backends_used |= job.accumulate(a, block.start, block.mode, self.backend)
            elif b is None:
                self._adapter_block(job, a, block.mode, block.start, block.n, block.transposed)
            else:
                self._accumulate(a, self._to_device(b), job.sums, block, True)

    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        return t if self.device.type == "cpu" else t.to(self.device)

    def _guard(self, job: Job, fn: Callable[..., None], *args) -> None:
        """Run ``fn``; a checkpoint's own error marks that checkpoint failed, not the run."""
        try:
            fn(*args)
        except WDAnalysisError as error:
            self.failures[job.index] = error

    def _finish_job(self, key, job, base_sums, mode) -> None:
        job.changes = self._finish(key, job, base_sums, mode)

    def _accumulate(self, a, b, sums, block: Block, diff: bool) -> None:
        mode, start, pieces = block.mode, block.start, block.pieces
        if sums.dim() == 3:  # the parts of a fused weight, input axis (engine.part_sums)
            args = (self._key_parts, mode, start, block.n, diff, self.backend)
            self.backends_used |= part_sums.accumulate_parts(a, b, sums, *args)
            return
        self.backends_used |= accumulate_block(a, b, sums, mode, start, pieces, diff, self.backend)

    def describe_backend(self) -> str:
        """Which backend computed the sums of the last run, for the run's records."""
        return kernel.describe_backends(self.backends_used, self.device)

    def _adapter_block(self, job: AdapterJob, a, mode, start, n, transposed) -> None:
        """Sums for the stored rows ``start:start+n`` of an adapted weight."""

        def accumulate(rows, d, first):  # a formed update's sums, as a file block's
            block = Block("", first, rows.shape[0], rows.shape[1], mode, transposed)
            self._accumulate(rows, d, job.sums, block, False)

        used = adapter_sums.add_block(job, a, start, self.axis, transposed, accumulate)
        self.backends_used |= used

    def _finish(self, key, job: Job, base_sums, mode) -> list[DecompositionChange]:
        if isinstance(job, MergedJob):
            return self._effective(key, job, mode)
        sums = job.sums
        if isinstance(job, UnchangedJob):
            sums = base_sums.clone()
            sums[..., 1:, :].zero_()
        elif isinstance(job, TokenJob):  # only the trained rows moved: Σa² is the base's
            sums[..., 0, :] = base_sums[..., 0, :]
        elif isinstance(job, AdapterJob) and not job.formed:  # Σa·d, Σd² of the factors
            adapter_sums.complete(job, base_sums)
        magnitude = job.magnitude if isinstance(job, AdapterJob) else None
        if not torch.isfinite(sums).all() or (
            magnitude is not None and not torch.isfinite(magnitude).all()
        ):
            self._report_non_finite(key, self.bound[job.index])
        new_norm = magnitude if self.axis == "out" else None
        shrink = self.bound[job.index].decay_shrink.get(key)  # weight decay's S, if known
        return part_sums.changes(sums, self._key_parts, new_norm, shrink)

    def _effective(self, key, job: MergedJob, mode) -> list[DecompositionChange]:
        """Whole-matrix fallback for the rare adapter layouts (``AdapterModule.merged_whole``)."""
        item = self.bound[job.index]
        w0 = self.base.store.get(key)
        with cpu_profile.caller_threads(self._threads):  # PEFT's float32 maths, as PEFT runs it
            wt = effective_weight(item, key, w0, self.transposed)
        w0, wt, parts = w0.to(self.device), wt.to(self.device), self._key_parts
        sums = part_sums.whole_sums(w0, wt, mode, parts, self.axis, self.backend)
        if not torch.isfinite(sums).all():
            self._report_non_finite(key, item)
        return part_sums.changes(sums, parts, shrink=item.decay_shrink.get(key))

    def _check_base(self, key) -> None:
        w0 = self.base.store.get(key)
        require_finite(w0, key, file_of(self.base.store, key), "re-download the base model")
        raise NumericalError(
            f"weight {key!r}: its sums overflowed float64 (values beyond ~1e150)",
            file_of(self.base.store, key),
        )

    def _report_non_finite(self, key, item) -> None:
        """Count the checkpoint's NaN/Inf values, with the same message as the dense path."""
        w0 = self.base.store.get(key)
        wt = effective_weight(item, key, w0, self.transposed)
        require_finite(wt, key, source_of(item, key))
        raise NumericalError(
            f"weight {key!r}: its sums overflowed float64 (values beyond ~1e150)",
            source_of(item, key),
            "rescale the weights",
        )
