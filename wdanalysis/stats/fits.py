"""Statistics of the ΔM–ΔD relation (DoRA paper, Figure 2): line fits and correlations.

The paper's claim is about a *sign*: full fine-tuning and DoRA change magnitude and
direction in opposite senses (negative ΔM–ΔD slope), LoRA in the same sense (positive
slope). Every number here serves to check that claim with its uncertainty: a least-squares
line of ΔM on ΔD, Pearson's r and Spearman's ρ (robust to the few outlying layers that
often dominate r), pooled over layers and steps as in the paper and again per step, so a
reader sees whether the sign holds throughout training.

The points of one run are layers seen at several steps, not independent draws, so the
default intervals resample whole layers (a layer bootstrap, :mod:`wdanalysis.stats.clusters`)
and the within-step r (ΔM and ΔD centred per step) stands beside the pooled r. The
textbook intervals and p-values, which take every point as independent, are kept as extra
columns whose names end in ``_iid``.

Everything takes and returns tidy :class:`pandas.DataFrame` objects; undefined statistics
(one point, constant ΔD, ...) are NaN with the reason in the ``note`` column, never a crash.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np
import pandas as pd

from wdanalysis.errors import WDAnalysisError
from wdanalysis.stats import fast_fits
from wdanalysis.stats.clusters import LayerBootstrap, note_few_clusters
from wdanalysis.stats.grouped import GroupedRows
from wdanalysis.stats.module_select import MODULE_ALIASES as MODULE_ALIASES
from wdanalysis.stats.module_select import select_module as select_module
from wdanalysis.table.schema import (
    REQUIRED_COLUMNS,
    identity_columns,
    name_columns,
    validate_deltas,
    with_y,
)

__all__ = [
    "BOOT_SEED",
    "FIT_COLUMNS",
    "IID_COLUMNS",
    "N_BOOT",
    "MODULE_ALIASES",
    "compare_correlations",
    "drop_undefined",
    "fit_groups",
    "fit_lines",
    "fit_one",
    "select_module",
    "validate_deltas",
]

#: Output columns of :func:`fit_lines`, in order (the grouping columns come first).
FIT_COLUMNS: tuple[str, ...] = (
    "scope",
    "step",
    "y",
    "n",
    "n_layers",
    "n_steps",
    "slope",
    "slope_boot_low",
    "slope_boot_high",
    "intercept",
    "pearson_r",
    "pearson_r_boot_low",
    "pearson_r_boot_high",
    "within_step_r",
    "spearman_rho",
    "n_clusters",
    "n_boot",
    "boot_seed",
    # the textbook statistics, every point taken as independent (extra, not the default)
    "slope_se_iid",
    "slope_ci_low_iid",
    "slope_ci_high_iid",
    "intercept_se_iid",
    "intercept_ci_low_iid",
    "intercept_ci_high_iid",
    "pearson_p_iid",
    "pearson_r_fisher_low_iid",
    "pearson_r_fisher_high_iid",
    "spearman_p_iid",
    "note",
)
#: Columns of one fit (:func:`fit_one`) that take every point as independent.
IID_COLUMNS: tuple[str, ...] = tuple(c for c in FIT_COLUMNS if c.endswith("_iid"))
#: Layer-bootstrap resamples and seed of :func:`fit_lines` (recorded in each row).
N_BOOT = 2000
BOOT_SEED = 0

CONFIDENCE = 0.95


# --------------------------------------------------------------------------- validation


def drop_undefined(deltas: pd.DataFrame, y: str = "delta_m") -> pd.DataFrame:
    """Drop rows whose ΔD or ``y`` (ΔM) is NaN/±inf, warning how many per run; raise if none
    is left.

    ΔD is NaN when every vector of a weight had zero norm; such a matrix has no direction,
    so it cannot sit on the ΔM–ΔD plane. Silently dropping it would hide a broken checkpoint,
    so the warning names the runs.
    """
    values = deltas[[y, "delta_d"]].to_numpy(dtype=float, na_value=np.nan)
    bad = ~np.isfinite(values).all(axis=1)
    if not bad.any():
        return deltas
    if bad.all():
        raise WDAnalysisError(
            f"every one of the {len(deltas)} rows has a NaN or infinite {y}/delta_d; "
            "nothing is left to fit",
            hint="ΔD is NaN when all vectors of a weight have zero norm: check the checkpoints",
        )
    per_run = deltas.loc[bad, "run"].astype(str).value_counts(sort=False)
    detail = ", ".join(f"{count} in run {run!r}" for run, count in per_run.items())
    warnings.warn(
        f"dropped {int(bad.sum())} of {len(deltas)} rows with NaN/infinite {y} or "
        f"delta_d ({detail})",
        UserWarning,
        stacklevel=3,
    )
    return deltas.loc[~bad]


# --------------------------------------------------------------------------- one fit


def _nan_fit() -> dict[str, float]:
    """Every statistic of :func:`fit_one`, NaN."""
    keys = ("slope", "intercept", "pearson_r", "spearman_rho", *IID_COLUMNS)
    return {key: math.nan for key in keys}


def _line(x: np.ndarray, y: np.ndarray, out: dict) -> None:
    """Least-squares line of y on x with t-based 95% intervals (needs n ≥ 3 for SEs; they
    take the points as independent, hence ``_iid``). scipy's linregress arithmetic
    (:mod:`wdanalysis.stats.fast_fits`)."""
    n = len(x)
    out["slope"], out["intercept"], slope_se, intercept_se = fast_fits.line(x, y)
    if n < 3:  # two points define the line exactly: no residual, no uncertainty
        return
    t = fast_fits.t_quantile(0.5 + CONFIDENCE / 2, n - 2)
    out["slope_se_iid"], out["intercept_se_iid"] = slope_se, intercept_se
    out["slope_ci_low_iid"] = out["slope"] - t * slope_se
    out["slope_ci_high_iid"] = out["slope"] + t * slope_se
    out["intercept_ci_low_iid"] = out["intercept"] - t * intercept_se
    out["intercept_ci_high_iid"] = out["intercept"] + t * intercept_se


def _correlations(x: np.ndarray, y: np.ndarray, out: dict) -> None:
    """Pearson r (+ Fisher-z 95% CI when n ≥ 4) and Spearman ρ; p-values need n ≥ 3 (the
    interval and p-values take the points as independent, hence ``_iid``). scipy's
    pearsonr/spearmanr arithmetic (:mod:`wdanalysis.stats.fast_fits`)."""
    n = len(x)
    out["pearson_r"], pearson_p = fast_fits.pearson(x, y)
    out["spearman_rho"], spearman_p = fast_fits.spearman(x, y)
    if n < 3:  # r = ±1 by construction; a p-value would be meaningless
        return
    out["pearson_p_iid"], out["spearman_p_iid"] = pearson_p, spearman_p
    if n >= 4:  # Fisher z: se = 1/sqrt(n - 3)
        low, high = fast_fits.fisher_interval(out["pearson_r"], n, CONFIDENCE)
        out["pearson_r_fisher_low_iid"], out["pearson_r_fisher_high_iid"] = low, high


def fit_one(delta_d: np.ndarray, delta_m: np.ndarray) -> dict[str, float | str]:
    """All statistics of one ΔM-on-ΔD regression, NaN (with a ``note``) where undefined.

    Kept separate from the grouping so that it can be tested against closed forms directly.
    Its intervals and p-values take the points as independent (``_iid`` keys);
    :func:`fit_lines` adds the layer-bootstrap intervals that do not.
    """
    x = np.asarray(delta_d, dtype=float)
    y = np.asarray(delta_m, dtype=float)
    out: dict[str, float | str] = {**_nan_fit(), "note": ""}
    n = len(x)
    if n < 2:
        out["note"] = f"{n} point(s): a line needs at least 2"
        return out
    if np.all(x == x[0]):
        out["note"] = "ΔD is constant: slope and correlation undefined"
        return out
    _line(x, y, out)
    if np.all(y == y[0]):
        out["note"] = "ΔM is constant: correlation undefined"
        return out
    _correlations(x, y, out)
    if n == 2:
        out["note"] = "2 points: exact line, no standard errors, p-values or CI"
    elif n == 3:
        out["note"] = "3 points: r's Fisher-z CI needs at least 4"
    return out


# --------------------------------------------------------------------------- grouped fits


def _group_row(
    keys: dict, rows: GroupedRows, positions: np.ndarray, scope: str, step, design: LayerBootstrap
) -> dict:
    """One fit: the line and correlations, the within-step r and the layer bootstrap."""
    row = {**keys, "scope": scope, "step": step, "y": design.y, "n": len(positions)}
    row["n_layers"], row["n_steps"] = rows.counts(positions)
    row.update(fit_one(rows.x[positions], rows.v[positions]))
    row["within_step_r"] = rows.within_step(positions)[0]
    row.update(design.columns_from(lambda: rows.layer_sums(positions), scope))
    return row


def _check_y(deltas: pd.DataFrame, y: str) -> None:
    if y not in deltas.columns:
        raise WDAnalysisError(
            f"y={y!r} is not a column of the deltas table",
            hint="y names the quantity regressed on ΔD, e.g. delta_m",
        )
    if not pd.api.types.is_numeric_dtype(deltas[y]):
        raise WDAnalysisError(f"column {y} must be numeric, found dtype {deltas[y].dtype}")


def fit_groups(deltas: pd.DataFrame, pool: bool = False) -> list[str]:
    """The default grouping of a fit: method, label, run, module and the identity columns that
    tell this table's matrices apart (component, stack, attention kind); ``pool=True``
    leaves those out, for the paper's one cloud of points per run and module."""
    return [*name_columns(deltas), "run", "module", *identity_columns(deltas, pool)]


def fit_lines(
    deltas: pd.DataFrame,
    by: Sequence[str] | None = None,
    per_step: bool = True,
    *,
    pool: bool = False,
    y: str = "delta_m",
    n_boot: int = N_BOOT,
    seed: int = BOOT_SEED,
) -> pd.DataFrame:
    """Fit y = intercept + slope·ΔD per group (y = ΔM by default), pooled over layers and
    steps, then per step.

    Groups: ``by``, else :func:`fit_groups` (method, run, module and, where the table holds
    several kinds of matrix, component, stack and attention kind: T5's encoder self-,
    decoder self- and cross-attention get a fit each). ``pool=True`` pools the kinds of
    one module into one fit, as the paper's Figure 2 does.

    Returns one tidy row per fit (:data:`FIT_COLUMNS`): ``scope="pooled"`` rows (``step``
    is <NA>) are the paper's numbers; ``scope="step"`` rows (one per known step) show
    whether the slope's sign holds at every step. Beside the pooled r stand the
    within-step r and the 95 % layer-bootstrap intervals of the slope and of r
    (``n_boot`` resamples of whole layers, generator seeded with ``seed``: the same call
    gives the same numbers; ``n_boot=0`` leaves them out). Rows with NaN ΔD or ``y`` are
    dropped with a warning. Groups keep the input order, so FT/LoRA/DoRA come out as the
    user listed them.
    """
    validate_deltas(deltas)
    if y == "delta_m_learned":
        with_y(deltas, y)  # one line when the decay is unknown: its message says what to pass
    by = list(by) if by is not None else fit_groups(deltas, pool)
    validate_deltas(deltas, required=[*REQUIRED_COLUMNS, *by])
    _check_y(deltas, y)
    design = LayerBootstrap(y, int(n_boot), int(seed), CONFIDENCE)
    clean = drop_undefined(deltas, y=y)
    grouped, rows = GroupedRows(clean, by, y), []
    for keys, positions in grouped.groups():
        rows.append(_group_row(keys, grouped, positions, "pooled", pd.NA, design))
        if not per_step:
            continue
        for step, at_step in grouped.step_groups(positions):
            rows.append(_group_row(keys, grouped, at_step, "step", step, design))
    fits = pd.DataFrame(rows, columns=[*by, *FIT_COLUMNS])
    fits["step"] = fits["step"].astype("Int64")
    note_few_clusters(fits)
    return fits


# --------------------------------------------------------------------------- comparisons


def _pooled_fits(data: pd.DataFrame, module: str | None, pool: bool) -> pd.DataFrame:
    """Pooled fit rows from either a fits table or a deltas table, for one module."""
    if "pearson_r" in data.columns and "scope" in data.columns:
        fits = data.loc[data["scope"] == "pooled"]
    else:
        fits = fit_lines(data, per_step=False, pool=pool)
    if "module" in fits.columns:
        fits = select_module(fits, module)
    return fits


def _find_run(fits: pd.DataFrame, name: str) -> pd.Series:
    """The pooled row of a run, found by run name or else by a method label unique to one run."""
    for column in ("run", "label", "method"):
        if column in fits.columns:
            hit = fits.loc[fits[column].astype(str) == str(name)]
            if len(hit) == 1:
                return hit.iloc[0]
            kinds = [c for c in identity_columns(hit) if c in hit.columns]
            if len(hit) > 1 and kinds:
                raise WDAnalysisError(
                    f"{name!r} has {len(hit)} kinds of matrices ({', '.join(kinds)} differ)",
                    hint="select the rows of one kind first, or pass pool=True to pool them",
                )
            if len(hit) > 1:
                raise WDAnalysisError(
                    f"{name!r} matches {len(hit)} rows by {column}; name a single run",
                    hint=f"runs: {', '.join(map(str, fits['run']))}",
                )
    runs = ", ".join(map(str, fits["run"])) if "run" in fits.columns else "none"
    raise WDAnalysisError(f"no run or method called {name!r}; runs present: {runs}")


def compare_correlations(
    data: pd.DataFrame,
    run_a: str,
    run_b: str,
    module: str | None = None,
    *,
    pool: bool = False,
) -> pd.Series:
    """Fisher z test that two runs' pooled ΔM–ΔD correlations differ (e.g. FT vs LoRA).

    ``data`` is a deltas table or the output of :func:`fit_lines`; runs are named by run
    or, when unambiguous, by method. The test treats the two correlations as independent
    and each point as an independent observation; points pooled over steps of one layer
    are not, so the p-value tends to be too small. For runs that adapt the same layers use
    :func:`wdanalysis.stats.resampling.layer_permutation_test`, which swaps whole layers and
    holds its level under that structure; this test remains for runs on different models.
    """
    fits = _pooled_fits(data, module, pool)
    a, b = _find_run(fits, run_a), _find_run(fits, run_b)
    r_a, r_b, n_a, n_b = float(a["pearson_r"]), float(b["pearson_r"]), int(a["n"]), int(b["n"])
    result = {
        "run_a": a.get("run", run_a),
        "run_b": b.get("run", run_b),
        "method_a": a.get("method", pd.NA),
        "method_b": b.get("method", pd.NA),
        "module": a.get("module", pd.NA),
        "r_a": r_a,
        "r_b": r_b,
        "n_a": n_a,
        "n_b": n_b,
        "z": math.nan,
        "p_value": math.nan,
        "note": "",
    }
    if min(n_a, n_b) < 4 or not (np.isfinite(r_a) and np.isfinite(r_b)):
        result["note"] = "needs a defined r and at least 4 points in each run"
        return pd.Series(result, name="fisher_z_test")
    # clip so that |r| = 1 (e.g. a perfect synthetic line) gives a huge, finite z
    z_a, z_b = np.arctanh(np.clip([r_a, r_b], -1 + 1e-15, 1 - 1e-15))
    z = (z_a - z_b) / math.sqrt(1 / (n_a - 3) + 1 / (n_b - 3))
    result["z"] = float(z)
    from scipy import stats as sps  # here: a report need not import scipy.stats (~1 s)

    result["p_value"] = float(2 * sps.norm.sf(abs(z)))
    return pd.Series(result, name="fisher_z_test")
