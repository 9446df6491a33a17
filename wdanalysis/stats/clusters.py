"""Per-group building blocks of the statistics that respect layers × steps.

The points of one run and module are layers seen at several steps: a layer's points share
whatever makes that layer special. These functions work on the rows of *one* group (one
run, module and kind of matrix) and are shared by :func:`wdanalysis.stats.fits.fit_lines`
(the default columns of ``fits.csv``) and :mod:`wdanalysis.stats.resampling` (the README
analysis), so both give the same numbers from the same random draws.

Everything works from per-layer sufficient sums (float64), so thousands of resamples of a
Figure-2 table take milliseconds.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from wdanalysis.errors import WDAnalysisError

__all__ = [
    "BOOT_COLUMNS",
    "CLUSTER",
    "MIN_CLUSTERS",
    "LayerBootstrap",
    "bootstrap_group",
    "bootstrap_sums",
    "layer_sums",
    "note_few_clusters",
    "slope_r",
    "within_step",
    "within_step_arrays",
]

#: One matrix = one layer of one module (encoder and decoder layers are apart).
CLUSTER = "parameter"
#: Fewer whole layers than this: the layer bootstrap has no spread to show (NaN, noted).
MIN_CLUSTERS = 3
#: The interval bounds :func:`bootstrap_group` returns.
BOOT_COLUMNS = ("slope_boot_low", "slope_boot_high", "pearson_r_boot_low", "pearson_r_boot_high")


def cluster_codes(frame: pd.DataFrame) -> np.ndarray:
    """The cluster (layer matrix) of each row, numbered in order of appearance.

    ``parameter`` names the matrix; a table without it (a hand-made one) clusters by layer.
    """
    column = CLUSTER if CLUSTER in frame.columns else "layer"
    codes, _ = pd.factorize(frame[column], sort=False, use_na_sentinel=False)
    return codes


def layer_sums(frame: pd.DataFrame, y: str = "delta_m") -> np.ndarray:
    """Per layer: ``[n, Σx, Σy, Σxx, Σxy, Σyy]`` of x = ΔD and y (ΔM by default), float64."""
    x = frame["delta_d"].to_numpy(np.float64)
    v = frame[y].to_numpy(np.float64)
    parts = np.stack([np.ones_like(x), x, v, x * x, x * v, v * v], axis=1)
    codes = cluster_codes(frame)
    sums = np.zeros((codes.max() + 1, 6))
    np.add.at(sums, codes, parts)
    return sums


def slope_r(totals: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares slope of y on x and Pearson r from summed moments (any leading shape)."""
    n, sx, sy, sxx, sxy, syy = np.moveaxis(totals, -1, 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        cxx = sxx - sx * sx / n
        cxy = sxy - sx * sy / n
        cyy = syy - sy * sy / n
        slope = cxy / cxx
        r = cxy / np.sqrt(cxx * cyy)
    return slope, np.clip(r, -1.0, 1.0)


def bootstrap_group(
    frame: pd.DataFrame,
    rng: np.random.Generator,
    n_boot: int,
    level: float = 0.95,
    y: str = "delta_m",
) -> dict[str, float]:
    """Percentile intervals of the pooled slope and r of one group, resampling whole layers.

    Each of ``n_boot`` resamples draws as many layers as the group has, with replacement,
    and keeps all of a drawn layer's steps together. The draws come from ``rng`` (one
    multinomial call per group), so a caller that walks the groups in the same order with
    the same seed gets the same intervals. Returns ``n_clusters`` and the four bounds.
    """
    return bootstrap_sums(layer_sums(frame, y), rng, n_boot, level)


def bootstrap_sums(
    sums: np.ndarray, rng: np.random.Generator, n_boot: int, level: float = 0.95
) -> dict[str, float]:
    """:func:`bootstrap_group` from the group's per-layer sums (:func:`layer_sums`, layers
    in order of appearance: the order decides which draw goes to which layer)."""
    k = len(sums)
    counts = rng.multinomial(k, np.full(k, 1 / k), size=n_boot).astype(np.float64)
    slopes, rs = slope_r(counts @ sums)
    tail = (1 - level) / 2 * 100
    out: dict[str, float] = {"n_clusters": k}
    for name, values in (("slope", slopes), ("pearson_r", rs)):
        values = values[np.isfinite(values)]
        low, high = np.percentile(values, [tail, 100 - tail]) if len(values) else (np.nan,) * 2
        out[f"{name}_boot_low"], out[f"{name}_boot_high"] = float(low), float(high)
    return out


def within_step(frame: pd.DataFrame, y: str = "delta_m") -> tuple[float, float]:
    """Pearson r and slope of y on ΔD after centring both per step (an unknown step is a
    step of its own). The common growth over training is removed: what is left is "at a
    given step, do layers that turned more also change more in y?"."""
    steps = frame["step"].to_numpy(dtype=float, na_value=-1.0)
    x = frame["delta_d"].to_numpy(np.float64)
    return within_step_arrays(steps, x, frame[y].to_numpy(np.float64))


def within_step_arrays(steps: np.ndarray, x: np.ndarray, v: np.ndarray) -> tuple[float, float]:
    """:func:`within_step` from arrays (``steps`` float, an unknown step as -1)."""
    codes, _ = pd.factorize(steps)
    counts = np.bincount(codes).astype(np.float64)
    x = x - (np.bincount(codes, x) / counts)[codes]
    v = v - (np.bincount(codes, v) / counts)[codes]
    sxx, sxy, svv = float(x @ x), float(x @ v), float(v @ v)
    r = sxy / math.sqrt(sxx * svv) if sxx > 0 and svv > 0 else math.nan
    return r, (sxy / sxx if sxx > 0 else math.nan)


@dataclass
class LayerBootstrap:
    """The layer bootstrap of :func:`~wdanalysis.stats.fits.fit_lines`: its settings and two
    random streams, one for the pooled rows (the same draws as
    :func:`~wdanalysis.stats.resampling.cluster_bootstrap` with this seed, so the README's
    analysis and ``fits.csv`` agree) and one for the per-step rows. ``n_boot=0``: none."""

    y: str
    n_boot: int
    seed: int
    level: float = 0.95
    streams: dict[str, np.random.Generator] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.n_boot and self.n_boot < 100:
            raise WDAnalysisError(
                f"n_boot must be 0 (no bootstrap) or at least 100, got {self.n_boot}"
            )
        self.streams = {
            "pooled": np.random.default_rng(self.seed),
            "step": np.random.default_rng([self.seed, 1]),
        }

    def columns(self, frame: pd.DataFrame, scope: str) -> dict[str, float]:
        """The bootstrap columns of one fit (``scope``: "pooled" or "step"); NaN bounds
        where the group has fewer than :data:`MIN_CLUSTERS` layers."""
        return self.columns_from(lambda: layer_sums(frame, self.y), scope)

    def columns_from(self, sums: Callable[[], np.ndarray], scope: str) -> dict[str, float]:
        """:meth:`columns` from a callable giving the group's :func:`layer_sums` (called
        only when a bootstrap is drawn)."""
        out = {"n_boot": self.n_boot, "boot_seed": self.seed, "n_clusters": math.nan}
        out.update(dict.fromkeys(BOOT_COLUMNS, math.nan))
        if not self.n_boot:
            return out
        boot = bootstrap_sums(sums(), self.streams[scope], self.n_boot, self.level)
        out["n_clusters"] = boot["n_clusters"]
        if boot["n_clusters"] >= MIN_CLUSTERS:
            out.update({key: boot[key] for key in BOOT_COLUMNS})
        return out


def note_few_clusters(fits: pd.DataFrame) -> None:
    """Say, in ``note``, why a bootstrap interval is empty: too few whole layers (and keep
    ``n_clusters`` an integer column, empty where no bootstrap was drawn)."""
    fits["n_clusters"] = fits["n_clusters"].astype("Int64")
    few = fits["n_clusters"].lt(MIN_CLUSTERS).fillna(False) & (fits["n_boot"] > 0)
    text = f"layer bootstrap needs at least {MIN_CLUSTERS} layers"
    notes = fits.loc[few, "note"].fillna("").astype(str)
    fits.loc[few, "note"] = [f"{n}; {text}" if n else text for n in notes]
