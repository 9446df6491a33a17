"""ΔM against ΔD, raw and learned, for the PEFT methods trained alike by
``scripts/peft_methods_train.py`` (issue 36, item 4).

    python scripts/peft_methods_figure.py runs/peft_methods --out figures/peft_methods

Compares every method's complete checkpoints with the demo's base (``decay_shrink`` and
``delta_m_learned`` from each checkpoint's ``decay_shrink.json``; empty, with compare's note,
where no exact split exists), keeps the checkpoints every method reached, and writes into
OUT, atomically: ``peft_methods_deltas.csv`` (the rows), ``peft_methods_r.csv`` (per
method, module and y: pooled r and slope, the layer-bootstrap 95 % interval of r, the
within-step r, plus each run's progress, CPU time per step and S),
``peft_methods_notes.txt`` (compare's notes), ``peft_methods_r.png/.svg`` (the r intervals)
and ``peft_methods_scatter.png/.svg`` (ΔM on ΔD per method and module); prints
the table as Markdown.
"""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from wdanalysis.demo import decay_study
from wdanalysis.demo.decay_study import markdown_table
from wdanalysis.demo.reproduction import MODULES, model_path
from wdanalysis.plots.report import save_figure_pair
from wdanalysis.storage.atomic_write import write_csv_atomic, write_text_atomic
from wdanalysis.table.comparison import compare
from wdanalysis.train.checkpoint import list_checkpoints

INTERVAL = ("pearson_r", "pearson_r_boot_low", "pearson_r_boot_high")
NO_DIRECTION = 1e-12  # ΔD below this is rounding: the method changed no row's direction
ORDER = ("lora", "dora", "pissa", "vera", "loha", "oft", "ia3")
NAMES = {"lora": "LoRA", "dora": "DoRA", "pissa": "PiSSA", "vera": "VeRA", "loha": "LoHa",
         "oft": "OFT", "ia3": "IA³"}  # fmt: skip


def runs_found(root: Path) -> dict[str, Path]:
    return {NAMES[m]: root / m for m in ORDER if list_checkpoints(root / m)}


def deltas_of(root: Path) -> tuple[pd.DataFrame, list[str]]:
    runs = runs_found(root)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*modules_to_save|.*match no base weight")
        table = compare(model_path(), runs, modules=list(MODULES), progress=False)
    notes = list(table.attrs.get("decay_notes", []))
    table = table[decay_study.KEEP].assign(method=table["label"], run=table["run"], seed=0)
    table = table.astype({"step": "Int64", "layer": "Int64"})
    return decay_study.common_steps(table), notes


def run_info(root: Path) -> pd.DataFrame:
    rows = []
    for method in ORDER:
        done = root / method / "done.json"
        checkpoints = list_checkpoints(root / method)
        if not checkpoints:
            continue
        record = json.loads(done.read_text()) if done.is_file() else {}
        progress = root / method / "progress.json"
        progress = json.loads(progress.read_text()) if progress.is_file() else {}
        rows.append(
            {
                "method": NAMES[method],
                "finished": done.is_file(),
                "last_step": checkpoints[-1][0],
                "train_minutes": round(record.get("seconds", np.nan) / 60, 2),
                "cpu_seconds_per_step": progress.get("cpu_seconds", np.nan)
                / progress.get("step", np.nan),
                "accuracy": record.get("accuracy", np.nan),
                "adapter_parameters": record.get("adapter_parameters", np.nan),
            }
        )
    return pd.DataFrame(rows)


def statistics(deltas: pd.DataFrame) -> pd.DataFrame:
    """Pooled r, slope, layer-bootstrap interval and within-step r per method/module/y,
    one method at a time (raw and learned resample the same layers); the learned y only
    where every row of the method has it."""
    parts = []
    for _, table in deltas.groupby("method", sort=False):
        known = bool(table["delta_m_learned"].notna().all())
        if not known:  # no exact split: only the raw y is computed and kept
            table = table.assign(delta_m_learned=table["delta_m"])
        stats = decay_study.per_seed_statistics(table)
        parts.append(stats if known else stats[stats["y"] == "raw"])
    stats = pd.concat(parts, ignore_index=True).drop(columns="seed")
    # A tuner that only rescales rows (IA³ on query/value) changes no direction: its ΔD is
    # 0 up to float64 rounding (~1e-17), and an r against rounding noise means nothing.
    top = deltas.groupby(["method", "module"])["delta_d"].max().rename("max_delta_d")
    stats = stats.merge(top.reset_index(), on=["method", "module"])
    flat = stats["max_delta_d"] < NO_DIRECTION
    columns = [c for c in stats.columns if c.startswith(("pearson_r", "slope", "within_step"))]
    stats.loc[flat, columns] = np.nan
    shrink = deltas[deltas["step"] == deltas["step"].max()].groupby("method")["decay_shrink"]
    return stats.merge(shrink.mean().rename("shrink_last").reset_index(), on="method")


def plot_intervals(stats: pd.DataFrame) -> Figure:
    figure = Figure(figsize=(10, 4.6), layout="constrained")
    axes = figure.subplots(1, len(MODULES), squeeze=False)[0]
    methods = [NAMES[m] for m in ORDER if NAMES[m] in set(stats["method"])]
    colours = {"raw": "0.45", "learned": "C3"}
    for ax, module in zip(axes, MODULES, strict=True):
        for i, method in enumerate(methods):
            for y in ("raw", "learned"):
                row = stats[(stats["method"] == method) & (stats["module"] == module)
                            & (stats["y"] == y)]  # fmt: skip
                if not row.empty and row["max_delta_d"].iloc[0] < NO_DIRECTION:
                    if y == "raw":
                        ax.text(0, i, "ΔD ≡ 0 (rows only rescaled): r undefined", fontsize=7,
                                ha="center", va="center")  # fmt: skip
                    continue
                if row.empty:
                    if y == "learned":
                        ax.text(0, i + 0.18, "learned: no exact split", fontsize=7, ha="center")
                    continue
                r, low, high = row[list(INTERVAL)].iloc[0]
                where = i + (0.18 if y == "learned" else -0.18)
                ax.errorbar(r, where, xerr=[[r - low], [high - r]], fmt="o", ms=4, capsize=2,
                            lw=1, color=colours[y], label=y if i == 0 else None)  # fmt: skip
        ax.axvline(0, color="black", lw=0.6)
        ax.set_yticks(range(len(methods)), methods)
        ax.set_ylim(len(methods) - 0.5, -0.5)
        ax.set_xlim(-1.05, 1.05)
        ax.set_xlabel("pooled Pearson r of ΔM on ΔD [layer-bootstrap 95 % interval]")
        ax.set_title(f"{module}: raw ΔM (grey) and learned ΔM (red)")
    axes[0].legend(loc="upper left", fontsize=8)
    return figure


def plot_scatter(deltas: pd.DataFrame) -> Figure:
    methods = [NAMES[m] for m in ORDER if NAMES[m] in set(deltas["method"])]
    figure = Figure(figsize=(6.5, 2.1 * len(methods)), layout="constrained")
    axes = figure.subplots(len(methods), len(MODULES), squeeze=False)
    for i, method in enumerate(methods):
        for k, module in enumerate(MODULES):
            ax = axes[i][k]
            part = deltas[(deltas["method"] == method) & (deltas["module"] == module)]
            ax.scatter(part["delta_d"], part["delta_m"], s=10, c="0.45", label="raw ΔM")
            if part["delta_m_learned"].notna().all():
                ax.scatter(part["delta_d"], part["delta_m_learned"], s=10, c="C3",
                           marker="x", label="learned ΔM")  # fmt: skip
            ax.set_title(f"{method} {module}", fontsize=9)
            ax.tick_params(labelsize=7)
            ax.ticklabel_format(style="sci", scilimits=(-2, 3))
    for ax in axes[-1]:
        ax.set_xlabel("ΔD")
    for row in axes:
        row[0].set_ylabel("ΔM")
    axes[0][0].legend(fontsize=7)
    return figure


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path)
    parser.add_argument("--out", type=Path, default=Path("figures/peft_methods"))
    args = parser.parse_args()
    deltas, notes = deltas_of(args.runs)
    stats = statistics(deltas).merge(run_info(args.runs), on="method")
    stats = stats.assign(steps=",".join(str(s) for s in sorted(set(deltas["step"]))))
    args.out.mkdir(parents=True, exist_ok=True)
    write_csv_atomic(stats, args.out / "peft_methods_r.csv")
    write_csv_atomic(deltas, args.out / "peft_methods_deltas.csv")
    write_text_atomic(args.out / "peft_methods_notes.txt", "\n".join(notes) + "\n")
    save_figure_pair(plot_intervals(stats), args.out, "peft_methods_r", dpi=120)
    save_figure_pair(plot_scatter(deltas), args.out, "peft_methods_scatter", dpi=100)
    show = stats[["method", "module", "y", "pearson_r", "pearson_r_boot_low",
                  "pearson_r_boot_high", "within_step_r", "shrink_last"]]  # fmt: skip
    print(markdown_table(show))
    print(run_info(args.runs).to_string(index=False))
    print("\n".join(notes))


if __name__ == "__main__":
    main()
