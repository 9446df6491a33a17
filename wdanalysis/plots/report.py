"""Everything ``wdanalysis compare --out DIR`` writes besides deltas.csv: fits, figures and
the one page that shows them (``index.html``).

One function, :func:`write_report`, so that the CLI stays a thin shell and a notebook can
produce the same files. Every file is written atomically (a reader never sees half a PNG)
and every figure is closed over by nothing global, so a long report leaks no memory.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure

from wdanalysis.plots.drawing import FigureJob, draw_jobs, parse_formats, save_figure
from wdanalysis.plots.html_report import write_html_report
from wdanalysis.stats.fit_table import format_fit_table
from wdanalysis.stats.fits import drop_undefined, fit_lines
from wdanalysis.storage.atomic_write import write_csv_atomic
from wdanalysis.table.schema import read_table, validate_deltas

__all__ = ["FIGURE_KINDS", "ReportResult", "read_table", "save_figure_pair", "write_report"]

#: The figures of a report, per module: ``<kind>_<module>.<format>``.
FIGURE_KINDS: tuple[str, ...] = ("figure2", "trajectories", "heatmap")


@dataclass(frozen=True)
class ReportResult:
    """What :func:`write_report` wrote, plus the fits and the terminal table the CLI prints."""

    out_dir: Path
    fits_csv: Path
    fits: pd.DataFrame
    fit_table: str  # format_fit_table(fits): what the CLI prints
    figures: dict[str, list[Path]] = field(default_factory=dict)  # module -> files written
    notes: list[str] = field(default_factory=list)  # e.g. why trajectories were skipped
    warnings: list[str] = field(default_factory=list)  # e.g. rows dropped as NaN
    html: Path | None = None  # index.html

    @property
    def paths(self) -> list[Path]:
        """Every file written, fits.csv first, index.html last."""
        figures = [path for paths in self.figures.values() for path in paths]
        return [self.fits_csv, *figures, *([self.html] if self.html else [])]


def file_stem(name: str, module: str) -> str:
    """``<name>_<module>``, the module made file-name safe; the same however many modules."""
    return f"{name}_{re.sub(r'[^A-Za-z0-9_.-]+', '_', module)}"


def save_figure_pair(
    figure: Figure, out_dir: Path, stem: str, dpi: float = 200, vector_format: str = "svg"
) -> list[Path]:
    """The PNG for viewing and a vector copy for the paper, both atomically."""
    return save_figure(figure, Path(out_dir), stem, ("png", vector_format), dpi)


def _formats(formats: str | Sequence[str] | None, vector_format: str) -> tuple[str, ...]:
    if vector_format not in ("svg", "pdf"):
        raise ValueError(f"vector_format must be 'svg' or 'pdf', got {vector_format!r}")
    return parse_formats(formats if formats is not None else ("png", vector_format))


def _jobs(data, fits, options: dict, y: str) -> tuple[list[FigureJob], list[str]]:
    """Per module: Figure 2, the trajectories (when some step is known) and the heatmap."""
    jobs, notes = [], []
    modules = list(dict.fromkeys(data["module"].astype(str)))
    for module in modules:
        rows = data.loc[data["module"].astype(str) == module]
        common = {"module": module, "title": f"module: {module}", "y": y}
        size = {"figsize": options["figsize"]}
        figure2 = {**common, **size, "sharex": options["sharex"], "sharey": options["sharey"]}
        figure2["pool"] = options["pool"]
        module_fits = fits.loc[fits["module"].astype(str) == module]
        jobs.append(FigureJob("figure2", file_stem("figure2", module), rows, figure2, module_fits))
        if rows["step"].notna().any():
            stem = file_stem("trajectories", module)
            jobs.append(FigureJob("trajectories", stem, rows, {**common, **size}))
            if rows["step"].isna().any():
                notes.append(f"{module}: rows with an unknown step are left out of trajectories")
        else:
            notes.append(f"{module}: no known training step, trajectories not drawn")
        jobs.append(FigureJob("heatmap", file_stem("heatmap", module), rows, common))
    return jobs, notes


def write_report(
    deltas: pd.DataFrame,
    out_dir: str | Path,
    *,
    dpi: float = 200,
    vector_format: str = "svg",
    formats: str | Sequence[str] | None = None,
    sharex: bool = False,
    sharey: bool = False,
    figsize: tuple[float, float] | None = None,
    pool: bool = False,
    y: str = "delta_m",
    workers: int | None = 1,
    progress: bool = False,
    html: bool = True,
) -> ReportResult:
    """Write ``fits.csv``, per module Figure 2, the trajectories and the layer × step
    heatmap, and ``index.html``, the page that shows them all.

    Fits and Figure 2 keep kinds of matrices apart (component, stack, attention kind: one
    fit and one row of panels each); ``pool=True`` pools them as the paper's Figure 2.
    ``y`` names the column regressed on ΔD and drawn (ΔM by default).

    File names: ``figure2_<module>.<format>``, ``trajectories_<module>.<format>`` and
    ``heatmap_<module>.<format>`` however many modules the table holds; ``formats``
    ("png,svg,pdf" or a list) defaults to PNG plus ``vector_format``. Trajectories are
    skipped (with a note) when no checkpoint has a known step. Figures are drawn in
    ``workers`` processes (None: one per core when there are enough figures; 1: here),
    with a progress bar on stderr when ``progress``. ``index.html`` shows the fit table,
    every figure, the notes and warnings, and the run facts of ``run.json`` when the
    folder has one. The caller writes ``deltas.csv`` itself; the returned table text is
    for the terminal.
    """
    chosen = _formats(formats, vector_format)
    validate_deltas(deltas)
    out_dir = Path(out_dir)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data = drop_undefined(deltas, y=y)  # warns once here, not once per figure
        fits = fit_lines(data, pool=pool, y=y)
    for warning in caught:  # passed on to the caller, and kept for index.html
        warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
    said = [str(w.message) for w in caught]
    fits_csv = write_csv_atomic(fits, out_dir / "fits.csv")
    options = {"sharex": sharex, "sharey": sharey, "figsize": figsize, "pool": pool}
    jobs, notes = _jobs(data, fits, options, y)
    files = draw_jobs(jobs, out_dir, chosen, dpi, workers=workers, progress=progress)
    figures: dict[str, list[Path]] = {}
    for job, paths in zip(jobs, files, strict=True):
        figures.setdefault(str(job.kwargs["module"]), []).extend(paths)
    table = format_fit_table(fits)
    result = ReportResult(out_dir, fits_csv, fits, table, figures, notes, said)
    if not html:
        return result
    page = write_html_report(out_dir, fits, figures, notes=notes, warnings=said)
    return ReportResult(out_dir, fits_csv, fits, table, figures, notes, said, page)
