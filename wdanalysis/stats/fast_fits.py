"""scipy's line fit and correlations of one small group, as the same numpy operations.

:func:`~wdanalysis.stats.fits.fit_one` runs for every group and step of a table (63 times
on an 8-layer × 7-module set); ``scipy.stats.linregress``, ``pearsonr`` and ``spearmanr``
spend most of their time checking and reshaping arguments, not computing. These
functions perform the arithmetic of scipy 1.17's own code (the same numpy calls, on arrays
of the same memory layout, and the same ``scipy.special`` functions for the p-values), so
their results are bit-identical to scipy's; ``tests/test_fit_lines_arrays.py`` checks that
against the scipy calls themselves. With another scipy (whose code may differ) or numpy 1.x
(no ``np.vecdot``) they call scipy instead (:data:`REPLICATES`): slower, the same numbers.
Inputs: 1-D float64 arrays of finite values, at least 2 points, neither
constant (callers check, as :func:`~wdanalysis.stats.fits.fit_one` does).
"""

from __future__ import annotations

import functools
import math
import warnings

import numpy as np
import scipy
from scipy import special

__all__ = ["REPLICATES", "fisher_interval", "line", "pearson", "spearman", "t_quantile"]

#: Whether the replicas run: the scipy whose code they follow, and numpy ≥ 2.
REPLICATES = scipy.__version__.split(".")[:2] == ["1", "17"] and hasattr(np, "vecdot")
_NEAR_CONSTANT = np.finfo(np.float64).eps ** 0.75


def _sps():
    """``scipy.stats``, imported on first use: it takes ~1 s to import, and the replicas
    need only ``scipy.special`` (0.1 s), so a report does not pay for it."""
    from scipy import stats

    return stats


@functools.lru_cache(maxsize=512)
def t_quantile(probability: float, df: int) -> float:
    """``scipy.stats.t.ppf(probability, df)``, remembered (every step row of a table asks
    for the same few); the replica calls what ``t.ppf`` calls, ``special.stdtrit``."""
    if REPLICATES:
        return float(special.stdtrit(df, probability))
    return float(_sps().t.ppf(probability, df))


def line(x: np.ndarray, y: np.ndarray) -> tuple[float, float, float, float]:
    """Slope, intercept and their standard errors as ``scipy.stats.linregress`` computes
    them (standard errors NaN for two points, where linregress gives 0)."""
    if not REPLICATES:
        result = _sps().linregress(x, y)
        ses = (result.stderr, result.intercept_stderr) if len(x) >= 3 else (math.nan,) * 2
        return float(result.slope), float(result.intercept), float(ses[0]), float(ses[1])
    xmean = np.mean(x, None)
    ymean = np.mean(y, None)
    ssxm, ssxym, _, ssym = np.cov(x, y, bias=1).flat
    if ssxm == 0.0 or ssym == 0.0:
        r = np.nan if ssxym == 0 else 0.0
    else:
        r = min(max(ssxym / np.sqrt(ssxm * ssym), -1.0), 1.0)
    slope = ssxym / ssxm
    intercept = ymean - slope * xmean
    if len(x) < 3:
        return float(slope), float(intercept), math.nan, math.nan
    slope_stderr = np.sqrt((1 - r**2) * ssym / ssxm / (len(x) - 2))
    intercept_stderr = slope_stderr * np.sqrt(ssxm + xmean**2)
    return float(slope), float(intercept), float(slope_stderr), float(intercept_stderr)


def pearson(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Pearson's r and its two-sided p-value as ``scipy.stats.pearsonr`` computes them
    (with its warning when an input is nearly constant)."""
    if not REPLICATES:
        result = _sps().pearsonr(x, y)
        return float(result.statistic), float(result.pvalue)
    n = np.asarray(len(x), dtype=np.float64)
    xmean = np.mean(x, axis=-1, keepdims=True)
    ymean = np.mean(y, axis=-1, keepdims=True)
    xm, ym = x - xmean, y - ymean
    xmax = np.max(np.abs(xm), axis=-1, keepdims=True)
    ymax = np.max(np.abs(ym), axis=-1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        normxm = xmax * np.linalg.norm(xm / xmax, ord=2, axis=-1, keepdims=True)
        normym = ymax * np.linalg.norm(ym / ymax, ord=2, axis=-1, keepdims=True)
    if np.any(normxm < _NEAR_CONSTANT * np.abs(xmean)) or np.any(
        normym < _NEAR_CONSTANT * np.abs(ymean)
    ):
        message = (
            "An input array is nearly constant; the computed "
            "correlation coefficient may be inaccurate."
        )
        warnings.warn(_sps().NearConstantInputWarning(message), stacklevel=3)
    with np.errstate(invalid="ignore", divide="ignore"):
        r = np.clip(np.vecdot(xm / normxm, ym / normym, axis=-1), -1.0, 1.0)
    ab = n / 2 - 1
    pvalue = 2 * special.betaincc(ab, ab, (np.abs(r) - (-1)) / 2)
    if len(x) == 2:
        return float(np.round(r)), 1.0
    return float(r), float(pvalue)


def fisher_interval(r: float, n: int, confidence: float) -> tuple[float, float]:
    """The Fisher-z interval of ``pearsonr(...).confidence_interval`` (n ≥ 4; the textbook
    formula, in scipy's order of operations, whatever the version)."""
    n_ = np.asarray(n, dtype=np.float64)
    level = np.asarray(confidence, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        zr = np.arctanh(np.asarray(r))
        se = np.sqrt(1 / (n_ - 3))
    h = special.ndtri(0.5 + level / 2)
    return float(np.tanh(zr - h * se)), float(np.tanh(zr + h * se))


def _average_ranks(a: np.ndarray) -> np.ndarray:
    """Ranks 1..n, ties given their mean rank (exact: integers and halves)."""
    order = np.argsort(a, kind="stable")
    ordered = a[order]
    new = np.concatenate([[True], ordered[1:] != ordered[:-1]])
    starts = np.flatnonzero(new)
    ends = np.append(starts[1:], len(a))
    ranks = np.empty(len(a))
    ranks[order] = ((starts + ends + 1) / 2.0)[np.cumsum(new) - 1]
    return ranks


def spearman(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Spearman's ρ and its two-sided p-value as ``scipy.stats.spearmanr`` computes them:
    the correlation matrix of the two rows of ranks, then a t statistic."""
    if not REPLICATES:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = _sps().spearmanr(x, y)
        return float(result.statistic), float(result.pvalue)
    ranks = np.empty((2, len(x)))
    ranks[0], ranks[1] = _average_ranks(x), _average_ranks(y)
    rs = np.corrcoef(ranks)
    dof = len(x) - 2
    with np.errstate(all="ignore"):
        t = rs * np.sqrt((dof / ((rs + 1.0) * (1.0 - rs))).clip(0))
        prob = 2 * special.stdtr(dof, -np.abs(t))
    return float(rs[1, 0]), float(prob[1, 0])
