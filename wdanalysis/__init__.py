"""wdanalysis: how did fine-tuning change a model's weights?

Weight-decomposition analysis of the DoRA paper (Liu et al., ICML 2024): per layer and per
training step, the change in magnitude (ΔM) and direction (ΔD) of weight matrices for full
fine-tuning, LoRA and DoRA checkpoints.

The subpackages are the pipeline, each importing only those before it:
:mod:`~wdanalysis.storage` (tensor files) → :mod:`~wdanalysis.loaders` (what a path
holds) → :mod:`~wdanalysis.weights` (selection, effective weights) →
:mod:`~wdanalysis.engine` (Eqs. 2-4, streamed) → :mod:`~wdanalysis.table`
(:func:`compare`) → :mod:`~wdanalysis.stats` → :mod:`~wdanalysis.plots`; beside them
:mod:`~wdanalysis.tracking` (live), :mod:`~wdanalysis.train`, :mod:`~wdanalysis.demo` and
:mod:`~wdanalysis.cli`.
"""

from __future__ import annotations

from importlib import import_module

from wdanalysis import old_paths
from wdanalysis.errors import WDAnalysisError

__version__ = "0.2.0"

old_paths.install()

# Everything is imported on first use, so that ``wdanalysis --help`` and ``import
# wdanalysis`` pull in neither torch, pandas, scipy, matplotlib nor transformers.
_LAZY = {
    "COLUMNS": "wdanalysis.table.schema",
    "compare": "wdanalysis.table.comparison",
    "inspect": "wdanalysis.table.inspection",
    "format_inspection": "wdanalysis.table.inspection",
    "decomposition_change": "wdanalysis.engine.decomposition",
    "fit_lines": "wdanalysis.stats.fits",
    "compare_correlations": "wdanalysis.stats.fits",
    "format_fit_table": "wdanalysis.stats.fit_table",
    "within_step_correlation": "wdanalysis.stats.resampling",
    "cluster_bootstrap": "wdanalysis.stats.resampling",
    "layer_permutation_test": "wdanalysis.stats.resampling",
    "across_seed_summary": "wdanalysis.stats.resampling",
    "plot_figure2": "wdanalysis.plots.figures",
    "plot_trajectories": "wdanalysis.plots.figures",
    "plot_heatmap": "wdanalysis.plots.heatmap",
    "write_report": "wdanalysis.plots.report",
    "read_table": "wdanalysis.table.schema",
    # transformers stays optional: the callback class is built on first use
    "WeightDecompositionCallback": "wdanalysis.tracking.trainer_callback",
}


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(import_module(_LAZY[name]), name)
        globals()[name] = value  # later look-ups skip this function
        return value
    raise AttributeError(f"module 'wdanalysis' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])


__all__ = ["WDAnalysisError", *_LAZY]
