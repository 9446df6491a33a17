"""The embedded demo (quick settings), its published figures, and both notebooks."""

from __future__ import annotations

import json
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from wdanalysis.demo.reproduction import (
    FIGURE_FILES,
    DemoSettings,
    figures_are_fresh,
    model_path,
    publish_figures,
    run_demo,
    source_hash,
)

REPO = Path(__file__).resolve().parent.parent
QUICK = DemoSettings.quick()


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    return run_demo(tmp_path_factory.mktemp("demo"), QUICK, progress=False)


def test_quick_demo_trains_three_runs_with_four_checkpoints(quick_demo):
    for method in ("ft", "lora", "dora"):
        steps = sorted(
            int(p.name.split("-")[1]) for p in (quick_demo.out_dir / method).glob("checkpoint-*")
        )
        assert steps == QUICK.save_steps() == [5, 10, 15, 20]
    assert (quick_demo.out_dir / "ft" / "checkpoint-20" / "model.safetensors").is_file()
    assert (quick_demo.out_dir / "dora" / "checkpoint-20" / "adapter_config.json").is_file()


def test_quick_demo_table_covers_every_method_step_and_layer(quick_demo):
    deltas = quick_demo.deltas
    assert set(deltas["method"]) == {"FT", "LoRA", "DoRA"}
    # 6 BERT layers x (query, value) x 4 steps per run
    assert deltas.groupby("method").size().to_dict() == {"FT": 48, "LoRA": 48, "DoRA": 48}
    assert set(deltas["module"]) == {"query", "value"}
    assert (deltas["delta_m"] > 0).all() and (deltas["delta_d"] > 0).all()
    assert deltas["zero_norm_vectors"].eq(0).all()


def test_quick_demo_summary_and_files(quick_demo):
    summary = quick_demo.summary
    assert len(summary) == 6  # 3 methods x 2 modules
    assert summary["accuracy"].between(0, 1).all()
    assert set(summary["paper_sign"]) == {"−", "+"}
    expected_sign = summary["method"].map({"FT": -1, "LoRA": 1, "DoRA": -1})
    assert (summary["sign_matches_paper"] == (expected_sign * summary["slope"] > 0)).all()
    for name in FIGURE_FILES:
        path = quick_demo.out_dir / name
        assert path.is_file() and path.stat().st_size > 0, name


def test_publish_figures_writes_a_manifest_that_tracks_freshness(quick_demo, tmp_path):
    assert not figures_are_fresh(tmp_path, QUICK)
    publish_figures(quick_demo, tmp_path)
    assert figures_are_fresh(tmp_path, QUICK)
    assert not figures_are_fresh(tmp_path, DemoSettings.quick(seed=1))
    (tmp_path / "fits.csv").unlink()
    assert not figures_are_fresh(tmp_path, QUICK)


def test_committed_figures_are_fresh():
    """figures/ must be what the current code's full demo produces (CI regenerates it)."""
    figures = REPO / "figures"
    manifest = json.loads((figures / "manifest.json").read_text())
    assert manifest["source_hash"] == source_hash(DemoSettings()), (
        "figures/ is stale: run `make figures` (or `wdanalysis demo --figures figures`)"
    )
    for name in FIGURE_FILES:
        assert (figures / name).stat().st_size > 0, name


def _execute(notebook: Path, parameters: str, workdir: Path) -> nbformat.NotebookNode:
    """Run a notebook papermill-style: a cell after the 'parameters' cell overrides them."""
    nb = nbformat.read(notebook, as_version=4)
    index = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    nb.cells.insert(index + 1, nbformat.v4.new_code_cell(parameters))
    # No per-cell time limit: on a loaded machine a cell is slow, not wrong (a fixed 600 s
    # limit failed a CI run shared with other jobs).
    NotebookClient(
        nb, timeout=None, kernel_name="python3", resources={"metadata": {"path": str(workdir)}}
    ).execute()
    return nb


def _outputs(nb) -> list:
    return [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]


def test_analysis_template_notebook_runs_on_the_demo_runs(quick_demo, tmp_path):
    runs = {m: str(quick_demo.out_dir / m.lower()) for m in ("FT", "LoRA", "DoRA")}
    params = f"BASE = {str(model_path())!r}\nRUNS = {runs!r}\nOUT = {str(tmp_path / 'out')!r}"
    nb = _execute(REPO / "notebooks" / "analyze_your_checkpoints.ipynb", params, tmp_path)
    assert (tmp_path / "out" / "fits.csv").is_file()
    images = [o for o in _outputs(nb) if "image/png" in o.get("data", {})]
    assert len(images) == 2  # one Figure 2 per module (query, value)


def test_reproduction_notebook_runs_in_quick_mode(tmp_path):
    params = f"QUICK = True\nOUT = {str(tmp_path / 'nb')!r}"
    nb = _execute(REPO / "notebooks" / "figure2_reproduction.ipynb", params, tmp_path)
    images = [o for o in _outputs(nb) if "image/png" in o.get("data", {})]
    assert len(images) >= 3  # Figure 2 query, Figure 6 value, trajectories
    assert not [o for o in _outputs(nb) if o.get("output_type") == "error"]
    for method in ("ft", "lora", "dora"):
        assert (tmp_path / "nb" / method / "checkpoint-20").is_dir()


def test_demo_reruns_over_its_own_runs_but_not_over_foreign_folders(tmp_path):
    from wdanalysis.demo.reproduction import _clear_previous_run
    from wdanalysis.errors import WDAnalysisError

    own = tmp_path / "ft"
    (own / "checkpoint-5").mkdir(parents=True)
    (own / "train_config.json").write_text("{}")
    _clear_previous_run(own)
    assert not own.exists()
    foreign = tmp_path / "lora"
    foreign.mkdir()
    (foreign / "precious.txt").write_text("keep me")
    with pytest.raises(WDAnalysisError, match="not a wdanalysis run folder"):
        _clear_previous_run(foreign)
    assert (foreign / "precious.txt").is_file()
