"""Names and orders every figure and report page shares, with no matplotlib: panel order,
panel titles, axis labels. Kept apart from :mod:`wdanalysis.plots.common` so that the
report's process, whose figures workers draw, need not import matplotlib's figure
machinery (~0.3 s) to write index.html.
"""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd

from wdanalysis.errors import WDAnalysisError
from wdanalysis.table.schema import name_column

__all__ = [
    "MANY_LAYERS",
    "PAPER_ORDER",
    "X_LABEL",
    "cycle",
    "n_layers",
    "order_runs",
    "panel_titles",
    "y_label",
]

#: Panel order of the paper; other methods follow in input order.
PAPER_ORDER: tuple[str, ...] = ("FT", "LoRA", "DoRA")
#: Above this many layers a colour per layer cannot be told apart: the figures switch to
#: their scalable design (steps as colour, layers summarised; docs/guides/report.md).
MANY_LAYERS = 12

X_LABEL = "ΔD (direction change)"
_Y_LABELS = {
    "delta_m": "ΔM (magnitude change)",
    "delta_d": "ΔD (direction change)",
    "delta_m_learned": "ΔM learned (decay's shrinkage removed)",
}


def y_label(y: str, short: bool = False) -> str:
    """The axis label of a column: ``delta_m`` → "ΔM (magnitude change)", others by name."""
    if short:
        short_labels = {"delta_m_learned": "ΔM learned"}
        return {"delta_m": "ΔM (magnitude)", "delta_d": "ΔD (direction)", **short_labels}.get(y, y)
    return _Y_LABELS.get(y, y)


def order_runs(deltas: pd.DataFrame, runs: Sequence[str] | None = None) -> list[str]:
    """Runs in panel order: as given, else FT, LoRA, DoRA first (as in the paper), then input order.

    ``runs`` may name runs or method labels; a method label stands for all its runs.
    """
    present = list(dict.fromkeys(deltas["run"].astype(str)))
    if runs is not None:
        chosen: list[str] = []
        for name in runs:
            by_method = deltas.loc[deltas[name_column(deltas)].astype(str) == str(name), "run"]
            hits = [str(name)] if str(name) in present else list(dict.fromkeys(by_method))
            if not hits:
                raise WDAnalysisError(
                    f"no run or method called {name!r}; runs present: {', '.join(present)}"
                )
            chosen += [run for run in hits if run not in chosen]
        return chosen
    method_of = deltas.groupby("run", sort=False)[name_column(deltas)].first()
    rank = {m.lower(): i for i, m in enumerate(PAPER_ORDER)}
    return sorted(present, key=lambda run: rank.get(str(method_of[run]).lower(), len(rank)))


def panel_titles(data: pd.DataFrame, order: list[str]) -> dict[str, str]:
    """Method name per panel; the run name is added only where two runs share a method."""
    method_of = data.groupby("run", sort=False)[name_column(data)].first().astype(str)
    counts = method_of.loc[order].value_counts()
    return {
        run: method_of[run] if counts[method_of[run]] == 1 else f"{method_of[run]} · {run}"
        for run in order
    }


def n_layers(data: pd.DataFrame) -> int:
    """How many distinct layer indices the rows hold."""
    return int(pd.to_numeric(data["layer"], errors="coerce").nunique())


def cycle(items: Sequence[str], n: int) -> list[str]:
    """``n`` items, ``items`` repeated as needed."""
    return [items[i % len(items)] for i in range(n)]
