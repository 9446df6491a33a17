"""Figure 2 with the decay taken out (issue 36): the main cell's FT, LoRA and DoRA runs,
raw ΔM against ``delta_m_learned`` = mean_n |m_t[n] − S_t·m_0[n]|.

The runs come from ``scripts/decay_train_main_cell.py`` (the dose study's main cell, paper
dose, 500 steps, with the trainer's exact ``decay_shrink.json``); each seed's finished runs
are compared with the base. LoRA's merged weight is never decayed (``S = 1``, learned =
raw by construction), so where a seed's LoRA run was not retrained its rows are read from
the dose study's cached cell (``figures/dose_study/``), marked in the ``source`` column.
Per seed, method, module and y: pooled r with its layer-bootstrap interval and the
within-step r; over seeds: the Student-t interval; and the mechanism test across layers.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from wdanalysis.demo.reproduction import ACCURACY_FILE, MODULES, RUN_LABELS, model_path
from wdanalysis.stats.fits import fit_lines
from wdanalysis.stats.resampling import (
    across_seed_summary,
    cluster_bootstrap,
    within_step_correlation,
)
from wdanalysis.table.comparison import compare
from wdanalysis.table.schema import with_y
from wdanalysis.train.checkpoint import list_checkpoints

CELL = "paper_steps500_seed{seed}"
KEEP = ["method", "run", "step", "layer", "module", "parameter", "delta_m", "delta_d"]
KEEP += ["decay_shrink", "delta_m_learned"]
Y = {"raw": "delta_m", "learned": "delta_m_learned"}
BY = ["method", "run", "module"]


def finished_seeds(runs_dir: Path, partial: bool = False) -> dict[int, dict[str, Path]]:
    """seed → {label: run folder} of every run that finished (its accuracy.json exists);
    ``partial``: also runs still training or stopped, with one complete checkpoint or more
    (their checkpoints are exact as far as they go)."""
    found: dict[int, dict[str, Path]] = {}
    for folder in sorted(Path(runs_dir).glob("paper_steps500_seed*")):
        seed = int(folder.name.rsplit("seed", 1)[1])
        for method, label in RUN_LABELS.items():
            run = folder / method
            if (run / ACCURACY_FILE).is_file() or (partial and list_checkpoints(run)):
                found.setdefault(seed, {})[label] = run
    return found


def _source(run: Path) -> str:
    if (run / ACCURACY_FILE).is_file():
        return "trained"
    return f"trained, stopped at step {list_checkpoints(run)[-1][0]} of 500"


def cached_lora(study_dir: Path, seed: int) -> pd.DataFrame | None:
    """LoRA's rows of the dose study's cached main cell: S = 1, learned = raw."""
    path = Path(study_dir) / f"{CELL.format(seed=seed)}_lora.json"
    if not path.is_file():
        return None
    rows = pd.DataFrame(json.loads(path.read_text(encoding="utf-8"))["deltas"])
    rows = rows.assign(method="LoRA", run="lora", decay_shrink=1.0)
    return rows.assign(delta_m_learned=rows["delta_m"], source=f"cache {path.name}")


def seed_deltas(
    runs_dir: Path, study_dir: Path, progress: bool = False, partial: bool = False
) -> pd.DataFrame:
    """Every finished seed's table (``seed`` and ``source`` columns added)."""
    frames = []
    for seed, runs in sorted(finished_seeds(runs_dir, partial).items()):
        table = compare(model_path(), runs, modules=list(MODULES), progress=progress)
        sources = {label: _source(run) for label, run in runs.items()}
        frames.append(table[KEEP].assign(seed=seed, source=table["method"].map(sources)))
        lora = None if "LoRA" in runs else cached_lora(study_dir, seed)
        if lora is not None:
            frames.append(lora.assign(seed=seed)[KEEP + ["seed", "source"]])
    if not frames:
        return pd.DataFrame(columns=[*KEEP, "seed", "source"])
    table = pd.concat(frames, ignore_index=True)
    return common_steps(table.astype({"step": "Int64", "layer": "Int64"}))


def common_steps(table: pd.DataFrame) -> pd.DataFrame:
    """Per seed, only the checkpoints every method of that seed reached, so that a run
    stopped early is compared with the others at the same steps."""
    keep = []
    for _, part in table.groupby("seed", sort=True):
        steps = set.intersection(*(set(g["step"]) for _, g in part.groupby("method")))
        keep.append(part[part["step"].isin(steps)])
    return pd.concat(keep).reset_index(drop=True)


def per_seed_statistics(deltas: pd.DataFrame, n_boot: int = 2000) -> pd.DataFrame:
    """One row per seed, method, module and y (raw / learned): pooled r and slope, the
    layer-bootstrap interval of r, the within-step r."""
    rows = []
    for seed, table in deltas.groupby("seed", sort=True):
        for y, column in Y.items():
            data = with_y(table, column)
            fits = fit_lines(data, by=BY, per_step=False)
            boot = cluster_bootstrap(data, n_boot=n_boot, by=BY)
            within = within_step_correlation(data, by=BY)
            merged = fits[BY + ["n", "slope", "pearson_r"]].merge(boot, on=BY).merge(within, on=BY)
            rows.append(merged.assign(seed=seed, y=y))
    out = pd.concat(rows, ignore_index=True)
    first = ["y", "method", "module", "seed"]
    return out[first + [c for c in out.columns if c not in first]]


def across_seeds(per_seed: pd.DataFrame) -> pd.DataFrame:
    """Mean pooled and within-step r over the seeds, Student-t interval, per y."""
    frames = []
    for y, part in per_seed.groupby("y", sort=False):
        pooled = across_seed_summary(part, "pearson_r")
        within = across_seed_summary(part, "within_step_r").drop(columns="n_seeds")
        frames.append(pooled.merge(within, on=["method", "module"]).assign(y=y))
    out = pd.concat(frames, ignore_index=True)
    return out[["y", *[c for c in out.columns if c != "y"]]]


def base_row_norms(keys) -> dict[str, float]:
    """Mean row norm ‖w₀‖ of each base weight (float64), read one tensor at a time."""
    from safetensors import safe_open

    with safe_open(str(model_path() / "model.safetensors"), "pt") as f:
        return {k: f.get_tensor(k).double().norm(dim=1).mean().item() for k in sorted(set(keys))}


def mechanism(deltas: pd.DataFrame) -> pd.DataFrame:
    """Across layers at the last checkpoint, per seed, method and module: the correlation
    of each layer's mean ‖w₀‖ with its ΔD, its ΔM, its decay-only ΔM (1 − S)·mean‖w₀‖ and
    its learned ΔM, and the mean ratio ΔM / decay-only ΔM (issue 36's mechanism: the decay
    makes ΔM ∝ ‖w₀‖ while ΔD is smaller where ‖w₀‖ is larger)."""
    norms = base_row_norms(deltas["parameter"])
    rows = []
    for (seed, method, module), part in deltas.groupby(["seed", "method", "module"], sort=True):
        last = part[part["step"] == part["step"].max()]
        norm = last["parameter"].map(norms).to_numpy(np.float64)
        decay_only = (1.0 - last["decay_shrink"].to_numpy(np.float64)) * norm
        rows.append(
            {
                "seed": seed,
                "method": method,
                "module": module,
                "step": int(last["step"].iloc[0]),
                "n_layers": len(last),
                "shrink": float(last["decay_shrink"].mean()),
                "r_norm_delta_d": _r(norm, last["delta_d"]),
                "r_norm_delta_m": _r(norm, last["delta_m"]),
                "r_norm_decay_only": _r(norm, decay_only),
                "r_norm_learned": _r(norm, last["delta_m_learned"]),
                "delta_m_over_decay_only": _ratio(last["delta_m"], decay_only),
                "learned_over_delta_m": _ratio(last["delta_m_learned"], last["delta_m"]),
            }
        )
    return pd.DataFrame(rows)


def _r(x, y) -> float:
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if len(x) < 3 or x.std() == 0 or y.std() == 0:
        return float("nan")
    return float(np.corrcoef(x, y)[0, 1])


def _ratio(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    ok = b > 0
    return float((a[ok] / b[ok]).mean()) if ok.any() else float("nan")


def markdown_table(frame: pd.DataFrame, digits: int = 2) -> str:
    """``frame`` as a Markdown table: floats signed to ``digits`` places (``.3g`` from 10 up),
    NaN as "—" (the tables the issue-36 scripts print and commit)."""

    def cell(value) -> str:
        if isinstance(value, float) and value != value:
            return "—"
        if isinstance(value, float):
            return f"{value:+.{digits}f}" if abs(value) < 10 else f"{value:.3g}"
        return str(value)

    lines = ["| " + " | ".join(frame.columns) + " |", "|" + "---|" * len(frame.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(False)]
    return "\n".join(lines)
