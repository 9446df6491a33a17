"""``kill -9`` at every moment of an output folder's transaction leaves the old result or
the whole new one, and the next command leaves no temporary (issue 34).

The process is killed by itself at named moments (``WDANALYSIS_TEST_KILL_AT``,
:mod:`wdanalysis.storage.kill_points`): no timing, no races in the test.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from test_robustness import base_state, ft_run, run_cli, save_model

from wdanalysis.storage.out_folder import recover

ROOT = Path(__file__).resolve().parents[1]
WRITER = """
import sys
from pathlib import Path
from wdanalysis.storage.atomic_write import write_text_atomic
from wdanalysis.storage.out_folder import output_folder
target, tag, count = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
with output_folder(target) as stage:
    for i in range(count):
        write_text_atomic(stage.path / f"f{i}.txt", tag)
"""


def _write(target: Path, tag: str, count: int = 4, kill_at: str | None = None) -> int:
    env = {k: v for k, v in os.environ.items() if k != "WDANALYSIS_TEST_KILL_AT"}
    if kill_at:
        env["WDANALYSIS_TEST_KILL_AT"] = kill_at
    done = subprocess.run(
        [sys.executable, "-c", WRITER, str(target), tag, str(count)],
        cwd=ROOT,
        env=env,
        timeout=120,
    )
    return done.returncode


def _contents(target: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in target.iterdir()} if target.is_dir() else {}


def _leftovers(parent: Path) -> list[str]:
    return sorted(
        p.name for p in parent.rglob("*") if re.search(r"\.wd(tmp|ready|old)-|\.tmp$", p.name)
    )


OLD = {f"f{i}.txt": "old" for i in range(3)}
NEW = {f"f{i}.txt": "new" for i in range(4)}


@pytest.mark.parametrize(
    "moment, after_recovery",
    [
        ("staged", OLD),
        ("file-written:2", OLD),  # half the files written, one as a temporary
        ("before-commit", OLD),
        ("committed", NEW),  # the staging folder renamed ready: committed, rolled forward
        ("between-renames", NEW),  # the old folder moved away, the new not yet in place
        ("swapped", NEW),
    ],
)
def test_kill_at_every_moment(tmp_path, moment, after_recovery):
    target = tmp_path / "out"
    assert _write(target, "old", 3) == 0
    assert _contents(target) == OLD
    assert _write(target, "new", kill_at=moment) == -signal.SIGKILL
    seen = _contents(target)
    assert seen in (OLD, NEW, {}), seen  # {}: only between the two renames
    assert (seen == {}) == (moment == "between-renames")
    recover(target)  # what the next command does first, under the lock
    assert _contents(target) == after_recovery
    assert _leftovers(tmp_path) == []
    assert _write(target, "again", 2) == 0
    assert _contents(target) == {"f0.txt": "again", "f1.txt": "again"}  # no stale f2, f3
    assert _leftovers(tmp_path) == []


def test_kill_while_compare_draws_figures(capsys, tmp_path):
    """A real compare with figures, killed after its 5th file (figures half drawn)."""
    base = save_model(tmp_path / "base", base_state())
    run = ft_run(tmp_path / "run", base_state())
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "compare", base, run, "--out", out, "--quiet", "--no-figures")
    assert code == 0, err
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    env = dict(os.environ, WDANALYSIS_TEST_KILL_AT="file-written:5", OMP_NUM_THREADS="1")
    argv = ["compare", str(base), str(run), "--out", str(out), "--quiet", "--modules", "q_proj"]
    killed = subprocess.run(
        [sys.executable, "-m", "wdanalysis", *argv],
        cwd=ROOT,
        env=env,
        capture_output=True,
        timeout=300,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the old result, whole
    assert _leftovers(tmp_path)  # the killed run's staging folder is still there …
    code, _, err = run_cli(capsys, *argv[:-2], "--modules", "q_proj")
    assert code == 0, err
    assert _leftovers(tmp_path) == []  # … and gone once the next run started
    figures = {"figure2.png", "trajectories.png"}  # heatmaps are tables in index.html
    written = {"deltas.csv", "run.json", "fits.csv", "index.html", *figures}
    assert {p.name for p in out.iterdir()} == written


def test_two_concurrent_compares_never_mix(tmp_path):
    """Two compares into one folder at once: one may be refused (the lock), never mixed:
    the table and its record come from the same run (figures: test above)."""
    import pandas as pd

    base = save_model(tmp_path / "base", base_state())
    run = ft_run(tmp_path / "run", base_state(), steps=(10,))
    out = tmp_path / "out"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("WDANALYSIS_TEST_KILL_AT", None)
    started = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "wdanalysis",
                "compare",
                str(base),
                str(run),
                "--out",
                str(out),
                "--quiet",
                "--no-figures",
                "--modules",
                module,
            ],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for module in ("q_proj", "v_proj")
    ]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in started]
    assert any(code == 0 for code, _ in results), results
    for code, err in results:
        assert code == 0 or (code == 2 and "another wdanalysis command" in err), err
    modules = json.loads((out / "run.json").read_text())["options"]["modules"]
    assert set(pd.read_csv(out / "deltas.csv")["module"]) == set(modules)
    assert _leftovers(tmp_path) == []
