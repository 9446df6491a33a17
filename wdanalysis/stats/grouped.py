"""The rows of a deltas table split into the groups of :func:`~wdanalysis.stats.fits.fit_lines`,
as numpy arrays read once.

:func:`~wdanalysis.stats.fits.fit_lines` fits dozens of groups (every run, module, kind of
matrix and step); cutting the table into a pandas frame per group and reading its columns
again each time cost more than the fits. Here the columns are read once and every group is a
set of row positions, in table order, walked exactly as ``groupby(by, sort=False,
dropna=False)`` and, inside a group, ``groupby("step", sort=True, dropna=True)`` walk them,
so the fits, and the random draws of the layer bootstrap, are the same as per-frame code.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import pandas as pd

from wdanalysis.stats.clusters import CLUSTER, within_step_arrays

__all__ = ["GroupedRows"]


class GroupedRows:
    """The columns a fit needs, as arrays, and the groups as row positions.

    Args:
        clean: the deltas table, rows with undefined ΔD/y already dropped.
        by: the grouping columns.
        y: the quantity regressed on ΔD.
    """

    def __init__(self, clean: pd.DataFrame, by: Sequence[str], y: str) -> None:
        self.x = clean["delta_d"].to_numpy(np.float64)
        self.v = clean[y].to_numpy(np.float64)
        self.steps = clean["step"].to_numpy(dtype=float, na_value=np.nan)
        self.step_keys = clean["step"].array
        self.layers, _ = pd.factorize(clean["layer"])  # NA: -1
        column = CLUSTER if CLUSTER in clean.columns else "layer"
        self.clusters, _ = pd.factorize(clean[column], sort=False, use_na_sentinel=False)
        self.parts = np.stack(
            [np.ones_like(self.x), self.x, self.v, self.x * self.x, self.x * self.v, self.v**2],
            axis=1,
        )
        self.by = list(by)
        self._grouped = clean.groupby(self.by, sort=False, dropna=False)

    def groups(self) -> Iterator[tuple[dict, np.ndarray]]:
        """``(keys, positions)`` per group, in the order of ``groupby(by, sort=False)``."""
        codes = self._grouped.ngroup().to_numpy()
        keys = self._grouped.size().index
        order = np.argsort(codes, kind="stable")
        bounds = np.cumsum(np.bincount(codes, minlength=len(keys)))[:-1]
        for key, positions in zip(keys, np.split(order, bounds), strict=True):
            values = key if isinstance(key, tuple) else (key,)
            yield dict(zip(self.by, values, strict=True)), positions

    def step_groups(self, positions: np.ndarray) -> Iterator[tuple[object, np.ndarray]]:
        """``(step, positions)`` per known step of a group, steps ascending."""
        steps = self.steps[positions]
        known = ~np.isnan(steps)
        for step in np.unique(steps[known]):
            at_step = positions[steps == step]
            yield self.step_keys[at_step[0]], at_step

    def counts(self, positions: np.ndarray) -> tuple[int, int]:
        """Distinct known layers and steps among the rows."""
        layers = self.layers[positions]
        steps = self.steps[positions]
        n_layers = len(np.unique(layers[layers >= 0]))
        return n_layers, len(np.unique(steps[~np.isnan(steps)]))

    def within_step(self, positions: np.ndarray) -> tuple[float, float]:
        """:func:`~wdanalysis.stats.clusters.within_step` of the rows."""
        steps = self.steps[positions]
        steps = np.where(np.isnan(steps), -1.0, steps)
        return within_step_arrays(steps, self.x[positions], self.v[positions])

    def layer_sums(self, positions: np.ndarray) -> np.ndarray:
        """:func:`~wdanalysis.stats.clusters.layer_sums` of the rows (layers numbered in
        order of appearance, sums accumulated in row order)."""
        codes = self.clusters[positions]
        _, first, inverse = np.unique(codes, return_index=True, return_inverse=True)
        rank = np.empty(len(first), dtype=np.intp)
        rank[np.argsort(first, kind="stable")] = np.arange(len(first))
        sums = np.zeros((len(first), 6))
        np.add.at(sums, rank[inverse], self.parts[positions])
        return sums
