"""Statistics that respect how Figure 2's points are made: layers × steps of one run.

The points of one run are not independent draws. The same layer is seen at every step, so
its points share whatever makes that layer special, and every layer grows with training
time, so ΔM and ΔD of one run move together even when they are unrelated within a step.
Three tools answer the questions the pooled Pearson r cannot:

* :func:`within_step_correlation` centres ΔM and ΔD per step before correlating them: the
  common growth over training is removed, what is left is "at a given step, do layers
  that turned more also stretch more?".
* :func:`cluster_bootstrap` resamples whole layers (all their steps together) to give
  intervals for the pooled slope and r that hold when a layer's points are correlated.
* :func:`layer_permutation_test` tests whether two runs' pooled correlations differ by
  swapping whole layers between the runs, in place of the Fisher-z test's assumption of
  independent points.

Every function works from per-layer sufficient sums, so thousands of resamples of a
Figure-2 table take milliseconds. :func:`across_seed_summary` summarises replicate runs.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import numpy as np
import pandas as pd

from wdanalysis.errors import WDAnalysisError
from wdanalysis.stats.clusters import CLUSTER, bootstrap_group, layer_sums, slope_r, within_step
from wdanalysis.stats.fits import drop_undefined, fit_groups, validate_deltas
from wdanalysis.table.schema import identity_columns, name_column

__all__ = [
    "across_seed_summary",
    "cluster_bootstrap",
    "design_statistics",
    "layer_permutation_test",
    "within_step_correlation",
]

GROUP = ("method", "run", "module")  # and the identity columns a table's kinds differ in


def _groups(deltas: pd.DataFrame, by: Sequence[str] | None, y: str = "delta_m"):
    validate_deltas(deltas, required=(y, "delta_d"))  # a frame, before its columns
    by = fit_groups(deltas) if by is None else list(by)  # kinds apart, as fit_lines
    validate_deltas(deltas, required=[*by, "step", CLUSTER, y, "delta_d"])
    clean = drop_undefined(deltas, y=y)
    for key, group in clean.groupby(list(by), sort=False, dropna=False):
        yield dict(zip(by, key if isinstance(key, tuple) else (key,), strict=True)), group


def within_step_correlation(
    deltas: pd.DataFrame, by: Sequence[str] | None = None, *, y: str = "delta_m"
) -> pd.DataFrame:
    """Pearson r and slope of ΔM (or ``y``) on ΔD after centring both per step (the pooled
    within-step association; steps with a single layer carry no within-step information
    and drop out)."""
    rows = []
    for keys, group in _groups(deltas, by, y):
        r, slope = within_step(group, y)
        rows.append(
            {
                **keys,
                "n": len(group),
                "n_steps": int(group["step"].fillna(-1).nunique()),
                "within_step_r": r,
                "within_step_slope": slope,
            }
        )
    return pd.DataFrame(rows)


def cluster_bootstrap(
    deltas: pd.DataFrame,
    n_boot: int = 2000,
    level: float = 0.95,
    seed: int = 0,
    by: Sequence[str] | None = None,
    *,
    y: str = "delta_m",
) -> pd.DataFrame:
    """Percentile intervals for the pooled slope and r, resampling whole layers.

    Each resample draws as many layers as the run has, with replacement, and keeps all of
    a drawn layer's steps together, so the interval reflects between-layer variation rather
    than treating a layer's repeated points as new evidence. With few layers (6 in the
    demo) the interval is itself rough: it cannot see variation the layers did not show.
    One generator seeded with ``seed`` serves the groups in table order, as
    :func:`~wdanalysis.stats.fits.fit_lines` does for its pooled rows (the same numbers).
    """
    if n_boot < 100 or not 0 < level < 1:
        raise WDAnalysisError("cluster_bootstrap needs n_boot >= 100 and 0 < level < 1")
    rng = np.random.default_rng(seed)
    rows = []
    for keys, group in _groups(deltas, by, y):
        boot = bootstrap_group(group, rng, n_boot, level, y)
        rows.append({**keys, "n_layers": boot.pop("n_clusters"), "n_boot": n_boot, **boot})
    return pd.DataFrame(rows)


def _standardised_sums(frame: pd.DataFrame) -> np.ndarray:
    """Layer sums after z-scoring ΔD and ΔM within the run (r is unchanged by it, and runs
    of very different scale, e.g. FT and LoRA, become exchangeable under the null)."""
    z = frame.copy()
    for column in ("delta_d", "delta_m"):
        values = z[column].astype(np.float64)
        spread = values.std(ddof=0)
        z[column] = (values - values.mean()) / (spread if spread > 0 else 1.0)
    return layer_sums(z)


def layer_permutation_test(
    deltas: pd.DataFrame,
    run_a: str,
    run_b: str,
    module: str,
    n_perm: int = 10000,
    seed: int = 0,
) -> pd.Series:
    """Two-sided test that runs ``run_a`` and ``run_b`` differ in pooled ΔM–ΔD correlation.

    Both runs must adapt the same layers. Under the null the two runs' layers are
    exchangeable: each layer's whole block of points (all steps, z-scored within its run)
    is swapped between the runs with probability 1/2, and the statistic r_a − r_b is
    recomputed. Every one of the 2^L swap patterns is enumerated when L ≤ 14 layers (an
    exact test), else ``n_perm`` random ones are drawn. The p-value counts the observed
    pattern, so it is never below 2 / 2^L (0.031 with 6 layers).
    """
    data = drop_undefined(deltas)
    data = data.loc[data["module"].astype(str) == str(module)]
    frames = []
    for name in (run_a, run_b):
        rows = data.loc[data["run"].astype(str) == str(name)]
        if rows.empty:
            rows = data.loc[data[name_column(data)].astype(str) == str(name)]
        if rows.empty:
            raise WDAnalysisError(f"no rows for run {name!r} and module {module!r}")
        frames.append(rows)
    layers = [f[CLUSTER].map(_layer_id) for f in frames]
    if set(layers[0]) != set(layers[1]):
        raise WDAnalysisError(f"runs {run_a!r} and {run_b!r} do not adapt the same layers")
    order = sorted(set(layers[0]))
    a, b = (_sums_in_order(f, ids, order) for f, ids in zip(frames, layers, strict=True))
    observed = float(np.subtract(*(slope_r(s.sum(axis=0))[1] for s in (a, b))))
    k = len(order)
    if k <= 14:
        swaps = np.array(list(itertools.product((False, True), repeat=k)))
    else:
        swaps = np.random.default_rng(seed).random((n_perm, k)) < 0.5
        swaps[0] = False  # the observed pattern is one of the permutations
    mask = swaps[..., None]
    r_a = slope_r(np.where(mask, b, a).sum(axis=1))[1]
    r_b = slope_r(np.where(mask, a, b).sum(axis=1))[1]
    null = r_a - r_b
    p = float(np.mean(np.abs(null) >= abs(observed) - 1e-12))
    return pd.Series(
        {
            "run_a": run_a,
            "run_b": run_b,
            "module": module,
            "r_a": slope_r(a.sum(axis=0))[1].item(),
            "r_b": slope_r(b.sum(axis=0))[1].item(),
            "difference": observed,
            "n_layers": k,
            "n_permutations": len(swaps),
            "exact": k <= 14,
            "p_value": p,
        },
        name="layer_permutation_test",
    )


def _layer_id(parameter: str) -> str:
    """A layer's identity shared by runs: the parameter name without PEFT/model prefixes."""
    return str(parameter).split("base_model.model.")[-1]


def _sums_in_order(frame: pd.DataFrame, ids: pd.Series, order: list[str]) -> np.ndarray:
    sums = _standardised_sums(frame.assign(**{CLUSTER: ids}))
    first = list(dict.fromkeys(ids))  # layer_sums numbers layers in order of appearance
    return sums[[first.index(name) for name in order]]


def design_statistics(
    deltas: pd.DataFrame, n_boot: int = 2000, seed: int = 0, *, y: str = "delta_m"
) -> pd.DataFrame:
    """Within-step r and the cluster-bootstrap intervals, one row per run and module."""
    within = within_step_correlation(deltas, y=y)
    boot = cluster_bootstrap(deltas, n_boot=n_boot, seed=seed, y=y)
    return within.merge(boot, on=fit_groups(deltas), how="outer")


def across_seed_summary(
    per_seed: pd.DataFrame, value: str = "pearson_r", level: float = 0.95
) -> pd.DataFrame:
    """Mean over seeds with a Student-t interval (seeds are independent replicate runs).

    ``per_seed`` has one row per (method, module, seed). The interval is clipped to
    [-1, 1] for correlations; with K seeds it has K − 1 degrees of freedom (wide for K=3).
    """
    rows = []
    kinds = identity_columns(per_seed)  # seeds of one kind of matrix, never pooled across
    for key, group in per_seed.groupby(["method", "module", *kinds], sort=False, dropna=False):
        method, module = key[0], key[1]
        values = group[value].dropna().to_numpy(np.float64)
        k = len(values)
        mean = float(values.mean()) if k else math.nan
        if k >= 2:
            from scipy import stats as sps  # here: importing it costs ~1 s

            half = sps.t.ppf((1 + level) / 2, k - 1) * values.std(ddof=1) / math.sqrt(k)
            low, high = mean - half, mean + half
        else:
            low = high = math.nan
        if value.endswith("_r") or value == "pearson_r":
            low, high = max(low, -1.0), min(high, 1.0)
        rows.append(
            {
                "method": method,
                "module": module,
                **dict(zip(kinds, key[2:], strict=True)),
                "n_seeds": k,
                f"{value}_mean": mean,
                f"{value}_ci_low": low,
                f"{value}_ci_high": high,
            }
        )
    return pd.DataFrame(rows)
