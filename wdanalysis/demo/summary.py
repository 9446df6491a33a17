"""The demo's verdict table: one row per (method, module), with honest uncertainty.

Beside the pooled fit of :func:`wdanalysis.stats.fits.fit_lines` (points taken as independent),
each row carries the statistics that respect how the points were made (layers × steps of
one run, :mod:`wdanalysis.stats.resampling`): a cluster-bootstrap interval over whole layers for
the pooled slope and r, the within-step r (ΔM and ΔD centred per step, so the common
growth over training is removed), the per-step r at the first and last checkpoint, and a
layer-permutation test of each method's r against LoRA's.
"""

from __future__ import annotations

import math

import pandas as pd

from wdanalysis.stats.fits import fit_groups, fit_lines
from wdanalysis.stats.resampling import design_statistics, layer_permutation_test
from wdanalysis.table.schema import with_y

PAPER = {"FT": (-1, -0.62), "LoRA": (+1, +0.83), "DoRA": (-1, -0.31)}  # slope sign, VL-BART r
REFERENCE_RUN = "LoRA"  # the permutation test asks "does this method's r differ from LoRA's?"


def _of_kind(frame: pd.DataFrame, fit: pd.Series, kinds: list[str]) -> pd.DataFrame:
    """The rows of ``frame`` of the fit's kind (component, stack, attention)."""
    for kind in kinds:
        frame = frame[frame[kind].astype(str) == str(fit[kind])]
    return frame


def _per_step_r(fits: pd.DataFrame, method: str, module: str) -> tuple[float, float]:
    steps = fits[(fits["scope"] == "step") & (fits["method"] == method)]
    steps = steps[steps["module"] == module].sort_values("step")
    if steps.empty:
        return math.nan, math.nan
    return float(steps["pearson_r"].iloc[0]), float(steps["pearson_r"].iloc[-1])


def _p_vs_reference(deltas: pd.DataFrame, method: str, module: str) -> float:
    methods = set(deltas["method"].astype(str))
    if method == REFERENCE_RUN or REFERENCE_RUN not in methods:
        return math.nan
    test = layer_permutation_test(deltas, method, REFERENCE_RUN, module)
    return float(test["p_value"])


def _dose_columns(record: dict, module: str) -> dict:
    """Updates and decay dose of the run; DoRA: how far m moved from ‖W0‖ by the last step."""
    from wdanalysis.train.diagnostics import decayed_dose  # torch: only when summarising

    dose = record.get("decay_dose", {})
    moved = record.get("magnitude_moved", {})
    last = moved[max(moved)].get(module, {}) if moved else {}
    return {
        "updates": dose.get("updates", math.nan),
        "decay_dose": decayed_dose(dose) if dose else math.nan,
        "m_moved_abs": last.get("mean_abs", math.nan),
        "m_moved_rel": last.get("relative", math.nan),
    }


def summarize(
    fits: pd.DataFrame, trained: dict, deltas: pd.DataFrame, n_boot: int = 2000
) -> pd.DataFrame:
    """Per method and module: accuracy, pooled fit, design-aware intervals, paper's sign.

    ``trained`` maps a method label to its training record (``accuracy.json``:
    ``{"accuracy": {step: acc}, "seconds_per_step": s, "decay_dose": ..., ...}``).
    """
    keys = fit_groups(deltas)  # method, label, run, module and the kinds, as the fits
    kinds = [k for k in keys if k not in ("method", "label", "run", "module")]
    design = design_statistics(deltas, n_boot=n_boot).set_index(keys)
    pooled = fits[fits["scope"] == "pooled"]
    rows = []
    for _, fit in pooled.iterrows():
        method, module = fit["method"], fit["module"]
        sign, paper_r = PAPER.get(method, (0, math.nan))
        record = trained.get(method, {})
        curve = record.get("accuracy", {})
        extra = design.loc[tuple(fit[k] for k in keys)]
        of_kind = _of_kind(fits, fit, kinds), _of_kind(deltas, fit, kinds)
        first, last = _per_step_r(of_kind[0], method, module)
        rows.append(
            {
                "method": method,
                "module": module,
                **{kind: fit[kind] for kind in kinds},
                "accuracy": curve[max(curve)] if curve else math.nan,
                "n": fit["n"],
                "slope": fit["slope"],
                "slope_boot_low": extra["slope_boot_low"],
                "slope_boot_high": extra["slope_boot_high"],
                "pearson_r": fit["pearson_r"],
                "pearson_r_boot_low": extra["pearson_r_boot_low"],
                "pearson_r_boot_high": extra["pearson_r_boot_high"],
                "within_step_r": extra["within_step_r"],
                "r_first_step": first,
                "r_last_step": last,
                "spearman_rho": fit["spearman_rho"],
                "p_vs_lora": _p_vs_reference(of_kind[1], method, module),
                "paper_r": paper_r,
                "paper_sign": "−" if sign < 0 else "+",
                "sign_matches_paper": bool(sign * fit["slope"] > 0),
                "seconds_per_step": record.get("seconds_per_step", math.nan),
                **_dose_columns(record, module),
            }
        )
    return _with_learned(pd.DataFrame(rows), deltas, keys, n_boot)


LEARNED = {  # column of the fits / design statistics → its name on delta_m_learned
    "slope": "slope_learned",
    "pearson_r": "pearson_r_learned",
    "pearson_r_boot_low": "pearson_r_learned_boot_low",
    "pearson_r_boot_high": "pearson_r_learned_boot_high",
    "within_step_r": "within_step_r_learned",
}


def _with_learned(summary: pd.DataFrame, deltas: pd.DataFrame, keys, n_boot: int):
    """The same fit and intervals on ``delta_m_learned`` (ΔM less the decay's shrinkage,
    issue 36) as ``*_learned`` columns; NaN where the runs' decay is unknown."""
    columns = list(LEARNED.values())
    known = "delta_m_learned" in deltas and deltas["delta_m_learned"].notna().all()
    if summary.empty or not known:
        return summary.assign(**{c: math.nan for c in columns})
    learned = with_y(deltas, "delta_m_learned")
    fits = fit_lines(learned, per_step=False)
    fits = fits[fits["scope"] == "pooled"].set_index(keys)
    design = design_statistics(learned, n_boot=n_boot).set_index(keys)
    both = fits[["slope", "pearson_r"]].join(design[list(LEARNED)[2:]])
    both = both.droplevel("run").rename(columns=LEARNED).reset_index()
    on = [k for k in keys if k != "run" and k in summary.columns]  # (label: not kept)
    both = both.drop(columns=[k for k in keys if k in both.columns and k not in on])
    return summary.merge(both, on=on, how="left")


def format_summary(summary: pd.DataFrame) -> str:
    """The terminal table; r with its layer-bootstrap 95 % interval."""
    header = (
        f"{'method':<6} {'module':<6} {'acc.':>6} {'slope':>9} {'r [layer-bootstrap 95% CI]':>27}"
        f" {'within':>7} {'r first→last step':>18} {'p vs LoRA':>9} {'paper r':>8}  sign"
        f"        {'wd·Σlr':>7} {'m moved':>8}"
    )
    lines = [header]
    for _, row in summary.iterrows():
        interval = f"{row['pearson_r']:+.2f} [{row['pearson_r_boot_low']:+.2f}, "
        interval += f"{row['pearson_r_boot_high']:+.2f}]"
        steps = f"{row['r_first_step']:+.2f} → {row['r_last_step']:+.2f}"
        p = "—" if math.isnan(row["p_vs_lora"]) else f"{row['p_vs_lora']:.3f}"
        verdict = "as paper" if row["sign_matches_paper"] else "differs"
        verdict += f" ({row['paper_sign']})"
        dose = row.get("decay_dose", math.nan)
        moved = row.get("m_moved_rel", math.nan)
        moved = "—" if math.isnan(moved) else f"{100 * moved:.2f} %"
        lines.append(
            f"{row['method']:<6} {row['module']:<6} {row['accuracy']:>6.3f} {row['slope']:>9.3g} "
            f"{interval:>27} {row['within_step_r']:>+7.2f} {steps:>18} {p:>9} "
            f"{row['paper_r']:>+8.2f}  {verdict:<13} {dose:>7.2g} {moved:>8}"
        )
    return "\n".join(lines)


def sign_verdict(summary: pd.DataFrame) -> str:
    mismatched = summary.loc[~summary["sign_matches_paper"]]
    if mismatched.empty:
        return "Every pooled slope sign matches the paper (FT −, LoRA +, DoRA −)."
    pairs = ", ".join(f"{r.method}/{r.module}" for r in mismatched.itertuples())
    return (
        f"Pooled slope sign differs from the paper for: {pairs} "
        "(see docs/reproduction.md and docs/guides/decay.md)."
    )
