"""Re-analyse the dose × length study with the learned ΔM (issue 36, item 3).

The study's committed cells (``figures/dose_study/*.json``) hold ΔM and ΔD but not the
per-row norms ``delta_m_learned`` needs, and their checkpoints are gone, so:

* FT and DoRA cells are retrained into ``RUNS/<cell group>/<method>`` with the demo's
  ``train_one`` (the same regime and seed as the committed cell; the trainer now records
  ``decay_shrink.json``) and analysed as :func:`~wdanalysis.demo.dose_study.run_cell` does.
  A run that finished already (its ``accuracy.json`` exists, e.g. from
  ``scripts/decay_train_main_cell.py``) is analysed, not retrained.
* LoRA cells are not retrained: LoRA's frozen base is never decayed (``S = 1``), so its
  learned ΔM *is* its ΔM, row for row; their rows are copied with ``decay_shrink = 1``.

Each finished cell is written to ``--cache`` as the study writes cells, and the study's
table and dose–response figure to ``--out``, every re-analysed cell in place of the
committed one (cells not yet re-analysed keep empty learned columns, and the figure's
"learned" line covers the cells that have it). Several processes may run
at once (each claims a cell with an exclusive file, so none trains a cell twice):

    OMP_NUM_THREADS=1 nice -n 10 python scripts/decay_dose_study.py runs/decay &
    OMP_NUM_THREADS=1 nice -n 10 python scripts/decay_dose_study.py runs/decay --reverse &
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import pandas as pd

from wdanalysis.demo.dose_study import (
    DELTA_FIELDS,
    DoseCell,
    cached_table,
    result_line,
    write_outputs,
)
from wdanalysis.demo.reproduction import (
    ACCURACY_FILE,
    MODULES,
    RUN_LABELS,
    DemoSettings,
    model_path,
    train_one,
)
from wdanalysis.demo.summary import summarize
from wdanalysis.stats.fits import fit_lines
from wdanalysis.storage.atomic_write import write_text_atomic
from wdanalysis.table.comparison import compare


def lora_cell(old: dict) -> dict:
    """A LoRA cell's result with ``decay_shrink = 1`` and ``delta_m_learned = delta_m``."""
    deltas = pd.DataFrame(old["deltas"]).assign(decay_shrink=1.0)
    deltas["delta_m_learned"] = deltas["delta_m"]
    deltas = deltas.assign(method="LoRA", run="lora", label="lora")
    record = old["record"]
    summary = summarize(fit_lines(deltas), {"LoRA": record}, deltas)
    return {
        **old,
        "summary": summary.to_dict(orient="records"),
        "deltas": deltas[DELTA_FIELDS].to_dict(orient="records"),
        "learned_from": "LoRA's base is frozen and never decayed: S = 1, learned ΔM = ΔM",
    }


def trained_cell(cell: DoseCell, old: dict, runs_dir: Path) -> dict:
    """Train (unless finished) and analyse one FT/DoRA cell at the committed cell's settings."""
    settings = DemoSettings(**{**old["settings"], "seed": cell.seed})
    assert settings == cell.settings(DemoSettings()), f"{cell.name}: settings differ"
    run_dir = runs_dir / cell.group / cell.method
    started = time.perf_counter()
    if (run_dir / ACCURACY_FILE).is_file():
        record = json.loads((run_dir / ACCURACY_FILE).read_text(encoding="utf-8"))
    else:
        record = train_one(run_dir, settings, cell.method, progress=False)
    label = RUN_LABELS[cell.method]
    deltas = compare(model_path(), {label: run_dir}, modules=list(MODULES), progress=False)
    summary = summarize(fit_lines(deltas), {label: record}, deltas)
    return {
        "cell": old["cell"],
        "settings": old["settings"],
        "weight_decay": settings.weight_decay_for(cell.method),
        "seconds": record.get("seconds", time.perf_counter() - started),
        "record": record,
        "summary": summary.to_dict(orient="records"),
        "deltas": deltas[DELTA_FIELDS].to_dict(orient="records"),
    }


def merged_table(old: Path, cache: Path) -> pd.DataFrame:
    """The study's table with every re-analysed cell (``cache``) in place of its committed
    one (``old``): cells not yet re-analysed keep empty learned columns."""
    with tempfile.TemporaryDirectory() as tmp:
        for path in old.glob("*.json"):
            newer = cache / path.name
            shutil.copyfile(newer if newer.is_file() else path, Path(tmp) / path.name)
        return cached_table(tmp)


def claim(path: Path) -> bool:
    try:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path)
    parser.add_argument("--old", type=Path, default=Path("figures/dose_study"))
    parser.add_argument("--cache", type=Path, default=Path("figures/dose_study_learned"))
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("figures"),
        help="dose_study.csv, dose_study_seeds.csv and dose_response.png/.svg: every cell, "
        "re-analysed ones in place of the committed ones",
    )
    parser.add_argument("--reverse", action="store_true", help="take the cells from the end")
    parser.add_argument("--no-train", action="store_true", help="only cells already trained")
    args = parser.parse_args()
    args.cache.mkdir(parents=True, exist_ok=True)
    # shortest first, LoRA (seconds) first
    cells = sorted(
        (DoseCell.parse(p.stem) for p in args.old.glob("*.json")),
        key=lambda c: (c.method != "lora", c.steps, c.level != "paper", c.seed, c.method),
    )
    for cell in reversed(cells) if args.reverse else cells:
        target = args.cache / f"{cell.name}.json"
        run_dir = args.runs / cell.group / cell.method
        if target.is_file():
            continue
        if args.no_train and cell.method != "lora" and not (run_dir / ACCURACY_FILE).is_file():
            continue
        if not claim(args.cache / f".{cell.name}.claim"):
            continue
        old = json.loads((args.old / f"{cell.name}.json").read_text(encoding="utf-8"))
        started = time.perf_counter()
        if cell.method == "lora":
            result = lora_cell(old)
        else:
            result = trained_cell(cell, old, args.runs)
        write_text_atomic(target, json.dumps(result, indent=1, default=str) + "\n")
        (args.cache / f".{cell.name}.claim").unlink()
        minutes = (time.perf_counter() - started) / 60
        print(f"{cell.name}: {result_line(result)} ({minutes:.1f} min here)", flush=True)
        write_outputs(merged_table(args.old, args.cache), args.out)
    write_outputs(merged_table(args.old, args.cache), args.out)


if __name__ == "__main__":
    main()
