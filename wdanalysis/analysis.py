"""The analysis: base model + runs → tidy table of ΔM and ΔD per (run, step, weight).

The loop is weight-major: each selected base matrix is read once and compared with every
checkpoint of every run before the next one is read, so memory holds one base matrix and
one checkpoint matrix at a time and the base is never re-read per checkpoint.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from tqdm.auto import tqdm

from wdanalysis.checkpoints import (
    AdapterCheckpoint,
    Checkpoint,
    FullModel,
    Run,
    aligner_for,
    is_float,
    open_base,
    open_run,
)
from wdanalysis.decomposition import AXES, decomposition_change
from wdanalysis.errors import AdapterMismatchError, NumericalError, WDAnalysisError
from wdanalysis.keymatch import KeyAligner
from wdanalysis.modules import describe_weight, select_weights

COLUMNS = [
    "method",
    "run",
    "step",
    "layer",
    "module",
    "parameter",
    "stack",
    "axis",
    "delta_m",
    "delta_d",
    "n_vectors",
    "zero_norm_vectors",
    "checkpoint",
]
RunsArg = str | Path | Sequence[str | Path] | Mapping[str, str | Path]


@dataclass
class BoundCheckpoint:
    """A checkpoint whose weights have been matched to the selected base keys."""

    run: Run
    checkpoint: Checkpoint
    method: str
    keys: dict  # base key → checkpoint key (full) or AdapterModule (adapter)


def compare(
    base: str | Path,
    runs: RunsArg,
    modules: Sequence[str] | None = None,
    labels: Sequence[str] | None = None,
    axis: str = "out",
    fan_in_fan_out: bool | None = None,
    progress: bool = True,
) -> pd.DataFrame:
    """ΔM and ΔD of every selected weight, for every checkpoint of every run.

    Parameters
    ----------
    base: the pretrained model (file or folder) every run started from.
    runs: one path, a list of paths, or ``{label: path}``. A path is a run folder of
        ``checkpoint-N`` sub-folders or a single checkpoint (full model or adapter).
    modules: leaf module names (``q_proj``) or paths/regexes; default: attention query
        and value projections.
    labels: display names replacing the inferred method (``FT``/``LoRA``/``DoRA``).
    axis: ``"out"`` (default): one magnitude per output feature, as DoRA implementations
        store it; ``"in"``: one per input feature.
    fan_in_fan_out: force (True) or forbid (False) the (in, out) GPT-2 ``Conv1D`` layout;
        ``None`` infers it from ``config.json``, key names and adapter configs.

    Returns a long-format DataFrame with columns ``COLUMNS`` (one row per run, step, weight).
    """
    if axis not in AXES:
        raise WDAnalysisError(f"axis must be 'out' or 'in', got {axis!r}")
    base_model = open_base(base)
    run_list = _open_runs(runs, labels)
    selected = select_weights(
        {k: base_model.store.shape(k) for k in base_model.store.keys()}, modules, str(base)
    )
    _check_base_dtypes(base_model, selected)
    transposed = _layout(base_model, run_list, fan_in_fan_out)
    aligner = aligner_for(base_model)
    shapes = {k: base_model.store.shape(k) for k in base_model.store.keys()}
    bound = [
        _bind(run, ckpt, shapes, selected, aligner, transposed)
        for run in run_list
        for ckpt in run.checkpoints
    ]
    rows = _compute(base_model, selected, bound, axis, transposed, progress)
    return _table(rows, run_list)


def _open_runs(runs: RunsArg, labels: Sequence[str] | None) -> list[Run]:
    if isinstance(runs, (str, Path)):
        runs = [runs]
    if isinstance(runs, Mapping):
        labels, runs = list(runs.keys()), list(runs.values())
    runs = list(runs)
    if not runs:
        raise WDAnalysisError("no runs given: pass at least one run folder or checkpoint")
    if labels is not None and len(labels) != len(runs):
        raise WDAnalysisError(f"got {len(labels)} labels for {len(runs)} runs")
    opened = [open_run(path) for path in runs]
    _unique_names(opened)
    for run, label in zip(opened, labels or [None] * len(opened), strict=True):
        run.label = label
    return opened


def _unique_names(runs: list[Run]) -> None:
    seen: dict[str, int] = {}
    for run in runs:
        count = seen.get(run.name, 0)
        seen[run.name] = count + 1
        if count:
            run.name = f"{run.name}#{count + 1}"


def _check_base_dtypes(base: FullModel, selected: list[str]) -> None:
    for key in selected:
        if not is_float(base.store.dtype(key)):
            raise NumericalError(
                f"weight {key!r} has dtype {base.store.dtype(key)}; quantized or integer "
                "weights are not supported",
                base.path,
                "analyse the unquantized (fp32/fp16/bf16) model",
            )


def _layout(base: FullModel, runs: list[Run], fan_in_fan_out: bool | None):
    """Which base keys are stored (in, out): explicit choice, adapter configs, or the base."""
    if fan_in_fan_out is not None:
        return lambda key: fan_in_fan_out
    adapters_say = any(
        isinstance(c, AdapterCheckpoint) and c.adapter.config.fan_in_fan_out
        for run in runs
        for c in run.checkpoints
    )
    if adapters_say:
        return lambda key: True
    return base.transposed


def _bind(run, ckpt, shapes, selected, aligner: KeyAligner, transposed):
    if isinstance(ckpt, AdapterCheckpoint):
        keys = ckpt.adapter.bind(aligner, shapes, transposed)
    else:
        keys = _bind_full(ckpt, selected, aligner, shapes)
    method = run.label or ckpt.method
    return BoundCheckpoint(run, ckpt, method, keys)


def _bind_full(ckpt: FullModel, selected, aligner: KeyAligner, shapes) -> dict:
    mapping = aligner.map_keys(ckpt.store.keys())
    missing = [key for key in selected if key not in mapping]
    if missing:
        raise AdapterMismatchError(
            f"checkpoint lacks {len(missing)} of the selected weights, e.g. {missing[0]!r}",
            ckpt.path,
            "is it a checkpoint of another model?",
        )
    for key in selected:
        if ckpt.store.shape(mapping[key]) != tuple(shapes[key]):
            raise AdapterMismatchError(
                f"weight {mapping[key]!r} has shape {list(ckpt.store.shape(mapping[key]))} "
                f"but the base has {list(shapes[key])}",
                ckpt.path,
                "base and checkpoint come from different models",
            )
        if not is_float(ckpt.store.dtype(mapping[key])):
            raise NumericalError(
                f"weight {mapping[key]!r} has non-float dtype {ckpt.store.dtype(mapping[key])}",
                ckpt.path,
                "quantized checkpoints are not supported",
            )
    return {key: mapping[key] for key in selected}


def _effective_weight(bound: BoundCheckpoint, key: str, w0: torch.Tensor, transposed):
    ckpt = bound.checkpoint
    if isinstance(ckpt, AdapterCheckpoint):
        module = bound.keys.get(key)
        if module is None:  # this module was not adapted: unchanged
            return w0
        return ckpt.adapter.effective_weight(module, w0, transposed(key))
    return ckpt.store.get(bound.keys[key])


def _require_finite(tensor: torch.Tensor, key: str, where: Path) -> None:
    if not torch.isfinite(tensor).all():
        bad = int((~torch.isfinite(tensor)).sum())
        raise NumericalError(
            f"weight {key!r} holds {bad} NaN/Inf value(s)", where, "the checkpoint is broken"
        )


def _compute(base, selected, bound, axis, transposed, progress) -> list[dict]:
    rows = []
    bar = tqdm(
        total=len(selected) * len(bound),
        desc="ΔM/ΔD",
        unit="matrix",
        disable=not progress,
        leave=False,
    )
    with bar:
        for key in selected:
            w0 = base.store.get(key)
            _require_finite(w0, key, base.path)
            name = describe_weight(key)
            for item in bound:
                wt = _effective_weight(item, key, w0, transposed)
                _require_finite(wt, key, item.checkpoint.path)
                change = decomposition_change(w0, wt, axis, transposed(key))
                rows.append(_row(item, name, axis, change))
                bar.update()
    return rows


def _row(item: BoundCheckpoint, name, axis: str, change) -> dict:
    return {
        "method": item.method,
        "run": item.run.name,
        "step": item.checkpoint.step,
        "layer": name.layer,
        "module": name.module,
        "parameter": name.parameter,
        "stack": name.stack,
        "axis": axis,
        "delta_m": change.delta_m,
        "delta_d": change.delta_d,
        "n_vectors": change.n_vectors,
        "zero_norm_vectors": change.zero_norm_vectors,
        "checkpoint": str(item.checkpoint.path),
    }


def _table(rows: list[dict], runs: list[Run]) -> pd.DataFrame:
    table = pd.DataFrame(rows, columns=COLUMNS)
    table["step"] = table["step"].astype("Int64")
    table["layer"] = table["layer"].astype("Int64")
    order = {run.name: i for i, run in enumerate(runs)}
    table = table.sort_values(
        by=["run", "step", "stack", "layer", "module"],
        key=lambda col: col.map(order) if col.name == "run" else col,
        kind="stable",
    ).reset_index(drop=True)
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
        + ("; some ΔD are NaN because every vector was zero" if hit["delta_d"].isna().any() else ""),
        stacklevel=3,
    )
