"""The figures' fixed layouts (no layout engine): nothing overlaps, nothing leaves the
figure, at a few and at many layers; and what makes drawing cheap stays true (no layout
engine, no torch import, workers started the cheap way when that is safe)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
from builders import synthetic_deltas  # noqa: E402

from wdanalysis.plots import drawing  # noqa: E402
from wdanalysis.plots.figures import plot_figure2, plot_heatmap, plot_trajectories  # noqa: E402
from wdanalysis.plots.layout import layout_of  # noqa: E402

SPEC = (("FT", -0.62), ("LoRA", 0.83), ("DoRA", -0.31))
TESTS = Path(__file__).resolve().parent


def texts_of(ax):
    """Every visible text an axes draws: tick labels, axis labels, title, multipliers."""
    axes = (ax.xaxis, ax.yaxis)
    texts = [ax.title, *(a.label for a in axes), *(a.get_offset_text() for a in axes)]
    texts += [t for t in ax.xaxis.get_ticklabels() if inside(t.get_position()[0], ax.get_xlim())]
    texts += [t for t in ax.yaxis.get_ticklabels() if inside(t.get_position()[1], ax.get_ylim())]
    return [t for t in texts if t.get_visible() and t.get_text()]


def inside(value: float, limits: tuple[float, float]) -> bool:
    """A tick within the view limits: matplotlib draws only those."""
    low, high = sorted(limits)
    return low - 1e-9 * abs(high - low) <= value <= high + 1e-9 * abs(high - low)


def boxes(figure):
    """Per axes (and per legend): its frame and the boxes of its texts, in pixels."""
    figure.draw_without_rendering()
    renderer = figure._get_renderer()
    named = []
    for index, ax in enumerate(figure.axes):
        name = f"{ax.get_label() or 'panel'} {index} {ax.get_title()!r}"
        frame = [ax.get_window_extent(renderer)]
        named.append((name, frame + [t.get_window_extent(renderer) for t in texts_of(ax)]))
    named += [("legend", [legend.get_window_extent(renderer)]) for legend in figure.legends]
    return named, figure.bbox


def overlap(one, other) -> float:
    both = one.intersection(one, other)
    return 0.0 if both is None else max(both.width, 0) * max(both.height, 0)


@pytest.mark.parametrize("layers, steps", [(6, (100, 200, 300)), (48, tuple(range(100, 900, 100)))])
@pytest.mark.parametrize("draw", [plot_figure2, plot_trajectories, plot_heatmap])
def test_nothing_overlaps_and_everything_is_inside(draw, layers, steps):
    deltas = synthetic_deltas(SPEC, steps, layers, ("q_proj",), ("encoder", "decoder"), 0)
    deltas[["delta_m", "delta_d"]] *= 1e-3  # tick labels with a ×10⁻ⁿ multiplier
    figure = draw(deltas, title="module: q_proj")
    assert layout_of(figure) is not None and figure.get_layout_engine() is None
    named, frame = boxes(figure)
    for index, (name, parts) in enumerate(named):
        for box in parts:
            assert frame.x0 - 1 <= box.x0 and box.x1 <= frame.x1 + 1, f"{name} leaves the figure"
            assert frame.y0 - 1 <= box.y0 and box.y1 <= frame.y1 + 1, f"{name} leaves the figure"
        for other, other_parts in named[index + 1 :]:
            worst = max(overlap(a, b) for a in parts for b in other_parts)
            assert worst < 4, f"{name} overlaps {other} ({draw.__name__}): {worst:.0f} px²"


def test_the_plotting_path_imports_no_torch():
    """Figure workers import the plotting modules; torch would cost seconds each, and
    scipy.stats ~1 s of every report (the fits need only scipy.special). The report's own
    process, whose pages workers draw, needs no matplotlib figure machinery (~0.3 s)."""
    code = (
        "import sys, wdanalysis.plots.report; print("
        "*(m in sys.modules for m in ('torch', 'scipy.stats', 'matplotlib.figure')))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.stdout.strip() == "False False False", done.stderr


def test_workers_fork_only_from_a_single_threaded_process_without_torch(monkeypatch):
    monkeypatch.setattr(drawing, "_main_reimport_safe", lambda: True)  # e.g. the CLI
    chosen = {}
    if "torch" not in sys.modules:
        chosen["alone"] = drawing._context().get_start_method()
    thread = threading.Thread(target=lambda: chosen.update(threaded=drawing._context()))
    stop = threading.Event()
    waiter = threading.Thread(target=stop.wait)
    waiter.start()
    try:
        thread.start()
        thread.join()
    finally:
        stop.set()
        waiter.join()
    assert chosen["threaded"].get_start_method() in ("forkserver", "spawn")
    assert chosen.get("alone", "fork") == "fork"


def test_no_worker_reimports_a_script_without_a_main_guard(monkeypatch, tmp_path):
    """A user's script (the docs' snippets have no ``if __name__ == "__main__"``) would run
    again in every forkserver/spawn worker: figures are then drawn in the calling process."""
    import types

    script = types.ModuleType("__main__")
    script.__file__ = str(tmp_path / "analyse.py")
    script.__spec__ = None
    monkeypatch.setitem(sys.modules, "__main__", script)
    monkeypatch.setattr(sys, "argv", [script.__file__])
    assert not drawing._main_reimport_safe()
    monkeypatch.setattr(threading, "active_count", lambda: 2)  # torch's threads, say
    assert drawing._context() is None
    cli = types.ModuleType("__main__")
    cli.__file__ = "/venv/bin/wdanalysis"
    cli.__spec__ = None
    monkeypatch.setitem(sys.modules, "__main__", cli)
    monkeypatch.setattr(sys, "argv", [cli.__file__])
    assert drawing._main_reimport_safe()


PRESTARTED = """
import json, sys
from pathlib import Path
import torch  # as in the command line: no fork from this process
from builders import synthetic_deltas
from wdanalysis.plots import drawing
from wdanalysis.plots.report import write_report
assert drawing.prestart_workers()
plans = []
plan = drawing._plan
drawing._plan = lambda *a: plans.append(plan(*a)) or plans[-1]
deltas = synthetic_deltas(steps=(1, 2), layers=4, modules=("q", "v"), seed=5)
parallel = write_report(deltas, Path(sys.argv[1]) / "parallel", workers=None, formats="png")
serial = write_report(deltas, Path(sys.argv[1]) / "serial", workers=1, formats="png")
print(json.dumps({
    "plans": [(count, context and context.get_start_method()) for count, context in plans],
    "same": [a.read_bytes() == b.read_bytes() for a, b in zip(parallel.paths, serial.paths)],
    "names": [p.name for p in parallel.paths],
}))
"""


def test_prestarted_forkserver_draws_the_two_pages_in_workers(tmp_path):
    """The command line starts the forkserver before it imports torch; with it running, a
    report of two pages is drawn by workers (not here) and writes the same bytes."""
    import json

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), *sys.path])}
    done = subprocess.run(
        [sys.executable, "-c", PRESTARTED, str(tmp_path)], capture_output=True, text=True, env=env
    )
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    cores = os.cpu_count() or 1
    assert result["plans"][0] == ([min(cores, 2), "forkserver"] if cores > 1 else [1, None])
    assert result["plans"][1] == [1, None]
    assert result["names"][1:3] == ["figure2.png", "trajectories.png"]
    assert all(result["same"][1:3])  # the pages; fits.csv and index.html name their folder
