"""``compare`` under ``torchrun``: every rank reads and computes a share of the weights,
rank 0 assembles the one table.

Each rank opens the same inputs (headers and configs only, so every rank must see the same
paths: one node, or several nodes on a shared filesystem), takes a contiguous share of the
selected base weights, balanced by size, and streams only those matrices of the base and
of every checkpoint. The rows go to rank 0 (``gather_object`` over gloo, whatever the
compute device: they are small Python records), which builds the table exactly as one
process does; the caller (the CLI) then writes the files on rank 0 alone, atomically.

Failures: every rank reports its status first (``all_gather_object``), so a rank that
failed before or while computing never leaves the others waiting in a collective. When one
failed, every rank raises the first failing rank's error (rank order is weight order, as
in one process); per-checkpoint failures are merged and give the one-process
:class:`~wdanalysis.table.comparison.PartialResultError`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import pandas as pd

from wdanalysis.errors import WDAnalysisError
from wdanalysis.table.comparison import assemble_table, compute_rows, plan_comparison


@dataclass(frozen=True)
class CompareJob:
    """This process's place in a ``torchrun`` job."""

    rank: int
    size: int
    local_rank: int
    owns_group: bool = False  # joined by us: left again once the rows are gathered

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self, name: str) -> str:
        """``cuda`` means this rank's own GPU (``LOCAL_RANK``); ``cpu`` stays ``cpu``."""
        return f"cuda:{self.local_rank}" if name == "cuda" else name


def join_compare_job() -> CompareJob | None:
    """The job when launched by ``torchrun`` with 2 or more processes, else ``None``.

    Joins the process group (gloo) unless the caller already has.
    """
    names = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
    if not all(name in os.environ for name in names) or int(os.environ["WORLD_SIZE"]) < 2:
        return None
    import torch.distributed as dist

    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group("gloo")
    rank, size = dist.get_rank(), dist.get_world_size()
    return CompareJob(rank, size, int(os.environ["LOCAL_RANK"]), owns)


def weight_share(keys: Sequence[str], sizes: Sequence[int], rank: int, size: int) -> list[str]:
    """Rank ``rank``'s contiguous run of ``keys``: cut where the running total of ``sizes``
    crosses each ``rank / size`` of the whole, so shares hold about equal bytes."""
    total = sum(sizes) or 1
    share, running = [], 0
    for key, weight in zip(keys, sizes, strict=True):
        middle = running + weight / 2  # a key goes to the share its middle falls in
        if min(size - 1, int(middle * size / total)) == rank:
            share.append(key)
        running += weight
    return share


def compare_distributed(
    job: CompareJob,
    base,
    runs,
    modules=None,
    labels=None,
    axis: str = "out",
    fan_in_fan_out=None,
    progress: bool = True,
    device: str = "cpu",
    workers: int | None = None,
    whole=(),
    skip_bad: bool = False,
    weight_decay=None,
    decay_shrink=None,
) -> pd.DataFrame | None:
    """:func:`~wdanalysis.table.comparison.compare` over the job: the table on rank 0,
    ``None`` on the other ranks. Same arguments, same result, same errors."""
    import torch
    import torch.distributed as dist

    device = job.device(device)
    if device.startswith("cuda") and torch.cuda.is_available():
        torch.cuda.set_device(torch.device(device))
    status: tuple = ("ok",)
    plan, rows, errors, failure = None, [], {}, None
    try:
        plan = plan_comparison(
            base,
            runs,
            modules,
            labels,
            axis,
            fan_in_fan_out,
            whole=whole,
            skip_bad=skip_bad,
            weight_decay=weight_decay,
            decay_shrink=decay_shrink,
        )
        sizes = [_numel(plan.shapes[key]) for key in plan.selected]
        share = weight_share(plan.selected, sizes, job.rank, job.size)
        rows, errors = compute_rows(plan, share, progress and job.is_main, device, workers)
    except Exception as error:  # every rank must still take part in the exchange below
        status = ("failed", _portable(error))
        failure = error
    try:
        statuses = [None] * job.size
        dist.all_gather_object(statuses, status)
        failed = [(rank, s[1]) for rank, s in enumerate(statuses) if s[0] == "failed"]
        if failed:
            rank, portable = failed[0]
            if rank == job.rank and not isinstance(failure, WDAnalysisError):
                raise failure  # a bug, not bad input: its traceback, on its own rank
            raise _rebuild(portable, rank)
        parts = [None] * job.size if job.is_main else None
        portable_errors = {index: _portable(error) for index, error in errors.items()}
        dist.gather_object((rows, portable_errors), parts, dst=0)
    finally:
        if job.owns_group:
            dist.destroy_process_group()
    if not job.is_main:
        return None
    return assemble_table(plan, *_merge(parts))


def _merge(parts) -> tuple[list[dict], dict[int, WDAnalysisError]]:
    """Rows in rank order (= weight order); per checkpoint the lowest rank's failure, the
    one a single process meets first."""
    rows, errors = [], {}
    for part_rows, part_errors in parts:
        rows.extend(part_rows)
        for index, portable in part_errors.items():
            errors.setdefault(index, _rebuild(portable, None))
    return rows, errors


def _numel(shape) -> int:
    count = 1
    for n in shape:
        count *= int(n)
    return count


def _portable(error: BaseException) -> tuple:
    """An error as plain values (exception subclasses with extra arguments do not pickle)."""
    if isinstance(error, WDAnalysisError):
        path = None if error.path is None else str(error.path)
        return (type(error).__name__, error.problem, path, error.hint)
    return ("WDAnalysisError", f"{type(error).__name__}: {error}", None, None)


def _error_classes() -> dict[str, type[WDAnalysisError]]:
    """Every error class built as (problem, path, hint), by name, wherever it is defined."""
    found, todo = {}, [WDAnalysisError]
    while todo:
        cls = todo.pop()
        if cls.__init__ is WDAnalysisError.__init__:
            found.setdefault(cls.__name__, cls)
        todo.extend(cls.__subclasses__())
    return found


def _rebuild(portable: tuple, rank: int | None) -> WDAnalysisError:
    name, problem, path, hint = portable
    cls = _error_classes().get(name, WDAnalysisError)
    if rank is not None and rank > 0:
        problem = f"rank {rank}: {problem}"
    return cls(problem, path, hint)
