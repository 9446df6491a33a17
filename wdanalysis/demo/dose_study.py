"""The dose × length study of issue 23: does the weight-decay dose give FT and DoRA their
negative ΔM–ΔD slope?

Decoupled weight decay shrinks every decayed row by ≈ exp(−wd·Σₜ lrₜ) and leaves its
direction alone, so it moves ΔM without moving ΔD. The DoRA authors' runs applied a dose
wd·Σₜ lrₜ ≈ 0.05 (FT) and ≈ 0.5 (DoRA); the previous demo ≈ 10⁻⁴ and 2.5·10⁻³. Each *cell*
— a weight-decay level × a length × a method × a seed — is one training of the demo's
regime (:class:`~wdanalysis.demo.reproduction.DemoSettings`) with only those changed,
analysed on its own (pooled r with its layer-bootstrap interval, within-step r, per-step r),
and written as one small JSON file, atomically. A finished cell's file is read back, never
retrained, so the study resumes where it stopped; keep the cache folder under version
control (``figures/dose_study/``) and the results outlive the machine.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import pandas as pd

from wdanalysis.demo.reproduction import (
    MODULES,
    RUN_LABELS,
    DemoSettings,
    model_path,
    train_one,
)
from wdanalysis.demo.summary import summarize
from wdanalysis.errors import WDAnalysisError
from wdanalysis.stats.fits import fit_lines
from wdanalysis.stats.resampling import across_seed_summary
from wdanalysis.storage.atomic_write import write_csv_atomic, write_text_atomic
from wdanalysis.table.comparison import compare

# weight decay per level; None: the weight decay that applies the paper's dose (PAPER_DOSE)
LEVELS = {"today": 0.01, "10x": 0.1, "paper": None}
LENGTHS = (500, 2000)
MAIN_CELL = ("paper", 500)  # the candidate main job, run at every seed of MAIN_SEEDS
MAIN_SEEDS = (0, 1, 2)  # fixed before any cell was run (README)
DELTA_FIELDS = ["module", "parameter", "layer", "step", "delta_m", "delta_d"]
DELTA_FIELDS += ["decay_shrink", "delta_m_learned"]  # issue 36
TABLE_FILE = "dose_study.csv"
SEEDS_FILE = "dose_study_seeds.csv"
FIGURE_STEM = "dose_response"
COLUMNS = [
    "cell",
    "level",
    "steps",
    "seed",
    "method",
    "module",
    "weight_decay",
    "updates",
    "decay_dose",
    "accuracy",
    "pearson_r",
    "pearson_r_boot_low",
    "pearson_r_boot_high",
    "within_step_r",
    "pearson_r_learned",  # on ΔM less the decay's shrinkage (issue 36): empty in cells
    "pearson_r_learned_boot_low",  # cached before the trainer recorded it
    "pearson_r_learned_boot_high",
    "within_step_r_learned",
    "r_first_step",
    "r_last_step",
    "slope",
    "m_moved_abs",
    "m_moved_rel",
    "paper_r",
    "sign_matches_paper",
    "seconds",
]


@dataclass(frozen=True)
class DoseCell:
    """One training: a weight-decay level, a length, a method and a seed."""

    level: str
    steps: int
    method: str
    seed: int = 0

    @property
    def group(self) -> str:
        """The run folder shared by a level/length/seed's three methods: a demo ``--out``."""
        return f"{self.level}_steps{self.steps}_seed{self.seed}"

    @property
    def name(self) -> str:
        return f"{self.group}_{self.method}"

    @classmethod
    def parse(cls, name: str) -> DoseCell:
        """The cell a :attr:`name` (``paper_steps500_seed0_dora``) stands for."""
        match = re.fullmatch(
            r"(?P<level>[^_]+)_steps(?P<steps>\d+)_seed(?P<seed>\d+)_(?P<m>\w+)", name
        )
        if not match or match["level"] not in LEVELS or match["m"] not in RUN_LABELS:
            raise WDAnalysisError(
                f"not a dose-study cell: {name!r}",
                hint=f"LEVEL_stepsN_seedS_METHOD with LEVEL in {list(LEVELS)}, METHOD ft/lora/dora",
            )
        return cls(match["level"], int(match["steps"]), match["m"], int(match["seed"]))

    def settings(self, base: DemoSettings) -> DemoSettings:
        return replace(base, steps=self.steps, weight_decay=LEVELS[self.level], seed=self.seed)


def study_cells(
    lengths: Sequence[int] = LENGTHS,
    levels: Iterable[str] = tuple(LEVELS),
    main_seeds: Sequence[int] = MAIN_SEEDS,
) -> list[DoseCell]:
    """Every cell, in the order they are run: the candidate main job at each of
    ``main_seeds``, then the other cells of the shortest length, then the longer ones."""
    methods = tuple(RUN_LABELS)
    levels = tuple(levels)
    cells = [DoseCell(*MAIN_CELL, m, s) for s in main_seeds for m in methods]
    cells = [c for c in cells if c.level in levels and c.steps in lengths]
    for steps in sorted(lengths):
        for level in levels:
            cells += [DoseCell(level, steps, m) for m in methods]
    return list(dict.fromkeys(cells))


def run_cell(
    cell: DoseCell, base: DemoSettings, runs_dir: Path, cache_dir: Path, progress: bool = True
) -> dict:
    """Train and analyse one cell, or read it back if its JSON exists."""
    path = cache_dir / f"{cell.name}.json"
    if path.is_file():
        return json.loads(path.read_text(encoding="utf-8"))
    started = time.perf_counter()
    settings = cell.settings(base)
    run_dir = runs_dir / cell.group / cell.method
    record = train_one(run_dir, settings, cell.method, progress)
    label = RUN_LABELS[cell.method]
    deltas = compare(model_path(), {label: run_dir}, modules=list(MODULES), progress=progress)
    summary = summarize(fit_lines(deltas), {label: record}, deltas)
    result = {
        "cell": asdict(cell),
        "settings": asdict(settings),
        "weight_decay": settings.weight_decay_for(cell.method),
        "seconds": time.perf_counter() - started,
        "record": record,
        "summary": summary.to_dict(orient="records"),
        "deltas": deltas[DELTA_FIELDS].to_dict(orient="records"),
    }
    write_text_atomic(path, json.dumps(result, indent=1, default=str) + "\n")
    return result


def cell_rows(result: dict) -> list[dict]:
    """The table rows (one per module) of a cell's JSON."""
    cell = DoseCell(**result["cell"])
    rows = []
    for row in result["summary"]:
        rows.append(
            {
                **row,
                "cell": cell.name,
                "level": cell.level,
                "steps": cell.steps,
                "seed": cell.seed,
                "weight_decay": result["weight_decay"],
                "seconds": result["seconds"],
            }
        )
    return rows


def study_table(results: Iterable[dict]) -> pd.DataFrame:
    rows = [row for result in results for row in cell_rows(result)]
    return pd.DataFrame(rows, columns=COLUMNS)


def seed_summary(table: pd.DataFrame) -> pd.DataFrame:
    """Per level, length, method and module run at two or more seeds: the mean pooled r and
    within-step r over seeds with a Student-t interval (seeds are independent trainings; a
    run's layers × steps are not, which is why each cell's own interval is a layer
    bootstrap)."""
    frames = []
    for (level, steps), cell in table.groupby(["level", "steps"], sort=False):
        if cell["seed"].nunique() < 2:
            continue
        keys = ["method", "module"]
        pooled = across_seed_summary(cell, "pearson_r")
        within = across_seed_summary(cell, "within_step_r").drop(columns="n_seeds")
        seeds = cell.groupby(keys, sort=False)["seed"].agg(lambda s: " ".join(map(str, sorted(s))))
        merged = pooled.merge(within, on=keys).merge(seeds.rename("seeds").reset_index(), on=keys)
        frames.append(merged.assign(level=level, steps=steps))
    if not frames:
        return pd.DataFrame(columns=["level", "steps", "method", "module", "n_seeds"])
    out = pd.concat(frames, ignore_index=True)
    first = ["level", "steps", "method", "module", "n_seeds", "seeds"]
    return out[first + [c for c in out.columns if c not in first]]


def write_outputs(table: pd.DataFrame, out_dir: Path) -> list[Path]:
    """``dose_study.csv``, ``dose_study_seeds.csv`` (:func:`seed_summary`) and
    ``dose_response.png/.svg`` in ``out_dir``, each atomically."""
    from wdanalysis.plots.dose_response import plot_dose_response
    from wdanalysis.plots.report import save_figure_pair

    files = [write_csv_atomic(table, out_dir / TABLE_FILE)]
    files.append(write_csv_atomic(seed_summary(table), out_dir / SEEDS_FILE))
    if not table.empty:
        files += save_figure_pair(plot_dose_response(table), out_dir, FIGURE_STEM)
    return files


def run_dose_study(
    runs_dir: str | Path,
    cache_dir: str | Path,
    out_dir: str | Path,
    base: DemoSettings | None = None,
    cells: Sequence[DoseCell] | None = None,
    progress: bool = True,
) -> pd.DataFrame:
    """Run (or read) every cell in order; after each, rewrite the table and the figure in
    ``out_dir`` from every finished cell in ``cache_dir`` (this call's and any other's), so a
    study stopped half-way still shows what finished. Returns this call's cells' rows."""
    base = base or DemoSettings()
    runs_dir, cache_dir, out_dir = Path(runs_dir), Path(cache_dir), Path(out_dir)
    cells = study_cells() if cells is None else list(cells)
    results = []
    for i, cell in enumerate(cells):
        done = (cache_dir / f"{cell.name}.json").is_file()
        print(f"=== dose cell {cell.name} ({i + 1} of {len(cells)}){' [cached]' if done else ''}")
        results.append(run_cell(cell, base, runs_dir, cache_dir, progress))
        write_outputs(cached_table(cache_dir), out_dir)
        print(f"    {cell.name}: {result_line(results[-1])}")
    return study_table(results)


def cached_table(cache_dir: str | Path) -> pd.DataFrame:
    """Every finished cell in ``cache_dir``, in the study's order (level, length, seed)."""
    results = [json.loads(p.read_text(encoding="utf-8")) for p in Path(cache_dir).glob("*.json")]
    table = study_table(results)
    order = {level: i for i, level in enumerate(LEVELS)}
    methods = {method: i for i, method in enumerate(RUN_LABELS.values())}
    keys = [table["steps"], table["level"].map(order), table["seed"], table["method"].map(methods)]
    index = sorted(range(len(table)), key=lambda i: tuple(k.iloc[i] for k in keys))
    return table.iloc[index].reset_index(drop=True)


def result_line(result: dict) -> str:
    parts = []
    for row in result["summary"]:
        low, high = row["pearson_r_boot_low"], row["pearson_r_boot_high"]
        parts.append(f"{row['module']} r {row['pearson_r']:+.2f} [{low:+.2f}, {high:+.2f}]")
    dose = result["summary"][0]["decay_dose"]
    return f"{', '.join(parts)}; dose {dose:.3g}; {result['seconds'] / 60:.1f} min"


def missing_cells(cells: Sequence[DoseCell], cache_dir: str | Path) -> list[DoseCell]:
    """Cells without a finished JSON (what a later session still has to run)."""
    return [c for c in cells if not (Path(cache_dir) / f"{c.name}.json").is_file()]


def format_study_table(table: pd.DataFrame) -> str:
    lines = []
    for _, r in table.iterrows():
        moved = "" if math.isnan(r["m_moved_rel"]) else f" |m−m₀|/m₀ {100 * r['m_moved_rel']:.2f} %"
        lines.append(
            f"{r['cell']:<28} {r['module']:<6} dose {r['decay_dose']:<8.3g} "
            f"r {r['pearson_r']:+.2f} [{r['pearson_r_boot_low']:+.2f}, "
            f"{r['pearson_r_boot_high']:+.2f}] within {r['within_step_r']:+.2f} "
            f"steps {r['r_first_step']:+.2f}→{r['r_last_step']:+.2f} acc {r['accuracy']:.3f}"
            f"{moved} {r['seconds'] / 60:.1f} min"
        )
    return "\n".join(lines)
