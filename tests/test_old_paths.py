"""Every import path users held before the package was grouped keeps working, and the
paths the README, the notebooks and ``scripts/`` show are the new ones."""

from __future__ import annotations

import importlib
import json
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from wdanalysis.old_paths import MOVED, new_path

REPO = Path(__file__).resolve().parents[1]

#: public names of the old modules that are packages now (read from the last flat layout)
OLD_PUBLIC = {
    "wdanalysis.stats": [
        "CONFIDENCE",
        "FIT_COLUMNS",
        "MODULE_ALIASES",
        "REQUIRED_COLUMNS",
        "compare_correlations",
        "drop_undefined",
        "fit_lines",
        "fit_one",
        "format_fit_table",
        "select_module",
        "validate_deltas",
    ],
    "wdanalysis.demo": [
        "ACCURACY_FILE",
        "DemoResult",
        "DemoSettings",
        "FIGURE_FILES",
        "MODULES",
        "RUN_LABELS",
        "analyse",
        "figures_are_fresh",
        "model_path",
        "publish_figures",
        "read_trained",
        "run_demo",
        "source_hash",
        "train_three",
    ],
    "wdanalysis.tracking": ["TRACKING_BUDGET", "Tracker", "append_rows", "read_steps"],
    "wdanalysis.cli": ["build_parser", "main", "run_handler", "version"],
    # names that moved out of a module into the table schema stay importable from it
    "wdanalysis.analysis": ["COLUMNS", "PartialResultError", "compare", "deltas_row"],
    "wdanalysis.report": ["ReportResult", "read_table", "save_figure_pair", "write_report"],
}


@pytest.mark.parametrize("old", sorted(MOVED))
def test_an_old_module_path_is_the_module_at_its_new_place(old):
    new = "wdanalysis." + MOVED[old]
    module = importlib.import_module(new)
    sys.modules.pop(f"wdanalysis.{old}", None)
    with pytest.warns(DeprecationWarning, match=re.escape(new)):
        aliased = importlib.import_module(f"wdanalysis.{old}")
    assert aliased is module
    assert module.__spec__.name == new  # the module keeps its own name and place


def test_submodules_of_a_moved_package_resolve_alike():
    assert new_path("wdanalysis.formats.mlx") == "wdanalysis.loaders.formats.mlx"
    assert new_path("wdanalysis.train.loop") is None  # not moved
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from wdanalysis.formats.mlx import open_mlx
        from wdanalysis.train.cli import register
    from wdanalysis.cli.train_command import register as new_register
    from wdanalysis.loaders.formats.mlx import open_mlx as new_open_mlx

    assert open_mlx is new_open_mlx and register is new_register


@pytest.mark.parametrize("package", sorted(OLD_PUBLIC))
def test_old_public_names_are_importable_where_they_were(package, recwarn):
    module = importlib.import_module(package)
    missing = [name for name in OLD_PUBLIC[package] if not hasattr(module, name)]
    assert not missing, f"{package} lost {missing}"


def test_the_root_exports_resolve():
    import wdanalysis

    for name in wdanalysis.__all__:
        assert getattr(wdanalysis, name) is not None, name


def _shown_imports() -> list[str]:
    """Every ``from wdanalysis… import …`` line of the README, the docs, the notebooks and
    scripts/."""
    texts = [(REPO / "README.md").read_text()]
    texts += [p.read_text() for p in sorted((REPO / "docs").rglob("*.md"))]
    texts += [p.read_text() for p in sorted((REPO / "scripts").glob("*.py"))]
    for notebook in sorted((REPO / "notebooks").glob("*.ipynb")):
        cells = json.loads(notebook.read_text())["cells"]
        texts += ["".join(cell["source"]) for cell in cells if cell["cell_type"] == "code"]
    pattern = re.compile(
        r"^\s*(from wdanalysis[\w.]* import [\w, ]+|import wdanalysis[\w.]*)", re.M
    )
    return sorted(
        {m.group(1).strip().rstrip(",") for text in texts for m in pattern.finditer(text)}
    )


def test_readme_notebooks_and_scripts_show_the_new_paths():
    lines = _shown_imports()
    assert len(lines) >= 5  # the parser finds them
    code = "import warnings\nwarnings.simplefilter('error', DeprecationWarning)\n" + "\n".join(
        lines
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, f"{lines}\n{done.stderr[-2000:]}"
