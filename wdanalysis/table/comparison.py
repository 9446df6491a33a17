"""The analysis: base model + runs → tidy table of ΔM and ΔD per (run, step, weight).

The loop is weight-major: each selected base matrix is read once and compared with every
checkpoint of every run before the next one is read, so memory holds one base matrix and
one checkpoint matrix at a time and the base is never re-read per checkpoint.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import pandas as pd
from tqdm.auto import tqdm

from wdanalysis.engine.decomposition import AXES
from wdanalysis.engine.streaming import Engine
from wdanalysis.errors import WDAnalysisError
from wdanalysis.loaders.auto_base import base_named_by, is_auto
from wdanalysis.loaders.formats import prepare_base
from wdanalysis.loaders.named_adapters import open_runs
from wdanalysis.loaders.run_checks import left_out
from wdanalysis.loaders.run_names import unique_names
from wdanalysis.loaders.runs import (
    FullModel,
    Run,
    aligner_for,
    refuse_quantized,
)
from wdanalysis.table import decay, notices
from wdanalysis.table.binding import bind, check_base_dtypes
from wdanalysis.table.schema import COLUMNS, deltas_row
from wdanalysis.weights.bound_checkpoint import BoundCheckpoint
from wdanalysis.weights.fused import fused_layouts
from wdanalysis.weights.identity import identity_namer
from wdanalysis.weights.layout import stored_transposed
from wdanalysis.weights.selection import select_targets

RunsArg = str | Path | Sequence[str | Path] | Mapping[str, str | Path]


class PartialResultError(WDAnalysisError):
    """Some checkpoints failed while computing; ``table`` holds every other one, complete.

    ``failures`` lists ``(run name, step, error)``. Raised instead of returning the table so
    that a partial result is never taken for a whole one.
    """

    def __init__(self, table: pd.DataFrame, failures: list, total: int):
        self.table = table
        self.failures = failures
        super().__init__(
            f"{len(failures)} of {total} checkpoints failed and were left out of the table; "
            f"first: {failures[0][2]}",
            hint="every other checkpoint's rows are complete; fix or remove the failed "
            "checkpoints and rerun",
        )


def compare(
    base: str | Path,
    runs: RunsArg,
    modules: Sequence[str] | None = None,
    labels: Sequence[str] | None = None,
    axis: str = "out",
    fan_in_fan_out: bool | None = None,
    progress: bool = True,
    device: str = "cpu",
    workers: int | None = None,
    whole: Sequence[str] = (),
    skip_bad: bool = False,
    weight_decay: decay.WeightDecayArg = None,
    decay_shrink: decay.ShrinkArg = None,
) -> pd.DataFrame:
    """ΔM and ΔD of every selected weight, for every checkpoint of every run.

    Args:
        base: The pretrained model every run started from: a file or folder, a hub id
            ``org/name[@revision]`` found in the local Hugging Face cache (never
            downloaded), or ``"auto"``: the base the runs' adapters name in
            ``base_model_name_or_path``.
        runs: One path, a list of paths, or ``{label: path}``. A path is a run folder of
            ``checkpoint-N`` sub-folders or a single checkpoint (full model or adapter), or
            a cached hub id.
        modules: Leaf module names (``q_proj``) or paths/regexes; default: attention query
            and value projections. Fused projections (GPT-2 ``c_attn``, Phi-3 ``qkv_proj``,
            …) are split by the base's ``config.json`` into ``q_proj``/``k_proj``/``v_proj``
            (``gate_proj``/``up_proj``) rows (``wdanalysis.weights.fused``).
        labels: Display names, one per run: the ``label`` column, which figures, fits and
            printed tables name runs by; ``method`` stays the inferred one
            (``FT``/``LoRA``/``DoRA``). Default: the method. The keys of a
            ``{label: path}`` dict set it too.
        axis: ``"out"`` (default): one magnitude per output feature, as DoRA
            implementations store it; ``"in"``: one per input feature.
        fan_in_fan_out: Force (True) or forbid (False) the (in, out) GPT-2 ``Conv1D``
            layout; ``None`` infers it from ``config.json``, key names and adapter configs.
        progress: Show a progress bar.
        device: Where the ΔM/ΔD sums are computed: ``"cpu"`` (fused one-pass kernel when a
            C compiler is available, else torch) or ``"cuda"``. Both use float64
            arithmetic.
        workers: Threads computing the checkpoints of one block in parallel (1: one compute
            thread beside the reader thread). ``None``: 2 where there are 2 or more cores,
            which kept up with the disk in ``benchmarks/bench_streaming.py`` where 1 did
            not.
        whole: Fused weights (leaf names, paths or regexes) to analyse unsplit, one row
            each, their parts' rows averaged: a fused weight with no known split is
            otherwise refused (``--whole NAME``; ``docs/guides/architectures.md``).
        skip_bad: Leave out (with a warning) a checkpoint refused for its content instead
            of failing; checkpoints still being written are always skipped. Both are
            listed in ``table.attrs["left_out"]``.
        weight_decay: For runs without the bundled trainer's ``decay_shrink.json``: the
            decoupled weight decay (with the per-step learning rates of each checkpoint's
            ``trainer_state.json``), one value for every run or one per run
            (``wdanalysis.loaders.decay_shrink``).
        decay_shrink: The decay's shrink factor ``S`` itself per run (``"STEP:S,..."``).
            Both fill ``decay_shrink`` and ``delta_m_learned`` (empty, with a note in
            ``table.attrs["decay_notes"]``, where S is unknown).

    Returns:
        A long-format DataFrame with columns ``COLUMNS`` (one row per run, step, weight);
        ``table.attrs["backend"]`` says which backend computed the sums (the fused C kernel
        and its file, or torch and why), as ``run.json`` beside ``deltas.csv`` records it.

    Raises:
        WDAnalysisError: An input is missing, malformed or not understood (one line naming
            the file and the problem); nothing was computed.
        PartialResultError: Some checkpoints failed while computing; its ``table`` holds
            every other checkpoint's rows, complete.
    """
    notices.check_options(modules, workers)
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
    rows, errors = compute_rows(plan, plan.selected, progress, device, workers)
    return assemble_table(plan, rows, errors)


@dataclass
class ComparisonPlan:
    """What ``compare`` reads, decided before any matrix is: the opened base and runs, the
    selected base keys in reading order, and every checkpoint bound to its keys."""

    base_model: FullModel
    run_list: list[Run]
    selected: list[str]
    bound: list[BoundCheckpoint]
    axis: str
    transposed: Callable[[str], bool]
    shapes: dict[str, tuple[int, ...]]
    parts: dict = field(default_factory=dict)  # fused key -> its selected parts
    backend: str = ""  # what computed the sums (Engine.describe_backend), once computed
    decay_notes: list[str] = field(default_factory=list)  # runs whose decay S is unknown


def plan_comparison(
    base,
    runs: RunsArg,
    modules=None,
    labels=None,
    axis="out",
    fan_in_fan_out=None,
    whole=(),
    skip_bad=False,
    weight_decay: decay.WeightDecayArg = None,
    decay_shrink: decay.ShrinkArg = None,
) -> ComparisonPlan:
    """Open and check every input (headers and configs only); see :func:`compare`.
    ``skip_bad``: a checkpoint refused for its content is left out (listed in
    ``table.attrs["left_out"]``) instead of failing the comparison."""
    if axis not in AXES:
        raise WDAnalysisError(f"axis must be 'out' or 'in', got {axis!r}")
    notices.check_options(modules, None)
    whole = [whole] if isinstance(whole, str) else list(whole or ())
    notices.check_options(whole, None)
    run_list = _open_runs(runs, labels, skip_bad)
    decay_options = decay.run_options(run_list, weight_decay, decay_shrink)
    notices.note_quantized_training(run_list)
    if is_auto(base):
        base = base_named_by(run_list)
    base_model = notices.open_base_or_say_swapped(base, run_list)
    notices.warn_run_is_base(base_model, run_list)
    refuse_quantized(base_model.store, "base model")
    prepare_base(base_model, run_list)  # experts split, mlx-lm embeddings told apart
    shapes = {k: base_model.store.shape(k) for k in base_model.store.keys()}
    aligner = aligner_for(base_model)
    transposed = stored_transposed(base_model, run_list, fan_in_fan_out, aligner)
    fused = fused_layouts(base_model.path, shapes, transposed, whole)
    selected, parts = select_targets(shapes, modules, str(base), fused, whole)
    check_base_dtypes(base_model, selected)
    for key in selected:  # an undecidable layout is refused now, not mid-computation
        transposed(key)
    bound = [
        checkpoint
        for run in run_list
        for checkpoint in notices.once_per_run(
            run, lambda ckpt, run=run: bind(run, ckpt, shapes, selected, aligner, transposed)
        )
    ]
    notices.warn_rows_added(bound, selected, shapes)
    notes = decay.attach(bound, selected, decay_options, run_list)
    return ComparisonPlan(
        base_model, run_list, list(selected), bound, axis, transposed, shapes, parts, "", notes
    )


def compute_rows(
    plan: ComparisonPlan, keys: Sequence[str], progress=True, device="cpu", workers=None
) -> tuple[list[dict], dict[int, WDAnalysisError]]:
    """The rows of the base weights ``keys`` (all or a share of ``plan.selected``) for
    every checkpoint, and the failures by position in ``plan.bound``."""
    if workers is None:
        workers = min(2, os.cpu_count() or 1)
    notices.check_options(None, workers)
    rows, errors, plan.backend = _compute(
        plan.base_model,
        keys,
        plan.bound,
        plan.axis,
        plan.transposed,
        progress,
        device,
        workers,
        plan.parts,
    )
    return rows, errors


def assemble_table(
    plan: ComparisonPlan, rows: list[dict], errors: Mapping[int, WDAnalysisError]
) -> pd.DataFrame:
    """The sorted table; raises the error when every checkpoint failed, and
    :class:`PartialResultError` (holding the table of the others) when some did."""
    bound = plan.bound
    failed = [(bound[index], errors[index]) for index in sorted(errors)]  # in bound order
    if not failed:
        return _table(rows, plan.run_list, plan.backend, plan.decay_notes)
    if len(failed) == len(bound):
        raise failed[0][1]
    dropped = {(item.run.name, str(item.checkpoint.path)) for item, _ in failed}
    rows = [row for row in rows if (row["run"], row["checkpoint"]) not in dropped]
    failures = [(item.run.name, item.checkpoint.step, error) for item, error in failed]
    table = _table(rows, plan.run_list, plan.backend, plan.decay_notes)
    raise PartialResultError(table, failures, len(bound))


def _open_runs(runs: RunsArg, labels: Sequence[str] | None, skip_bad=False) -> list[Run]:
    if isinstance(runs, (str, Path)):
        runs = [runs]
    if isinstance(runs, Mapping):
        labels, runs = list(runs.keys()), list(runs.values())
    runs = list(runs)
    if not runs:
        raise WDAnalysisError("no runs given: pass at least one run folder or checkpoint")
    if labels is not None and len(labels) != len(runs):
        raise WDAnalysisError(f"got {len(labels)} labels for {len(runs)} runs")
    opened, given = [], []
    for path, label in zip(runs, labels or [None] * len(runs), strict=True):
        group = open_runs(path, skip_bad=skip_bad)  # several for a folder of named PEFT adapters
        given.append(group[0])
        for run in group:
            if len(group) == 1 or label is not None:
                run.label = label if len(group) == 1 else f"{label}/{run.label}"
            opened.append(run)
    unique_names(opened)
    notices.warn_duplicate_runs(given)  # per path given, not per named adapter
    return opened


def _compute(
    base, selected, bound, axis, transposed, progress, device="cpu", workers=1, parts=None
) -> tuple[list[dict], dict[int, WDAnalysisError], str]:
    """Stream every selected weight through every checkpoint (:mod:`wdanalysis.engine.streaming`).

    Returns the rows, the failures by position in ``bound`` and the backend that ran
    (:meth:`Engine.describe_backend`): a checkpoint whose own data
    fails (unreadable, NaN/Inf) is skipped from then on; a failure of the base stops the
    analysis.
    """
    rows = []
    parts = parts or {}
    bar = tqdm(
        total=sum(len(parts.get(key, [key])) for key in selected) * len(bound),
        desc="ΔM/ΔD",
        unit="matrix",
        disable=not progress,
        leave=False,
    )
    name_of = identity_namer(base)

    def on_result(key, item, change):
        if change is not None:
            name = name_of(key)
            if change.part is not None:  # a part of a fused weight: q_proj, k_proj, …
                name = replace(name, module=change.part)
            rows.append(_row(item, name, axis, change, item.decay_shrink.get(key)))
        bar.update()

    with bar:
        engine = Engine(base, bound, axis, transposed, device, workers, parts=parts)
        errors = engine.run(list(selected), on_result)
    return rows, errors, engine.describe_backend()


def _row(item: BoundCheckpoint, name, axis: str, change, shrink: float | None) -> dict:
    return deltas_row(
        item.method,
        item.run.name,
        item.checkpoint.step,
        name,
        axis,
        change,
        checkpoint=str(item.checkpoint.path),
        rows_added=item.rows_added.get(name.parameter, 0),
        label=item.run.label or item.method,
        decay_shrink=shrink,
    )


def _table(rows: list[dict], runs: list[Run], backend: str, notes=()) -> pd.DataFrame:
    table = pd.DataFrame(rows, columns=COLUMNS)
    table["step"] = table["step"].astype("Int64")
    table["layer"] = table["layer"].astype("Int64")
    order = {run.name: i for i, run in enumerate(runs)}
    table = table.sort_values(
        by=["run", "step", "component", "stack", "attention", "layer", "module"],
        key=lambda col: col.map(order) if col.name == "run" else col,
        kind="stable",
    ).reset_index(drop=True)
    table.attrs["backend"] = backend
    table.attrs["left_out"] = left_out(runs)  # skipped or refused checkpoints, for run.json
    table.attrs["decay_notes"] = list(notes)  # why delta_m_learned is empty where it is
    _warn_zero_norms(table)
    return table


def _warn_zero_norms(table: pd.DataFrame) -> None:
    hit = table[table["zero_norm_vectors"] > 0]
    if hit.empty:
        return
    worst = hit.iloc[0]
    warnings.warn(
        f"{len(hit)} (run, step, weight) rows had zero-norm vectors, left out of ΔD "
        f"(e.g. {worst['zero_norm_vectors']} of {worst['n_vectors']} in {worst['parameter']} "
        f"of {worst['run']}); see the zero_norm_vectors column"
        + (
            "; some ΔD are NaN because every vector was zero" if hit["delta_d"].isna().any() else ""
        ),
        stacklevel=3,
    )
