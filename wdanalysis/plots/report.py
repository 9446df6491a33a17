"""Everything ``wdanalysis compare --out DIR`` writes besides deltas.csv: fits and figures.

One function, :func:`write_report`, so that the CLI stays a thin shell and a notebook can
produce the same files. Every file is written atomically (a reader never sees half a PNG)
and every figure is closed over by nothing global, so a long report leaks no memory.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib
import pandas as pd
from matplotlib.figure import Figure

from wdanalysis.plots.figures import plot_figure2, plot_trajectories
from wdanalysis.stats.fit_table import format_fit_table
from wdanalysis.stats.fits import drop_undefined, fit_lines
from wdanalysis.storage.atomic_write import save_figure_atomic, write_csv_atomic
from wdanalysis.table.schema import read_table, validate_deltas, with_y

__all__ = ["ReportResult", "read_table", "save_figure_pair", "write_report"]


@dataclass(frozen=True)
class ReportResult:
    """What :func:`write_report` wrote, plus the fits and the terminal table the CLI prints."""

    out_dir: Path
    fits_csv: Path
    fits: pd.DataFrame
    fit_table: str  # format_fit_table(fits): what the CLI prints
    figures: dict[str, list[Path]] = field(default_factory=dict)  # module -> files written
    notes: list[str] = field(default_factory=list)  # e.g. why trajectories were skipped

    @property
    def paths(self) -> list[Path]:
        """Every file written, fits.csv first."""
        return [self.fits_csv, *(path for paths in self.figures.values() for path in paths)]


def _file_stem(name: str, module: str, several: bool) -> str:
    """``figure2`` for a single module, ``figure2_<module>`` (file-name safe) for several."""
    return f"{name}_{re.sub(r'[^A-Za-z0-9_.-]+', '_', module)}" if several else name


def save_figure_pair(
    figure: Figure, out_dir: Path, stem: str, dpi: float = 200, vector_format: str = "svg"
) -> list[Path]:
    """The PNG for viewing and a vector copy for the paper, both atomically."""
    png = save_figure_atomic(figure, out_dir / f"{stem}.png", dpi=dpi)
    # no creation date in the vector file, so that reruns give identical files
    metadata = {"Date": None} if vector_format in ("svg", "pdf") else None
    # a fixed salt for SVG element ids, so that reruns give byte-identical files
    with matplotlib.rc_context({"svg.hashsalt": "wdanalysis"}):
        vector = save_figure_atomic(figure, out_dir / f"{stem}.{vector_format}", metadata=metadata)
    return [png, vector]


def write_report(
    deltas: pd.DataFrame,
    out_dir: str | Path,
    *,
    dpi: float = 200,
    vector_format: str = "svg",
    sharex: bool = False,
    sharey: bool = False,
    figsize: tuple[float, float] | None = None,
    pool: bool = False,
    y: str = "delta_m",
) -> ReportResult:
    """Write ``fits.csv`` and, per module, Figure 2 and the trajectory view (PNG + vector).

    Fits and Figure 2 keep kinds of matrices apart (component, stack, attention kind: one
    fit and one row of panels each); ``pool=True`` pools them as the paper's Figure 2.

    File names: ``figure2.png``/``.svg`` and ``trajectories.png``/``.svg`` when the table
    holds one module, ``figure2_<module>.*`` and ``trajectories_<module>.*`` when it holds
    several. Trajectories are skipped (with a note) when no checkpoint has a known step.
    The caller writes ``deltas.csv`` itself; the returned table text is for the terminal.
    ``y="delta_m_learned"``: fits and figures of ΔM less the weight decay's shrinkage.
    """
    if vector_format not in ("svg", "pdf"):
        raise ValueError(f"vector_format must be 'svg' or 'pdf', got {vector_format!r}")
    validate_deltas(deltas)
    out_dir = Path(out_dir)
    data = drop_undefined(with_y(deltas, y))  # warns once here, not once per figure
    fits = fit_lines(data, pool=pool)
    fits_csv = write_csv_atomic(fits, out_dir / "fits.csv")
    modules = list(dict.fromkeys(data["module"].astype(str)))
    several = len(modules) > 1
    figures: dict[str, list[Path]] = {}
    notes: list[str] = []
    for module in modules:
        title = f"module: {module}" if several else None
        common = {"module": module, "figsize": figsize, "title": title}
        figure = plot_figure2(data, fits=fits, sharex=sharex, sharey=sharey, pool=pool, **common)
        paths = save_figure_pair(
            figure, out_dir, _file_stem("figure2", module, several), dpi, vector_format
        )
        rows = data.loc[data["module"].astype(str) == module]
        if rows["step"].notna().any():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # unknown-step rows: already in the notes
                figure = plot_trajectories(data, **common)
            stem = _file_stem("trajectories", module, several)
            paths += save_figure_pair(figure, out_dir, stem, dpi, vector_format)
            if rows["step"].isna().any():
                notes.append(f"{module}: rows with an unknown step are left out of trajectories")
        else:
            notes.append(f"{module}: no known training step, trajectories not drawn")
        figures[module] = paths
    return ReportResult(out_dir, fits_csv, fits, format_fit_table(fits), figures, notes)
