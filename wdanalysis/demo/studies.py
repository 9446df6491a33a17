"""Replicated demo runs: the seed study and the regime ablation.

A pooled r of one run is one draw: another training seed (head initialisation, adapter
initialisation, data order, dropout) gives another. :func:`run_seed_study` trains and
analyses seeds 0..K-1 of the same regime and reports every seed's r beside the across-seed
mean with a Student-t interval. :func:`run_ablation` trains every cell of a steps × weight
decay × warm-up grid (seed 0) so a reader sees which part of the regime moves the signs.
Both resume: a seed or cell whose ``summary.csv`` exists is read, not trained again.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import pandas as pd

from wdanalysis.demo.reproduction import DemoResult, DemoSettings, run_demo
from wdanalysis.stats.resampling import across_seed_summary
from wdanalysis.storage.atomic_write import write_csv_atomic

SEED_COLUMNS = ["n_seeds", "pearson_r_mean", "pearson_r_ci_low", "pearson_r_ci_high"]
PER_SEED = [
    "accuracy",
    "slope",
    "pearson_r",
    "pearson_r_boot_low",
    "pearson_r_boot_high",
    "within_step_r",
    "r_first_step",
    "r_last_step",
    "sign_matches_paper",
]


@dataclass
class SeedStudy:
    first: DemoResult  # seed 0: its figures are the ones published
    summary: pd.DataFrame  # seed 0's summary plus the across-seed columns
    per_seed: pd.DataFrame
    seconds: float
    files: list[Path]


def _run_or_read(out_dir: Path, settings: DemoSettings, progress: bool) -> DemoResult:
    """A finished run re-analysed from its checkpoints; else trained first."""
    finished = all((out_dir / m / "accuracy.json").is_file() for m in ("ft", "lora", "dora"))
    return run_demo(out_dir, settings, progress=progress, analyse_only=finished)


def seed_table(summaries: dict[int, pd.DataFrame]) -> pd.DataFrame:
    """One row per (method, module, seed) from each seed's demo summary."""
    frames = [
        s.assign(seed=seed)[["method", "module", "seed", *PER_SEED]]
        for seed, s in summaries.items()
    ]
    return pd.concat(frames, ignore_index=True)


def with_seed_columns(summary: pd.DataFrame, per_seed: pd.DataFrame) -> pd.DataFrame:
    """Seed 0's summary (one row per method and module) plus the across-seed r and its CI."""
    across = across_seed_summary(per_seed, "pearson_r")
    within = across_seed_summary(per_seed, "within_step_r")
    merged = summary.merge(across[["method", "module", *SEED_COLUMNS]], on=["method", "module"])
    keep = [
        "method",
        "module",
        "within_step_r_mean",
        "within_step_r_ci_low",
        "within_step_r_ci_high",
    ]
    return merged.merge(within[keep], on=["method", "module"])


def run_seed_study(
    out_dir: str | Path, settings: DemoSettings, seeds: int, progress: bool = True
) -> SeedStudy:
    """Seeds 0..K-1 in ``out_dir/seed<N>``; writes ``summary.csv`` (seed 0's rows plus the
    across-seed mean and CI), ``seeds.csv`` (every seed) and ``seeds_<module>.png/.svg``."""
    from wdanalysis.plots.report import save_figure_pair
    from wdanalysis.plots.seed_correlations import plot_seed_correlations

    out_dir = Path(out_dir)
    started = time.perf_counter()
    results = {}
    for seed in range(seeds):
        print(f"=== seed {seed} ({seed + 1} of {seeds}) ===")
        run_dir = out_dir / f"seed{seed}"
        results[seed] = _run_or_read(run_dir, replace(settings, seed=seed), progress)
    per_seed = seed_table({seed: result.summary for seed, result in results.items()})
    summary = with_seed_columns(results[0].summary, per_seed)
    files = [write_csv_atomic(per_seed, out_dir / "seeds.csv")]
    files.append(write_csv_atomic(summary, out_dir / "summary.csv"))
    for module in sorted(set(per_seed["module"])):
        figure = plot_seed_correlations(per_seed, module=module)
        files += save_figure_pair(figure, out_dir, f"seeds_{module}")
    return SeedStudy(results[0], summary, per_seed, time.perf_counter() - started, files)


def format_seed_table(summary: pd.DataFrame, per_seed: pd.DataFrame) -> str:
    lines = [f"{'method':<6} {'module':<6} {'r per seed':<24} {'mean [95% CI over seeds]':>26}"]
    for _, row in summary.iterrows():
        mine = per_seed[
            (per_seed["method"] == row["method"]) & (per_seed["module"] == row["module"])
        ]
        values = " ".join(f"{r:+.2f}" for r in mine.sort_values("seed")["pearson_r"])
        interval = f"{row['pearson_r_mean']:+.2f} [{row['pearson_r_ci_low']:+.2f}, "
        interval += f"{row['pearson_r_ci_high']:+.2f}]"
        lines.append(f"{row['method']:<6} {row['module']:<6} {values:<24} {interval:>26}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------- ablation


def cell_name(steps: int, weight_decay: float, warmup_ratio: float) -> str:
    return f"steps{steps}_wd{weight_decay:g}_wu{warmup_ratio:g}"


def run_ablation(
    out_dir: str | Path,
    settings: DemoSettings,
    steps: Sequence[int] = (150, 500),
    weight_decays: Sequence[float] = (0.0, 0.01),
    warmup_ratios: Sequence[float] = (0.0, 0.1),
    progress: bool = True,
) -> pd.DataFrame:
    """Every cell of steps × weight decay × warm-up, one row per (cell, method, module).

    Writes ``ablation.csv`` in ``out_dir``; cells live in ``out_dir/<cell name>``.
    """
    out_dir = Path(out_dir)
    frames = []
    for n, wd, wu in itertools.product(steps, weight_decays, warmup_ratios):
        name = cell_name(n, wd, wu)
        print(f"=== ablation cell {name} ===")
        cell = replace(settings, steps=n, weight_decay=wd, warmup_ratio=wu)
        summary = _run_or_read(out_dir / name, cell, progress).summary
        frames.append(summary.assign(cell=name, steps=n, weight_decay=wd, warmup_ratio=wu))
    table = pd.concat(frames, ignore_index=True)
    columns = ["cell", "steps", "weight_decay", "warmup_ratio", "method", "module"]
    table = table[columns + [c for c in table.columns if c not in columns]]
    write_csv_atomic(table, out_dir / "ablation.csv")
    return table
