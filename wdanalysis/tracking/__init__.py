"""Live tracking: ΔM/ΔD of a model while it trains (:class:`Tracker`), the
``transformers.Trainer`` callback over it, what the ranks of a sharded run agree on
(``ranks``) and the dashboards ``report_to`` names (``dashboards``). May import the plots,
stats, table, engine and below."""

from __future__ import annotations

from wdanalysis.tracking.tracker import TRACKING_BUDGET, Tracker, append_rows, read_steps

__all__ = ["TRACKING_BUDGET", "Tracker", "WeightDecompositionCallback", "append_rows", "read_steps"]


def __getattr__(name: str):
    if name == "WeightDecompositionCallback":  # transformers is imported on first use only
        from wdanalysis.tracking import trainer_callback

        return trainer_callback.WeightDecompositionCallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
