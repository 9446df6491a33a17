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
from typing import TYPE_CHECKING

import pandas as pd

from wdanalysis.plots.drawing import FigureJob, draw_jobs, parse_formats, save_figure
from wdanalysis.plots.html_heatmap import heatmap_section
from wdanalysis.plots.html_report import write_html_report
from wdanalysis.stats.fit_table import format_fit_table
from wdanalysis.stats.fits import drop_undefined, fit_lines, with_y
from wdanalysis.storage.atomic_write import write_csv_atomic
from wdanalysis.table.schema import read_table, validate_deltas

if TYPE_CHECKING:  # the figures are drawn by workers: this process needs no figure machinery
    from matplotlib.figure import Figure

__all__ = [
    "ALL_MODULES",
    "FIGURE_KINDS",
    "FIGURE_SETS",
    "OVERVIEW_FIGURES",
    "ReportResult",
    "read_table",
    "save_figure_pair",
    "write_report",
]

#: The figures of a report, per module with ``figures="all"``: ``<kind>_<module>.<format>``.
FIGURE_KINDS: tuple[str, ...] = ("figure2", "trajectories", "heatmap")
#: The overview files, every module on one page: ``<name>.<format>`` (figures="overview").
OVERVIEW_FIGURES: tuple[str, ...] = ("figure2", "trajectories")
#: The key of :attr:`ReportResult.figures` for the overview files (all modules).
ALL_MODULES = ""
#: What ``figures=`` may ask for.
FIGURE_SETS: tuple[str, ...] = ("overview", "all")


@dataclass(frozen=True)
class ReportResult:
    """What :func:`write_report` wrote, plus the fits and the terminal table the CLI prints."""

    out_dir: Path
    fits_csv: Path
    fits: pd.DataFrame
    fit_table: str  # format_fit_table(fits): what the CLI prints
    # module -> files written; ALL_MODULES ("") -> the overview pages of every module
    figures: dict[str, list[Path]] = field(default_factory=dict)
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


def _overview_jobs(data, options: dict, y: str) -> tuple[list[FigureJob], list[str]]:
    """Figure 2 and the trajectories of every module, one page each."""
    notes = []
    if data["step"].isna().any():
        notes.append("rows with an unknown step are left out of the trajectories")
    kwargs = {"y": y, "dpi": options["dpi"]}
    jobs = [FigureJob("figure2_overview", "figure2", data, {**kwargs, "pool": options["pool"]})]
    if data["step"].notna().any():
        jobs.append(FigureJob("trajectories_overview", "trajectories", data, kwargs))
    else:
        notes = ["no known training step, trajectories not drawn"]
    return jobs, notes


def _module_jobs(data, options: dict, y: str) -> tuple[list[FigureJob], list[str]]:
    """Per module: Figure 2, the trajectories (when some step is known) and the heatmap."""
    jobs, notes = [], []
    modules = list(dict.fromkeys(data["module"].astype(str)))
    for module in modules:
        rows = data.loc[data["module"].astype(str) == module]
        common = {"module": module, "title": f"module: {module}", "y": y}
        size = {"figsize": options["figsize"]}
        figure2 = {**common, **size, "sharex": options["sharex"], "sharey": options["sharey"]}
        figure2["pool"] = options["pool"]
        jobs.append(FigureJob("figure2", file_stem("figure2", module), rows, figure2))
        if rows["step"].notna().any():
            stem = file_stem("trajectories", module)
            jobs.append(FigureJob("trajectories", stem, rows, {**common, **size}))
            if rows["step"].isna().any():
                notes.append(f"{module}: rows with an unknown step are left out of trajectories")
        else:
            notes.append(f"{module}: no known training step, trajectories not drawn")
        jobs.append(FigureJob("heatmap", file_stem("heatmap", module), rows, common))
    return jobs, notes


def _key(job: FigureJob) -> str:
    return str(job.kwargs["module"]) if "module" in job.kwargs else ALL_MODULES


def write_report(
    deltas: pd.DataFrame,
    out_dir: str | Path,
    *,
    dpi: float = 100,
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
    figures: str = "overview",
) -> ReportResult:
    """Write ``fits.csv``, Figure 2 and the trajectories of every module, and
    ``index.html``, the page that shows them with the layer × step heatmaps.

    Fits and Figure 2 keep kinds of matrices apart (component, stack, attention kind: one
    fit and one row of panels each); ``pool=True`` pools them as the paper's Figure 2.
    ``y`` names the column regressed on ΔD and drawn (ΔM by default).

    ``figures="overview"`` (default): ``figure2.<format>`` and ``trajectories.<format>``,
    one page each with a row of panels per module, whatever the number of modules; the
    heatmaps are coloured tables in ``index.html``. ``figures="all"`` adds per module
    ``figure2_<module>``, ``trajectories_<module>`` and ``heatmap_<module>`` (larger
    panels, for a paper; ``sharex``, ``sharey`` and ``figsize`` apply to these).
    ``formats`` ("png,svg,pdf" or a list) defaults to PNG plus ``vector_format``; ``dpi``:
    the PNG resolution. Trajectories are skipped (with a note) when no checkpoint has a
    known step. Figures are drawn in ``workers`` processes (None: one per core when there
    are enough figures; 1: here) while the fits are computed, with a progress bar on
    stderr when ``progress``. ``index.html`` shows the fit table, every figure, the
    heatmaps, the notes and warnings, and the run facts of ``run.json`` when the folder
    has one. The caller writes ``deltas.csv`` itself; the returned table text is for the
    terminal.
    """
    chosen = _formats(formats, vector_format)
    if figures not in FIGURE_SETS:
        raise ValueError(f"figures must be one of {', '.join(FIGURE_SETS)}, got {figures!r}")
    validate_deltas(deltas)
    out_dir = Path(out_dir)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data = drop_undefined(deltas, y=y)  # warns once here, not once per figure
    if y == "delta_m_learned":
        with_y(data, y)  # its one-line error when the decay is unknown, before any drawing
    options = {"sharex": sharex, "sharey": sharey, "figsize": figsize, "pool": pool, "dpi": dpi}
    jobs, notes = _overview_jobs(data, options, y)
    if figures == "all":
        more, notes = _module_jobs(data, options, y)
        jobs += more
    done: dict = {}

    def tables_here() -> None:  # fits, fits.csv and the heatmap tables, while workers draw
        # (Figure 2 fits its panels itself)
        with warnings.catch_warnings(record=True) as also:
            warnings.simplefilter("always")
            done["fits"] = fit_lines(data, pool=pool, y=y)
        caught.extend(also)
        done["csv"] = write_csv_atomic(done["fits"], out_dir / "fits.csv")
        done["heatmaps"] = heatmap_section(data, y) if html else ""

    out_dir.mkdir(parents=True, exist_ok=True)
    files = draw_jobs(jobs, out_dir, chosen, dpi, workers, progress, meanwhile=tables_here)
    for warning in caught:  # passed on to the caller, and kept for index.html
        warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
    said = [str(w.message) for w in caught]
    drawn: dict[str, list[Path]] = {}
    for job, paths in zip(jobs, files, strict=True):
        drawn.setdefault(_key(job), []).extend(paths)
    fits, table = done["fits"], format_fit_table(done["fits"])
    result = ReportResult(out_dir, done["csv"], fits, table, drawn, notes, said)
    if not html:
        return result
    page = write_html_report(
        out_dir, fits, drawn, notes=notes, warnings=said, extra=done["heatmaps"]
    )
    return ReportResult(out_dir, done["csv"], fits, table, drawn, notes, said, page)
