"""Drawing and saving a report's figures, in parallel worker processes with a progress bar.

A figure is one job: built, laid out once (constrained layout), then saved in every
format with the layout frozen, so a second and third format cost a draw, not a new
layout. Jobs run in a process pool (``spawn``: safe whatever threads the caller runs)
when there are enough of them to pay for starting workers; the order of the returned
files never depends on which worker finished first.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path

import matplotlib
import pandas as pd

from wdanalysis.storage.atomic_write import save_figure_atomic

__all__ = ["FORMATS", "FigureJob", "draw_jobs", "parse_formats", "save_figure"]

#: Formats a report can write: PNG to view, SVG and PDF for papers.
FORMATS: tuple[str, ...] = ("png", "svg", "pdf")
#: Fewer jobs than this are drawn in the calling process: workers take ~1 s to start.
PARALLEL_FROM = 6


def parse_formats(formats: str | Sequence[str]) -> tuple[str, ...]:
    """``"png,svg"`` or ``["png", "pdf"]`` → checked, de-duplicated, in the given order."""
    items = formats.split(",") if isinstance(formats, str) else list(formats)
    chosen = tuple(dict.fromkeys(item.strip().lower().lstrip(".") for item in items if item))
    bad = [item for item in chosen if item not in FORMATS]
    if bad or not chosen:
        raise ValueError(
            f"unknown figure format(s) {', '.join(bad) or '(none)'}; choose from "
            f"{', '.join(FORMATS)} (e.g. png,svg)"
        )
    return chosen


def save_figure(figure, out_dir: Path, stem: str, formats: Sequence[str], dpi: float) -> list[Path]:
    """Save ``figure`` as ``stem.<format>`` for each format, atomically; the layout is
    computed once, by the first save, and frozen for the others. Vector files carry no
    date and fixed SVG ids, so reruns give identical files."""
    paths = []
    for fmt in formats:
        metadata = {"svg": {"Date": None}, "pdf": {"CreationDate": None}}.get(fmt)
        with matplotlib.rc_context({"svg.hashsalt": "wdanalysis"}):
            kwargs = {"dpi": dpi} if fmt == "png" else {}
            paths.append(
                save_figure_atomic(figure, out_dir / f"{stem}.{fmt}", metadata=metadata, **kwargs)
            )
        figure.set_layout_engine("none")  # positions stay as the first save laid them out
    return paths


@dataclass(frozen=True)
class FigureJob:
    """One figure to draw: which function (``figure2``, ``trajectories``, ``heatmap``), the
    rows it needs, its keyword arguments and the file stem."""

    kind: str
    stem: str
    data: pd.DataFrame
    kwargs: dict = field(default_factory=dict)
    fits: pd.DataFrame | None = None


def _draw(job: FigureJob, out_dir: Path, formats: tuple[str, ...], dpi: float) -> list[Path]:
    """Build and save one figure (runs in a worker process or in the caller)."""
    from wdanalysis.plots.figures import plot_figure2, plot_heatmap, plot_trajectories

    draw = {"figure2": plot_figure2, "trajectories": plot_trajectories, "heatmap": plot_heatmap}
    kwargs = dict(job.kwargs)
    if job.fits is not None:
        kwargs["fits"] = job.fits
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # dropped rows and unknown steps: already in the notes
        figure = draw[job.kind](job.data, **kwargs)
    return save_figure(figure, out_dir, job.stem, formats, dpi)


def _workers(workers: int | None, jobs: int) -> int:
    if workers is None:
        workers = (os.cpu_count() or 1) if jobs >= PARALLEL_FROM else 1
    return max(1, min(workers, jobs))


def draw_jobs(
    jobs: Sequence[FigureJob],
    out_dir: Path,
    formats: Sequence[str],
    dpi: float,
    workers: int | None = 1,
    progress: bool = False,
) -> list[list[Path]]:
    """Draw every job, in ``workers`` processes (None: one per core once there are enough
    jobs to pay for them; 1: in this process), with a tqdm bar on stderr when ``progress``.
    Returns the files of each job, in job order."""
    from tqdm.auto import tqdm

    formats = parse_formats(formats)
    count = _workers(workers, len(jobs))
    bar = tqdm(total=len(jobs), desc="figures", unit="fig", disable=not progress, leave=False)
    results: list[list[Path]] = [[] for _ in jobs]
    try:
        if count == 1:
            for index, job in enumerate(jobs):
                results[index] = _draw(job, out_dir, formats, dpi)
                bar.update()
            return results
        with ProcessPoolExecutor(count, mp_context=get_context("spawn")) as pool:
            futures = {
                pool.submit(_draw, job, out_dir, formats, dpi): index
                for index, job in enumerate(jobs)
            }
            for future in as_completed(futures):
                results[futures[future]] = future.result()
                bar.update()
        return results
    finally:
        bar.close()
