"""The documentation: the site builds strictly, its getting-started code runs, the CLI
reference is complete, and the README stays a short page whose links resolve.

The getting-started pages are run as a reader would run them, top to bottom: every
``python`` block, and every ``bash`` block whose lines are all ``wdanalysis`` commands
(blocks that install packages or run ``make`` are left out), in one fresh process, in an
empty folder, on the tiny offline models the pages build themselves.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
RUNNABLE_PAGES = ["getting-started/install.md", "getting-started/quickstart.md"]
FENCE = re.compile(r"^```(\w+)[^\n]*\n(.*?)^```", re.M | re.S)


def _blocks(page: str) -> list[tuple[str, str]]:
    return FENCE.findall((DOCS / page).read_text(encoding="utf-8"))


def _is_cli_block(code: str) -> bool:
    lines = [line for line in code.splitlines() if line.strip()]
    return bool(lines) and all(line.startswith("wdanalysis ") for line in lines)


def getting_started_script() -> str:
    """The runnable blocks of the getting-started pages as one Python script."""
    parts = ["from wdanalysis.cli import main as _wdanalysis_cli"]
    for page in RUNNABLE_PAGES:
        for language, code in _blocks(page):
            if language == "python":
                parts.append(code)
            elif language == "bash" and _is_cli_block(code):
                for line in code.splitlines():
                    if line.strip():
                        argv = shlex.split(line)[1:]
                        parts.append(f"assert _wdanalysis_cli({argv!r}) == 0, {line!r}")
    return "\n".join(parts) + "\n"


def test_getting_started_has_runnable_python_and_cli_blocks():
    script = getting_started_script()
    assert "wdanalysis.compare(" in script
    assert "_wdanalysis_cli(['compare'" in script and "_wdanalysis_cli(['plot'" in script


def test_getting_started_code_runs_on_a_tiny_offline_model(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    (tmp_path / "getting_started.py").write_text(getting_started_script(), encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": str(REPO), "MPLBACKEND": "Agg", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "getting_started.py"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = tmp_path / "quickstart" / "results"
    for name in ("deltas.csv", "fits.csv", "run.json", "figure2.png", "trajectories.png"):
        assert (results / name).stat().st_size > 0, name
    assert (tmp_path / "quickstart" / "figure2_query.png").stat().st_size > 0


def _load_hooks():
    spec = importlib.util.spec_from_file_location("site_hooks", DOCS / "hooks" / "site_hooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_reference_lists_every_option_of_every_command():
    pytest.importorskip("mkdocs")
    from wdanalysis.cli import build_parser

    text = _load_hooks().cli_reference()
    parser = build_parser()
    subparsers = next(
        a.choices for a in parser._actions if isinstance(a, argparse._SubParsersAction)
    )
    assert set(subparsers) == {"compare", "plot", "inspect", "train", "demo"}
    for name, sub in subparsers.items():
        assert f"## `wdanalysis {name}`" in text
        for action in sub._actions:
            for option in action.option_strings:
                assert option in text, f"wdanalysis {name} {option}"


def test_site_builds_in_strict_mode(tmp_path):
    """A broken link or anchor, a page missing from the nav, a docstring reference that no
    longer resolves: any warning fails the build (``strict: true`` in mkdocs.yml)."""
    for package in ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers.python"):
        pytest.importorskip(package)
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", "NO_MKDOCS_2_WARNING": "1", "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    cli = (tmp_path / "reference" / "cli" / "index.html").read_text(encoding="utf-8")
    assert "--fan-in-fan-out" in cli and "<!-- cli-reference -->" not in cli
    api = (tmp_path / "reference" / "api" / "index.html").read_text(encoding="utf-8")
    for name in ("compare", "fit_lines", "plot_figure2", "layer_permutation_test"):
        assert re.search(rf'id="wdanalysis\.[\w.]*\.{name}"', api), name
    assert ":func:" not in api and ":mod:" not in api  # Sphinx roles rendered as code
    assert (tmp_path / "figures" / "figure2_query.png").is_file()
    assert "Keep a Changelog" in (tmp_path / "changelog" / "index.html").read_text()


def test_readme_is_short_and_its_links_resolve():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert len(readme.encode("utf-8")) <= 10 * 1024
    assert readme.index("make demo") < readme.index("wdanalysis compare")
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", readme):
        if not re.match(r"[a-z]+://", target):
            assert (REPO / target).exists(), target
