"""Drawing and saving a report's figures, in parallel worker processes with a progress bar.

A figure is one job: built on a fixed layout (:mod:`wdanalysis.plots.layout`, nothing
measured), then saved once per format, each save one draw. The cyclic garbage collector
is paused while a figure is built and saved: matplotlib allocates tens of thousands of
small objects per figure, and the collections they trigger scan the whole heap (pandas,
matplotlib, scipy) again and again, a third of the drawing time.

When there are enough jobs to pay for it, worker processes draw beside the calling
process, which draws too (so the workers' start-up is not waited for). Workers are
forked from this process when it runs one thread and has not loaded torch (they start
at once, with everything imported), else from a ``forkserver`` that imported the
plotting modules once (safe whatever threads the caller runs; the command line starts
it early, :func:`prestart_workers`, so its workers too start at once; ``spawn`` where
there is no fork), so no worker imports torch. The order of the returned files never
depends on which process finished first.
"""

from __future__ import annotations

import gc
import multiprocessing
import os
import sys
import threading
import warnings
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import matplotlib
import pandas as pd

from wdanalysis.storage.atomic_write import save_figure_atomic

__all__ = [
    "FORMATS",
    "FigureJob",
    "draw_jobs",
    "parse_formats",
    "prestart_workers",
    "save_figure",
]

#: Formats a report can write: PNG to view, SVG and PDF for papers.
FORMATS: tuple[str, ...] = ("png", "svg", "pdf")
#: Fewer jobs than this are drawn in the calling process when workers must start afresh
#: (forkserver or spawn: ~1 s); forked workers start at once and draw from two jobs on.
PARALLEL_FROM = 6
#: zlib level of the PNG files: 1 compresses them about a third faster than the default 6,
#: for files ~15 % larger (figures are flat colours and lines).
PNG_COMPRESSION = 1
#: FreeType hinting of the PNG text: none draws a report page's ~130 labels ~25 % faster
#: than matplotlib's default (auto-hinting each glyph) and looks the same at 100 dpi.
TEXT_HINTING = "no_hinting"
#: What the worker processes' forkserver imports once, before forking them.
_PRELOAD = ["wdanalysis.plots.drawing", "wdanalysis.plots.figures", "wdanalysis.plots.overview"]


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
    """Save ``figure`` as ``stem.<format>`` for each format, atomically. A figure with a
    layout engine (a caller's constrained layout) is laid out by the first save and
    frozen for the others. Vector files carry no date and fixed SVG ids, so reruns give
    identical files."""
    paths = []
    for fmt in formats:
        metadata = {"svg": {"Date": None}, "pdf": {"CreationDate": None}}.get(fmt)
        with matplotlib.rc_context({"svg.hashsalt": "wdanalysis", "text.hinting": TEXT_HINTING}):
            kwargs = {}
            if fmt == "png":
                kwargs = {"dpi": dpi, "pil_kwargs": {"compress_level": PNG_COMPRESSION}}
            paths.append(
                save_figure_atomic(figure, out_dir / f"{stem}.{fmt}", metadata=metadata, **kwargs)
            )
        if figure.get_layout_engine() is not None:
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
    from wdanalysis.plots.overview import plot_figure2_overview, plot_trajectories_overview

    draw = {"figure2": plot_figure2, "trajectories": plot_trajectories, "heatmap": plot_heatmap}
    draw |= {"figure2_overview": plot_figure2_overview}
    draw |= {"trajectories_overview": plot_trajectories_overview}
    kwargs = dict(job.kwargs)
    if job.fits is not None:
        kwargs["fits"] = job.fits
    with warnings.catch_warnings(), paused_gc():
        warnings.simplefilter("ignore")  # dropped rows and unknown steps: already in the notes
        figure = draw[job.kind](job.data, **kwargs)
        return save_figure(figure, out_dir, job.stem, formats, dpi)


@contextmanager
def paused_gc() -> Iterator[None]:
    """The cyclic garbage collector off for a block (one figure), then as it was; the
    figure's cycles are collected by a later, ordinary collection."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def _main_reimport_safe() -> bool:
    """Whether a forkserver or spawned worker may import ``__main__`` again, as
    multiprocessing does: an interactive session or notebook kernel (no script), or
    wdanalysis' own command line. A user's script may lack the ``if __name__ ==
    "__main__"`` guard (the docs' snippets do), and would then run again in every worker."""
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    if getattr(main, "__file__", None) is None or (spec and spec.name.startswith("wdanalysis")):
        return True
    script = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else ""
    return script == "wdanalysis" or "ipykernel" in (spec.name if spec else "")


_prestarted = False  # whether prestart_workers() started this process's forkserver


def _forkserver():
    """The ``forkserver`` context with the plotting modules preloaded, or None where the
    platform has none."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return None
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(_PRELOAD)
    return context


def prestart_workers() -> bool:
    """Start the forkserver that figure workers fork from now, so that it imports the
    plotting modules in its own process while this one goes on; a later report's workers
    then start at once and draw its pages in parallel. The command line calls this before
    it imports torch and analyses (on another core, the imports cost no wall time); a
    process that may fork instead (:func:`_context`) need not. Returns whether a
    forkserver is running (False: no forkserver on this platform, or workers may not
    import this ``__main__`` again)."""
    global _prestarted
    if not _main_reimport_safe() or _forkserver() is None:
        return False
    from multiprocessing import forkserver

    try:
        forkserver.ensure_running()
    except OSError:  # e.g. no room for another process: the report draws here instead
        return False
    _prestarted = True
    return True


def _context():
    """``fork`` where it is safe and free (one thread, no torch loaded: workers inherit
    every imported module), else a forkserver that has imported the plotting modules
    once, else ``spawn`` (no fork on the platform); None where neither may import the
    caller's ``__main__`` again (:func:`_main_reimport_safe`): then figures are drawn
    here."""
    methods = multiprocessing.get_all_start_methods()
    if "fork" in methods and threading.active_count() == 1 and "torch" not in sys.modules:
        return multiprocessing.get_context("fork")
    if not _main_reimport_safe():
        return None
    return _forkserver() or multiprocessing.get_context("spawn")


def _beside_workers(
    jobs: Sequence[FigureJob], draw: Callable, workers: int, bar, context, meanwhile=None
) -> list:
    """Jobs drawn here from the front of the list while ``workers`` processes take them
    from the back (``meanwhile()`` runs here first); returns each job's result, in job
    order."""
    results: list = [None] * len(jobs)
    pending = deque(range(len(jobs)))
    running: dict[Future, int] = {}
    with ProcessPoolExecutor(workers, mp_context=context) as pool:

        def collect(timeout: float | None) -> None:
            done, _ = wait(running, timeout=timeout, return_when=FIRST_COMPLETED)
            for future in done:
                results[running.pop(future)] = future.result()
                bar.update()

        def top_up() -> None:
            while pending and len(running) < 2 * workers:
                index = pending.pop()
                running[pool.submit(draw, jobs[index])] = index

        top_up()
        if meanwhile is not None:
            meanwhile()
            collect(0)
            top_up()
        while pending:
            index = pending.popleft()
            results[index] = draw(jobs[index])
            bar.update()
            collect(0)
            top_up()
        while running:
            collect(None)
    return results


def _plan(workers: int | None, jobs: int):
    """How many processes draw (this one included) and the context that starts the others:
    one per core (``workers=None``) from :data:`PARALLEL_FROM` jobs, or from two where
    workers are forked (they start at once); ``(1, None)``: all drawn here."""
    if workers == 1 or jobs < 2:
        return 1, None
    context = _context()  # before any bar: tqdm may start a thread
    if context is None:
        return 1, None
    if workers is None:
        forked = context.get_start_method() == "fork" or _prestarted  # start at once
        workers = (os.cpu_count() or 1) if jobs >= (2 if forked else PARALLEL_FROM) else 1
    count = max(1, min(workers, jobs))
    return (count, context) if count > 1 else (1, None)


class _NoBar:
    """What :func:`draw_jobs` needs of a tqdm bar, for ``progress=False``."""

    def update(self) -> None:
        """Nothing to show."""

    def close(self) -> None:
        """Nothing to close."""


def _bar(total: int, progress: bool):
    """A tqdm bar on stderr, or none: ``tqdm.auto`` imports asyncio (~0.15 s), which a
    report without a bar need not pay."""
    if not progress:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="figures", unit="fig", leave=False)


def draw_jobs(
    jobs: Sequence[FigureJob],
    out_dir: Path,
    formats: Sequence[str],
    dpi: float,
    workers: int | None = 1,
    progress: bool = False,
    meanwhile: Callable[[], object] | None = None,
) -> list[list[Path]]:
    """Draw every job, in ``workers`` processes (None: one per core once there are enough
    jobs to pay for them; 1: in this process only; this process is one of them), with a
    tqdm bar on stderr when ``progress``. ``meanwhile()`` runs in this process while the
    workers draw (first, when there are none). Returns the files of each job, in job order."""
    formats = parse_formats(formats)
    count, context = _plan(workers, len(jobs))
    bar = _bar(len(jobs), progress)
    draw = partial(_draw, out_dir=out_dir, formats=formats, dpi=dpi)
    try:
        if count == 1:
            if meanwhile is not None:
                meanwhile()
            results = []
            for job in jobs:
                results.append(draw(job))
                bar.update()
            return results
        # this process is one of ``count``, unless it is busy with ``meanwhile`` first
        helpers = count if meanwhile is not None else count - 1
        return _beside_workers(jobs, draw, helpers, bar, context, meanwhile)
    finally:
        bar.close()
