"""Print the README's demo tables (Markdown) from the published CSVs, so that they are
copied from the runs, never typed: ``python scripts/results_tables.py figures/``."""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd


def _r(value: float) -> str:
    return "—" if pd.isna(value) else f"{value:+.2f}"


def _interval(low: float, high: float) -> str:
    return f"[{_r(low)}, {_r(high)}]"


def summary_table(summary: pd.DataFrame) -> str:
    lines = [
        "| method | module | held-out acc. | slope ΔM/ΔD [layer bootstrap] | pooled r [layer "
        "bootstrap] | within-step r | per-step r, first → last | p vs LoRA (layers "
        "permuted) | paper r | sign as paper? |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in summary.itertuples():
        p = "—" if pd.isna(row.p_vs_lora) else f"{row.p_vs_lora:.3f}"
        lines.append(
            f"| {row.method} | {row.module} | {row.accuracy:.3f} | {row.slope:.3g} "
            f"[{row.slope_boot_low:.3g}, {row.slope_boot_high:.3g}] | {_r(row.pearson_r)} "
            f"{_interval(row.pearson_r_boot_low, row.pearson_r_boot_high)} | "
            f"{_r(row.within_step_r)} | {_r(row.r_first_step)} → {_r(row.r_last_step)} | {p} | "
            f"{row.paper_r:+.2f} | {'yes' if row.sign_matches_paper else 'no'} |"
        )
    return "\n".join(lines)


def seeds_table(summary: pd.DataFrame, per_seed: pd.DataFrame) -> str:
    seeds = sorted(per_seed["seed"].unique())
    head = " | ".join(f"seed {s}" for s in seeds)
    lines = [
        f"| method | module | {head} | mean r [95 % t-CI over seeds] | within-step r, mean "
        "[95 % CI] | paper r |",
        "|---|---|" + "---|" * len(seeds) + "---|---|---|",
    ]
    for row in summary.itertuples():
        mine = per_seed[(per_seed["method"] == row.method) & (per_seed["module"] == row.module)]
        values = " | ".join(_r(v) for v in mine.sort_values("seed")["pearson_r"])
        lines.append(
            f"| {row.method} | {row.module} | {values} | {_r(row.pearson_r_mean)} "
            f"{_interval(row.pearson_r_ci_low, row.pearson_r_ci_high)} | "
            f"{_r(row.within_step_r_mean)} "
            f"{_interval(row.within_step_r_ci_low, row.within_step_r_ci_high)} | "
            f"{row.paper_r:+.2f} |"
        )
    return "\n".join(lines)


def ablation_table(ablation: pd.DataFrame) -> str:
    methods = ["FT", "LoRA", "DoRA"]
    head = " | ".join(f"{m} query / value r" for m in methods)
    lines = [
        f"| steps | weight decay | warm-up | {head} | accuracy FT / LoRA / DoRA |",
        "|---|---|---|" + "---|" * len(methods) + "---|",
    ]
    keys = ["steps", "weight_decay", "warmup_ratio"]
    for (steps, wd, wu), cell in ablation.groupby(keys, sort=True):
        rs, accs = [], []
        for method in methods:
            rows = cell[cell["method"] == method].set_index("module")
            rs.append(
                f"{_r(rows.loc['query', 'pearson_r'])} / {_r(rows.loc['value', 'pearson_r'])}"
            )
            accs.append(f"{rows['accuracy'].iloc[0]:.3f}")
        lines.append(f"| {steps} | {wd:g} | {wu:.0%} | {' | '.join(rs)} | {' / '.join(accs)} |")
    return "\n".join(lines)


def dose_table(study: pd.DataFrame) -> str:
    """The dose × length study (``dose_study.csv``), one row per cell and module."""
    lines = [
        "| level | steps | seed | method | module | wd | dose wd·Σlr | held-out acc. | pooled r "
        "[layer bootstrap] | within-step r | per-step r, first → last | DoRA \\|m − m₀\\|/m₀ "
        "| sign as paper? | wall min |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in study.itertuples():
        moved = "—" if pd.isna(row.m_moved_rel) else f"{100 * row.m_moved_rel:.1f} %"
        lines.append(
            f"| {row.level} | {row.steps} | {row.seed} | {row.method} | {row.module} | "
            f"{row.weight_decay:.3g} | {row.decay_dose:.2g} | {row.accuracy:.3f} | "
            f"{_r(row.pearson_r)} {_interval(row.pearson_r_boot_low, row.pearson_r_boot_high)} | "
            f"{_r(row.within_step_r)} | {_r(row.r_first_step)} → {_r(row.r_last_step)} | "
            f"{moved} | {'yes' if row.sign_matches_paper else 'no'} | {row.seconds / 60:.1f} |"
        )
    return "\n".join(lines)


def dose_seeds_table(seeds: pd.DataFrame) -> str:
    """Cells of the study run at several seeds (``dose_study_seeds.csv``): mean over seeds."""
    lines = [
        "| level | steps | method | module | seeds | mean r [95 % t-CI over seeds] | "
        "within-step r, mean [95 % t-CI] |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in seeds.itertuples():
        lines.append(
            f"| {row.level} | {row.steps} | {row.method} | {row.module} | {row.seeds} | "
            f"{_r(row.pearson_r_mean)} {_interval(row.pearson_r_ci_low, row.pearson_r_ci_high)} | "
            f"{_r(row.within_step_r_mean)} "
            f"{_interval(row.within_step_r_ci_low, row.within_step_r_ci_high)} |"
        )
    return "\n".join(lines)


def main(folder: str) -> None:
    root = Path(folder)
    summary = pd.read_csv(root / "summary.csv")
    print(summary_table(summary), end="\n\n")
    if (root / "seeds.csv").is_file() and "pearson_r_mean" in summary.columns:
        print(seeds_table(summary, pd.read_csv(root / "seeds.csv")), end="\n\n")
    if (root / "ablation.csv").is_file():
        print(ablation_table(pd.read_csv(root / "ablation.csv")), end="\n\n")
    if (root / "dose_study.csv").is_file():
        print(dose_table(pd.read_csv(root / "dose_study.csv")), end="\n\n")
    seeds = (
        pd.read_csv(root / "dose_study_seeds.csv")
        if (root / "dose_study_seeds.csv").is_file()
        else None
    )
    if seeds is not None and len(seeds):
        print(dose_seeds_table(seeds))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "figures")
