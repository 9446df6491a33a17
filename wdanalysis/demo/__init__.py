"""The paper's demo and studies: train FT/LoRA/DoRA, analyse, publish Figure 2, replicate
over seeds, ablate the regime, and the weight-decay dose × length study (``dose_study``).
May import train, plots, stats, the table and below."""

from __future__ import annotations

from wdanalysis.demo.reproduction import (
    ACCURACY_FILE,
    FIGURE_FILES,
    MODULES,
    RUN_LABELS,
    DemoResult,
    DemoSettings,
    analyse,
    figures_are_fresh,
    model_path,
    publish_figures,
    read_trained,
    run_demo,
    source_hash,
    train_three,
)

__all__ = [
    "ACCURACY_FILE",
    "FIGURE_FILES",
    "MODULES",
    "RUN_LABELS",
    "DemoResult",
    "DemoSettings",
    "analyse",
    "figures_are_fresh",
    "model_path",
    "publish_figures",
    "read_trained",
    "run_demo",
    "source_hash",
    "train_three",
]
