"""wdanalysis: how did fine-tuning change a model's weights?

Weight-decomposition analysis of the DoRA paper (Liu et al., ICML 2024): per layer and per
training step, the change in magnitude (ΔM) and direction (ΔD) of weight matrices for full
fine-tuning, LoRA and DoRA checkpoints.

Pipeline: loaders (:mod:`~wdanalysis.checkpoints`, :mod:`~wdanalysis.adapters`) →
effective weights → decomposition math (:mod:`~wdanalysis.decomposition`) → tidy table
(:func:`compare`) → statistics (:mod:`~wdanalysis.stats`) → plots (:mod:`~wdanalysis.plotting`).
"""

from __future__ import annotations

from importlib import import_module

from wdanalysis.analysis import COLUMNS, compare
from wdanalysis.decomposition import decomposition_change
from wdanalysis.errors import WDAnalysisError
from wdanalysis.inspection import inspect

__version__ = "0.1.0"

# Statistics, plotting and the Trainer callback pull in scipy/matplotlib/transformers:
# import them on first use only.
_LAZY = {
    "fit_lines": "wdanalysis.stats",
    "compare_correlations": "wdanalysis.stats",
    "format_fit_table": "wdanalysis.stats",
    "within_step_correlation": "wdanalysis.resampling",
    "cluster_bootstrap": "wdanalysis.resampling",
    "layer_permutation_test": "wdanalysis.resampling",
    "across_seed_summary": "wdanalysis.resampling",
    "plot_figure2": "wdanalysis.plotting",
    "plot_trajectories": "wdanalysis.plotting",
    "write_report": "wdanalysis.report",
    "read_table": "wdanalysis.report",
    # transformers stays optional: the callback class is built on first use
    "WeightDecompositionCallback": "wdanalysis.callback",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'wdanalysis' has no attribute {name!r}")


__all__ = ["COLUMNS", "WDAnalysisError", "compare", "decomposition_change", "inspect", *_LAZY]
