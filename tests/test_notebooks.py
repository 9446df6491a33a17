"""The committed notebooks: their text is what ``scripts/make_notebooks.py`` writes, they use
the public API only, and the reproduction notebook's stored outputs show the committed
results (rerun ``python scripts/make_notebooks.py --execute`` when ``figures/`` changes).
Executing them is tested in ``tests/test_demo.py``."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO / "notebooks"


def _generator():
    spec = importlib.util.spec_from_file_location(
        "make_notebooks", REPO / "scripts" / "make_notebooks.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _sources(notebook) -> list[tuple[str, str]]:
    return [(c["cell_type"], "".join(c["source"])) for c in notebook["cells"]]


def _outputs(notebook) -> list[dict]:
    return [o for c in notebook["cells"] if c["cell_type"] == "code" for o in c["outputs"]]


def test_committed_notebooks_are_what_the_generator_writes():
    make = _generator()
    for name, build in (
        ("figure2_reproduction.ipynb", make.reproduction),
        ("analyze_your_checkpoints.ipynb", make.template),
    ):
        committed = json.loads((NOTEBOOKS / name).read_text(encoding="utf-8"))
        assert _sources(committed) == _sources(build()), f"{name}: run scripts/make_notebooks.py"


def test_notebooks_use_the_public_api_only():
    for path in NOTEBOOKS.glob("*.ipynb"):
        code = "\n".join(s for kind, s in _sources(json.loads(path.read_text())) if kind == "code")
        modules = re.findall(r"^\s*(?:from|import) (wdanalysis[\w.]*)", code, re.M)
        assert modules, path.name
        # the top level, and the demo subpackage's own exports (wdanalysis/demo/__init__.py)
        assert set(modules) <= {"wdanalysis", "wdanalysis.demo"}, (path.name, modules)


def test_reproduction_outputs_show_the_committed_results():
    path = NOTEBOOKS / "figure2_reproduction.ipynb"
    make = _generator()
    assert path.stat().st_size <= make.MAX_BYTES
    outputs = _outputs(json.loads(path.read_text(encoding="utf-8")))
    assert not [o for o in outputs if o["output_type"] == "error"]
    assert len([o for o in outputs if "image/png" in o.get("data", {})]) >= 4
    text = "".join("".join(o.get("text", "")) for o in outputs if o["output_type"] == "stream")
    summary = pd.read_csv(REPO / "figures" / "summary.csv")
    for row in summary.itertuples():
        line = (
            f"{row.method:<4} {row.module:<5} pooled r = {row.pearson_r:+.2f} "
            f"[{row.pearson_r_boot_low:+.2f}, {row.pearson_r_boot_high:+.2f}]"
        )
        assert line in text, f"{line!r} not in the stored outputs: rerun make_notebooks --execute"


def test_the_template_is_stored_without_outputs():
    notebook = json.loads((NOTEBOOKS / "analyze_your_checkpoints.ipynb").read_text())
    assert not _outputs(notebook)  # it needs the reader's own paths
