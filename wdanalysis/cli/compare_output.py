"""What ``compare`` and ``plot`` write into their (staged) output folder and print: the
table, ``run.json``, the report, a partial result, and the one-line-per-run summary."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from wdanalysis.storage.atomic_write import write_csv_atomic

if TYPE_CHECKING:  # the analysis (torch, pandas) is imported when a command runs, not for --help
    import pandas as pd

    from wdanalysis.table.comparison import PartialResultError


def write_result(deltas: pd.DataFrame, stage, args: argparse.Namespace, said: list) -> int:
    """The table, its record and (unless ``--no-figures``) the report, into ``stage``."""
    path = write_csv_atomic(deltas, stage.path / "deltas.csv")
    write_record(args, deltas, stage.path)
    print(summarize(deltas))
    print_left_out(deltas)
    for note in deltas.attrs.get("decay_notes", []):
        print(f"note: {note}")
    backend = deltas.attrs.get("backend")
    record = stage.final(stage.path / "run.json")
    said += [f"\nwrote {stage.final(path)}", f"wrote {record} (backend: {backend})"]
    if args.no_figures:
        return 0
    from wdanalysis.plots.report import write_report

    try:
        report = write_report(
            deltas,
            stage.path,
            pool=args.pool,
            formats=args.format,
            figures=getattr(args, "figures", "overview"),
            workers=None,
            progress=not args.quiet,
            y=args.y,
        )
    except Exception as error:  # noqa: BLE001 - the computed table must not be lost
        stage.discard_new(keep={"deltas.csv", "run.json"})
        text = " ".join(str(error).split()) or type(error).__name__
        said.append(
            f"wdanalysis: error: the figures failed ({text}); only the table and "
            "run.json were written"
        )
        return 2
    print("\n" + report.fit_table)
    said += [f"wrote {stage.final(written)}" for written in report.paths]
    return 0


def print_left_out(table: pd.DataFrame) -> None:
    """The checkpoints not in the table (being written, or refused under --skip-bad)."""
    for item in table.attrs.get("left_out", []):
        print(
            f"left out: {item['run']} {Path(item['checkpoint']).name} ({item['left_out']}: "
            f"{' '.join(str(item['reason']).split())})"
        )


def write_record(args: argparse.Namespace, table: pd.DataFrame, folder: Path) -> Path:
    """``run.json`` beside ``deltas.csv``: the backend that ran, the options, and every
    checkpoint left out (still being written, or refused under ``--skip-bad``)."""
    from wdanalysis.cli.entry_point import version
    from wdanalysis.table.run_record import write_run_record

    # not "out": the record lies there, and the same comparison written elsewhere (or by
    # torchrun's rank 0) gives the same bytes
    skip = ("handler", "command", "out")
    options = {k: v for k, v in vars(args).items() if k not in skip}
    return write_run_record(folder, table, options, version())


def write_partial(partial: PartialResultError, stage, args: argparse.Namespace) -> int:
    path = write_csv_atomic(partial.table, stage.path / "deltas.csv")
    write_record(args, partial.table, stage.path)
    print(summarize(partial.table))
    print_left_out(partial.table)
    for run, step, error in partial.failures:
        where = run if step is None else f"{run} step {step}"
        print(f"wdanalysis: error: {where}: {error}", file=sys.stderr)
    kept = partial.table[["run", "checkpoint"]].drop_duplicates()
    print(
        f"wdanalysis: wrote {stage.final(path)} with the {len(kept)} checkpoints that "
        f"succeeded; the {len(partial.failures)} above failed and are not in it; no figures "
        "were made",
        file=sys.stderr,
    )
    return 2


def summarize(deltas: pd.DataFrame) -> str:
    """One line per run: label (where one differs from its method), method, steps, weights,
    mean ΔM and ΔD at the last step."""
    labelled = "label" in deltas and (deltas["label"].astype(str) != deltas["method"]).any()
    head = f"{'label':<12} " if labelled else ""
    lines = [
        f"{'run':<24} {head}{'method':<8} {'steps':<18} {'weights':>7} {'ΔM last':>10} "
        f"{'ΔD last':>10}"
    ]
    for run, group in deltas.groupby("run", sort=False):
        steps = group["step"].dropna().unique()
        last = group[group["step"] == steps.max()] if len(steps) else group
        step_text = ",".join(str(s) for s in sorted(steps)) or "?"
        label = f"{str(group['label'].iloc[0])[:12]:<12} " if labelled else ""
        lines.append(
            f"{run[:24]:<24} {label}{group['method'].iloc[0][:8]:<8} {step_text[:18]:<18} "
            f"{last['parameter'].nunique():>7} {last['delta_m'].mean():>10.3g} "
            f"{last['delta_d'].mean():>10.3g}"
        )
    zero = int(deltas["zero_norm_vectors"].sum())
    if zero:
        lines.append(
            f"note: {zero} zero-norm vectors were left out of ΔD (column zero_norm_vectors)"
        )
    return "\n".join(lines)
