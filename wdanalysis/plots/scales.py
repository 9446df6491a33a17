"""Colour scales that need only ``matplotlib.colors`` (not its figure machinery), for the
heatmap figures and index.html's heatmap tables alike."""

from __future__ import annotations

import numpy as np
from matplotlib.colors import Normalize, TwoSlopeNorm

__all__ = ["colour_norm"]


def colour_norm(values: np.ndarray) -> Normalize:
    """A diverging norm centred on 0 where the values change sign, else a linear one over
    their range (all-NaN: 0..1)."""
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return Normalize(0, 1)
    low, high = float(finite.min()), float(finite.max())
    if low < 0 < high:
        return TwoSlopeNorm(0.0, low, high)
    return Normalize(low, high if high > low else low + abs(low) * 1e-6 + 1e-12)
