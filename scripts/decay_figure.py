"""The decay-corrected Figure 2 of issue 36, from the main cell's runs that finished.

    python scripts/decay_figure.py runs/decay --study figures/dose_study --out figures/decay

Reads ``RUNS/paper_steps500_seedS/{ft,lora,dora}`` (``scripts/decay_train_main_cell.py``),
compares every finished seed with the base (``decay_shrink``/``delta_m_learned`` from the
trainer's ``decay_shrink.json``), takes LoRA's rows from the dose study's cache where LoRA
was not retrained (S = 1: learned = raw), and writes into OUT, atomically: ``deltas.csv``,
``decay_r.csv`` (per seed), ``decay_seeds.csv`` (over seeds), ``decay_mechanism.csv``,
``decay_corrected_figure2_{query,value}.png/.svg`` and ``decay_r_intervals.png/.svg``;
prints the tables as Markdown.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from wdanalysis.demo import decay_study
from wdanalysis.demo.decay_study import markdown_table
from wdanalysis.demo.reproduction import MODULES
from wdanalysis.plots.decay import plot_r_intervals, plot_raw_vs_learned
from wdanalysis.plots.report import save_figure_pair
from wdanalysis.storage.atomic_write import write_csv_atomic, write_text_atomic


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path)
    parser.add_argument("--study", type=Path, default=Path("figures/dose_study"))
    parser.add_argument("--out", type=Path, default=Path("figures/decay"))
    parser.add_argument(
        "--partial",
        action="store_true",
        help="also runs that have not finished: their complete checkpoints (marked in source)",
    )
    args = parser.parse_args()
    deltas = decay_study.seed_deltas(args.runs, args.study, partial=args.partial)
    if deltas.empty:
        raise SystemExit(f"no finished run under {args.runs}")
    per_seed = decay_study.per_seed_statistics(deltas)
    across = decay_study.across_seeds(per_seed)
    mech = decay_study.mechanism(deltas)
    args.out.mkdir(parents=True, exist_ok=True)
    write_csv_atomic(deltas, args.out / "deltas.csv")
    write_csv_atomic(per_seed, args.out / "decay_r.csv")
    write_csv_atomic(across, args.out / "decay_seeds.csv")
    write_csv_atomic(mech, args.out / "decay_mechanism.csv")
    for module in MODULES:
        figure = plot_raw_vs_learned(deltas, module, per_seed, across)
        save_figure_pair(figure, args.out, f"decay_corrected_figure2_{module}")
    save_figure_pair(plot_r_intervals(per_seed, across), args.out, "decay_r_intervals")
    sources = deltas.groupby(["seed", "method"])["source"].first().reset_index()
    steps = deltas.groupby(["seed", "method"])["step"].agg(
        lambda s: " ".join(map(str, sorted(set(s))))
    )
    sources = sources.merge(steps.rename("steps compared").reset_index(), on=["seed", "method"])
    columns = ["y", "method", "module", "seed", "pearson_r", "pearson_r_boot_low"]
    columns += ["pearson_r_boot_high", "within_step_r", "slope"]
    tables = [
        "## Runs\n\n" + markdown_table(sources),
        "## Per seed (pooled r, layer-bootstrap 95 % interval, within-step r)\n\n"
        + markdown_table(per_seed[columns].sort_values(["method", "module", "seed", "y"])),
        "## Over seeds (Student-t 95 % interval)\n\n" + markdown_table(across),
        "## Mechanism across layers (last common checkpoint)\n\n" + markdown_table(mech),
    ]
    text = "# Issue 36: raw and decay-corrected r (written by scripts/decay_figure.py)\n\n"
    text += "\n\n".join(tables) + "\n"
    write_text_atomic(args.out / "decay_tables.md", text)
    print(text)


if __name__ == "__main__":
    main()
