"""Figures against the analysis: does drawing the report cost more than computing it?

One command::

    python benchmarks/bench_figures.py                  # ~1.4 GB of checkpoints (8 × 7)
    python benchmarks/bench_figures.py --hidden 256     # a quick, small set

Cases, each timed in one run on the same machine:

1. ``8x7``: a LLaMA-shaped fp16 set written under ``--workdir`` (base + 3 runs × 2
   checkpoints, 8 layers × 7 linear modules: q, k, v, o, gate, up, down; ~1.4 GB at the
   default ``--hidden 1024``), analysed with :func:`wdanalysis.compare` (the analysis),
   then the report drawn by the code before issue 31 (``git archive`` of
   :data:`BEFORE`, serial), by the per-module report of :data:`PER_MODULE` (3 figures per
   module, the CLI's default then) and by the current code (the overview pages);
2. ``32-layer``: a synthetic deltas table, 32 layers × 8 steps × 3 runs × 2 modules;
3. ``reference``: the demo's own ``figures/deltas.csv`` (6 layers × 2 modules); its
   analysis (``compare`` of the demo's checkpoints) is timed too where ``--demo-runs``
   holds them (``wdanalysis demo`` writes them to ``runs/demo``);
4. ``8x7 CLI`` and ``reference CLI``: ``wdanalysis compare`` end to end on the 8 × 7 set
   and on the demo's checkpoints, with and without ``--no-figures`` (interpreter, imports
   and writing included): what the figures add to a user's command, the measure of the
   issue that asked for this benchmark.

Every report and every analysis runs in a fresh subprocess and is timed inside it around
``write_report`` or ``compare`` (so interpreter start-up and imports are left out of both,
and both pay their first-call costs; the workers' start-up is counted). Reports: fits,
every figure and index.html; the old path PNG + SVG serially, 2 figures per module; the
per-module path PNG in parallel workers; the new path Figure 2 and the trajectories of
every module on one page each, heatmaps in index.html, as PNG + SVG serially, PNG + SVG
with workers, PNG with workers (the CLI's options in a process without torch: a
notebook's) and PNG serially (what the command line does: torch is loaded there, so two
pages are drawn in its process). Each is timed ``--repeat`` times (the old path once);
the table shows the median wall time, the JSON every time, the median CPU seconds (the
process and its workers: what an idle machine's cores would have to do) and the load
average (1, 5, 15 min) before each case. Prints a table and writes
``benchmarks/results/bench_figures.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
#: The commit before issue 31 (serial figures, no heatmap, no index.html).
BEFORE = "faa14c56407da0069f6a723ee7352cb6f7d83444"
#: The last commit with one figure file per module and kind (figure2_, trajectories_,
#: heatmap_<module>), before the overview pages.
PER_MODULE = "3e7343c9bf612d3c4eb02ad2b7aa9e15d1b398c0"
MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SHAPES = {"q_proj": "hh", "k_proj": "hh", "v_proj": "hh", "o_proj": "hh"}
SHAPES |= {"gate_proj": "ih", "up_proj": "ih", "down_proj": "hi"}

TIMED = """
import resource, sys, time
sys.path.insert(0, sys.argv[1])
import matplotlib
matplotlib.use("Agg")
from wdanalysis.plots.report import write_report
try:  # imported before the clock starts, as torch is for the analysis (a report's own
    import wdanalysis.plots.figures, wdanalysis.plots.overview  # process no longer imports
except ImportError:  # them: its workers do); the old trees have no overview module
    pass
from wdanalysis.table.schema import read_table
table = read_table(sys.argv[2])
kwargs = eval(sys.argv[4])
def cpu():
    return sum(
        u.ru_utime + u.ru_stime
        for u in map(resource.getrusage, (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    )
started, spent = time.perf_counter(), cpu()
result = write_report(table, sys.argv[3], **kwargs)
print("SECONDS", time.perf_counter() - started, len(result.paths), cpu() - spent)
"""


#: The analysis timed as the report is: a fresh process, timed inside around the call
#: (imports left out), so both pay the same first-call costs.
TIMED_ANALYSIS = """
import json, resource, sys, time
sys.path.insert(0, sys.argv[1])
from wdanalysis import compare
base, runs, modules = json.loads(sys.argv[2])
def cpu():
    return sum(
        u.ru_utime + u.ru_stime
        for u in map(resource.getrusage, (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    )
started, spent = time.perf_counter(), cpu()
compare(base, runs, modules=modules, progress=False)
print("SECONDS", time.perf_counter() - started, 0, cpu() - spent)
"""


def write_set(work: Path, hidden: int, layers: int) -> dict[str, Path]:
    """Base and three runs of two full checkpoints each (fp16 safetensors + config.json)."""
    import torch
    from safetensors.torch import save_file

    inter = int(hidden * 2.75)
    dims = {"h": hidden, "i": inter}
    config = {"model_type": "llama", "hidden_size": hidden, "num_hidden_layers": layers}
    config |= {"intermediate_size": inter, "num_attention_heads": max(hidden // 64, 1)}
    generator = torch.Generator().manual_seed(0)
    base = {}
    for layer in range(layers):
        for module, (rows, cols) in SHAPES.items():
            part = (
                "self_attn" if module.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp"
            )
            key = f"model.layers.{layer}.{part}.{module}.weight"
            base[key] = torch.randn(dims[rows], dims[cols], generator=generator) * 0.02

    def save(folder: Path, tensors: dict) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        save_file(
            {k: v.half().contiguous() for k, v in tensors.items()}, folder / "model.safetensors"
        )
        (folder / "config.json").write_text(json.dumps(config))

    save(work / "base", base)
    runs = {}
    for index, label in enumerate(("FT", "LoRA", "DoRA")):
        for step in (100, 200):
            scale = 1e-3 * step / 100 * (index + 1)
            moved = {
                k: v * (1 + scale * torch.randn(v.shape[0], 1, generator=generator))
                + scale * 0.02 * torch.randn(v.shape, generator=generator)
                for k, v in base.items()
            }
            save(work / label.lower() / f"checkpoint-{step}", moved)
        runs[label] = work / label.lower()
    return runs


def synthetic_table(layers: int, steps: int, modules: tuple[str, ...]) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    rows = []
    for method, rho in (("FT", -0.6), ("LoRA", 0.8), ("DoRA", -0.3)):
        for module in modules:
            for step in range(1, steps + 1):
                for layer in range(layers):
                    d, e = rng.normal(size=2)
                    m = rho * d + (1 - rho**2) ** 0.5 * e
                    rows.append(
                        {
                            "method": method,
                            "run": method.lower(),
                            "step": step * 100,
                            "layer": layer,
                            "module": module,
                            "parameter": f"model.layers.{layer}.{module}.weight",
                            "stack": "",
                            "axis": "out",
                            "delta_m": 1e-3 * (2 + 0.5 * m) * step,
                            "delta_d": 1e-4 * (2 + 0.5 * d) * step,
                            "n_vectors": 64,
                            "zero_norm_vectors": 0,
                            "checkpoint": "",
                        }
                    )
    return pd.DataFrame(rows)


def old_tree(scratch: Path, commit: str = BEFORE) -> Path | None:
    """The package as it was at ``commit``, unpacked under ``scratch``."""
    target = scratch / commit[:10]
    target.mkdir()
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", commit, "wdanalysis"], capture_output=True
    )
    if archive.returncode != 0:
        print(f"no git history with {commit[:10]}: that path is not timed", file=sys.stderr)
        return None
    subprocess.run(["tar", "-x", "-C", str(target)], input=archive.stdout, check=True)
    return target


def timed_report(tree: Path, table: Path, out: Path, kwargs: dict) -> tuple[float, int, float]:
    """Wall seconds, files written and CPU seconds (this process and its workers)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(tree)}
    done = subprocess.run(
        [sys.executable, "-c", TIMED, str(tree), str(table), str(out), repr(kwargs)],
        capture_output=True,
        text=True,
        env=env,
        cwd=str(out.parent),
    )
    line = next((x for x in done.stdout.splitlines() if x.startswith("SECONDS")), None)
    if line is None:
        raise RuntimeError(done.stderr[-3000:])
    _, seconds, files, cpu = line.split()
    return float(seconds), int(files), float(cpu)


#: The new path three ways: as the old one (PNG + SVG) drawn here, the same with
#: workers, and the CLI's default (PNG only, workers).
NEW = {
    "new_serial": {"workers": 1, "formats": "png,svg"},
    "new_parallel": {"workers": None, "formats": "png,svg"},
    "new_cli_default": {"workers": None, "formats": "png"},
    # what the command line runs: torch is loaded there, so two pages do not pay for
    # starting a forkserver (drawing.PARALLEL_FROM) and are drawn in the calling process
    "new_png_serial": {"workers": 1, "formats": "png"},
}


def _timed(row: dict, label: str, tree: Path, table: Path, out: Path, kwargs: dict, n: int):
    times, cpus = [], []
    for index in range(n):
        seconds, files, cpu = timed_report(
            tree, table, out.with_name(f"{out.name}-{index}"), kwargs
        )
        times.append(seconds)
        cpus.append(cpu)
    row[f"{label}_seconds"], row[f"{label}_files"] = float(np.median(times)), files
    row[f"{label}_all_seconds"], row[f"{label}_cpu_seconds"] = times, float(np.median(cpus))


def run_case(name: str, table: Path, scratch: Path, trees: dict, repeat: int) -> dict:
    row: dict = {"case": name, "load_average": os.getloadavg()}
    if trees["before"] is not None:  # once: it is the slow one, 10-40× the others
        _timed(row, "old", trees["before"], table, scratch / f"{name}-old", {}, 1)
    if trees["per_module"] is not None:
        kwargs = {"workers": None, "formats": "png"}  # its CLI default
        out = scratch / f"{name}-per_module"
        _timed(row, "per_module", trees["per_module"], table, out, kwargs, repeat)
    for label, kwargs in NEW.items():
        _timed(row, label, REPO, table, scratch / f"{name}-{label}", kwargs, repeat)
    return row


def cli_case(name: str, base: Path, runs: dict, modules, scratch: Path, repeat: int) -> dict:
    """``wdanalysis compare`` end to end, with figures and with ``--no-figures``, taken in
    turns (the same load for both); median wall seconds and every time."""
    command = [sys.executable, "-m", "wdanalysis", "compare", str(base)]
    command += [*map(str, runs.values()), "--labels", *runs, "--modules", *modules, "--quiet"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    times: dict[str, list[float]] = {"cli_tables": [], "cli_figures": []}
    for index in range(repeat):
        for label, extra in (("cli_tables", ["--no-figures"]), ("cli_figures", [])):
            out = scratch / f"cli-{name}-{label}-{index}"
            started = time.perf_counter()
            done = subprocess.run(
                [*command, "--out", str(out), *extra], env=env, text=True, capture_output=True
            )
            times[label].append(time.perf_counter() - started)
            if done.returncode != 0:
                raise RuntimeError(done.stderr[-3000:])
    row: dict = {"case": f"{name} CLI", "load_average": os.getloadavg()}
    for label, values in times.items():
        row[f"{label}_seconds"], row[f"{label}_all_seconds"] = float(np.median(values)), values
    row["figures_add_seconds"] = row["cli_figures_seconds"] - row["cli_tables_seconds"]
    return row


def demo_inputs(demo_runs: Path) -> tuple[Path, dict, tuple] | None:
    """The demo's base, runs and modules, or None (printing why) where not installed."""
    try:
        from wdanalysis.demo.reproduction import MODULES as DEMO_MODULES
        from wdanalysis.demo.reproduction import RUN_LABELS, model_path

        base = model_path()
    except Exception as error:  # noqa: BLE001 - the case is optional
        print(f"reference analysis not timed: {error}", file=sys.stderr)
        return None
    runs = {label: demo_runs / method for method, label in RUN_LABELS.items()}
    if not all(path.is_dir() for path in runs.values()):
        print(f"reference analysis not timed: no demo runs in {demo_runs}", file=sys.stderr)
        return None
    return base, runs, DEMO_MODULES


def timed_analysis(base: Path, runs: dict, modules: Sequence[str], repeat: int) -> dict:
    """``compare`` in a fresh process each time (as the reports are timed)."""
    spec = json.dumps([str(base), {k: str(v) for k, v in runs.items()}, list(modules)])
    times, cpus = [], []
    for _ in range(repeat):
        done = subprocess.run(
            [sys.executable, "-c", TIMED_ANALYSIS, str(REPO), spec],
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
        line = next((x for x in done.stdout.splitlines() if x.startswith("SECONDS")), None)
        if line is None:
            raise RuntimeError(done.stderr[-3000:])
        _, seconds, _, cpu = line.split()
        times.append(float(seconds))
        cpus.append(float(cpu))
    return {
        "analysis_seconds": float(np.median(times)),
        "analysis_all_seconds": times,
        "analysis_cpu_seconds": float(np.median(cpus)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=1024, help="hidden size (default 1024)")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--workdir", type=Path, default=None, help="default: a temp folder")
    parser.add_argument("--repeat", type=int, default=3, help="times per timing (default 3)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks/results/bench_figures.json")
    parser.add_argument(
        "--demo-runs",
        type=Path,
        default=REPO / "runs/demo",
        help="the demo's checkpoints, for the reference case's analysis (default runs/demo)",
    )
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    from wdanalysis import compare

    scratch = Path(tempfile.mkdtemp(prefix="bench_figures_", dir=args.workdir))
    try:
        trees = {"before": old_tree(scratch), "per_module": old_tree(scratch, PER_MODULE)}
        runs = write_set(scratch / "set", args.hidden, args.layers)
        size = sum(p.stat().st_size for p in (scratch / "set").rglob("*.safetensors"))
        analysis = timed_analysis(scratch / "set" / "base", runs, MODULES, args.repeat)
        compare(scratch / "set" / "base", runs, modules=list(MODULES), progress=False).to_csv(
            scratch / "8x7.csv", index=False
        )
        synthetic_table(32, 8, ("q_proj", "v_proj")).to_csv(scratch / "32.csv", index=False)
        rows = [run_case("8x7", scratch / "8x7.csv", scratch, trees, args.repeat)]
        rows[0] |= {**analysis, "checkpoint_bytes": size}
        rows.append(run_case("32-layer", scratch / "32.csv", scratch, trees, args.repeat))
        if (REPO / "figures/deltas.csv").is_file():
            reference = REPO / "figures/deltas.csv"
            rows.append(run_case("reference", reference, scratch, trees, args.repeat))
        demo = demo_inputs(args.demo_runs)
        if demo is not None and len(rows) == 3:
            rows[-1] |= timed_analysis(*demo, args.repeat)
        set_dir = scratch / "set"
        rows.append(cli_case("8x7", set_dir / "base", runs, MODULES, scratch, args.repeat))
        if demo is not None:
            rows.append(cli_case("reference", *demo, scratch, args.repeat))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    result = {
        "machine": f"{platform.machine()}, {platform.system()}, python {platform.python_version()}",
        "cpus": os.cpu_count(),
        "load_average": os.getloadavg(),
        "hidden": args.hidden,
        "layers": args.layers,
        "before": BEFORE,
        "per_module": PER_MODULE,
        "repeat": args.repeat,
        "cases": rows,
    }
    columns = ["analysis", "old", "per_module", *NEW]
    print(f"{'case':<10}" + "".join(f"{c + ' s':>18}" for c in columns) + "  files old → new")
    for row in rows:
        if row["case"].endswith(" CLI"):
            continue
        values = [row.get(f"{c}_seconds", float("nan")) for c in columns]
        print(
            f"{row['case']:<10}"
            + "".join(f"{v:>18.1f}" for v in values)
            + f"  {row.get('old_files', '?')} → {row.get('per_module_files', '?')} → "
            + f"{row['new_cli_default_files']}"
        )
        cpus = [row.get(f"{c}_cpu_seconds", float("nan")) for c in columns]
        print(f"{'  CPU s':<10}" + "".join(f"{v:>18.1f}" for v in cpus))
    for cli in (row for row in rows if row["case"].endswith(" CLI")):
        print(
            f"wdanalysis compare ({cli['case']}, end to end): --no-figures "
            f"{cli['cli_tables_seconds']:.2f} s, with figures {cli['cli_figures_seconds']:.2f} s:"
            f" figures add {cli['figures_add_seconds']:.2f} s"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
