"""The ``compare`` and ``inspect`` sub-commands: argument parsing and printing only."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from wdanalysis.cli.command_index import help_of
from wdanalysis.errors import WDAnalysisError
from wdanalysis.storage.atomic_write import write_csv_atomic

if TYPE_CHECKING:  # the analysis (torch, pandas) is imported when a command runs, not for --help
    import pandas as pd

    from wdanalysis.table.comparison import PartialResultError


def register(subparsers) -> None:
    _register_compare(subparsers)
    _register_plot(subparsers)
    _register_inspect(subparsers)


def _register_compare(subparsers) -> None:
    parser = subparsers.add_parser(
        "compare",
        help=help_of("compare"),
        description="Compare fine-tuning runs with their base model (DoRA paper, Figure 2).",
    )
    parser.add_argument(
        "base",
        help="pretrained model: file, folder, hub id org/name[@revision] in the local "
        "Hugging Face cache, or auto (the base the adapters name)",
    )
    parser.add_argument("runs", nargs="+", help="run folders, single checkpoints or cached hub ids")
    parser.add_argument("--labels", nargs="+", help="display names, one per run (default: method)")
    parser.add_argument(
        "--modules", nargs="+", help="module names to analyse (default: attention query/value)"
    )
    parser.add_argument(
        "--axis",
        choices=["out", "in"],
        default="out",
        help="magnitude per output feature (default, as DoRA) or per input feature",
    )
    parser.add_argument(
        "--fan-in-fan-out",
        choices=["auto", "yes", "no"],
        default="auto",
        help="weights stored (in, out) as GPT-2 Conv1D (default: infer)",
    )
    parser.add_argument(
        "--device", choices=["cpu", "cuda"], default="cpu", help="where ΔM/ΔD sums are computed"
    )
    parser.add_argument(
        "--workers", type=int, help="compute threads (default: 2 on machines with 2+ cores)"
    )
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--no-figures", action="store_true", help="write the tables only")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(handler=run_compare)


def _register_plot(subparsers) -> None:
    parser = subparsers.add_parser(
        "plot",
        help=help_of("plot"),
        description="Draw Figure 2, the trajectories and the fits from a saved table: "
        "deltas.csv (wdanalysis compare) or tracking.csv (live tracking while training).",
    )
    parser.add_argument("table", type=Path, help="deltas.csv or tracking.csv")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--dpi", type=float, default=200, help="PNG resolution (default 200)")
    parser.set_defaults(handler=run_plot)


def _register_inspect(subparsers) -> None:
    parser = subparsers.add_parser("inspect", help=help_of("inspect"))
    parser.add_argument("path", help="file, folder or cached hub id org/name[@revision]")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.set_defaults(handler=run_inspect)


def run_compare(args: argparse.Namespace) -> int:
    """Write ``deltas.csv`` (atomically) and the report.

    A bad input found before computing stops everything, and the message says nothing was
    written. A checkpoint that fails mid-way (NaN weights, an unreadable tensor) is left
    out: the table of every other checkpoint is still written, each failure is printed,
    figures are not made and the exit status is 2.
    """
    from wdanalysis.table.comparison import PartialResultError, compare

    fan = {"auto": None, "yes": True, "no": False}[args.fan_in_fan_out]
    _check_out_folder(args.out)
    try:
        deltas = compare(
            args.base,
            list(args.runs),
            modules=args.modules,
            labels=args.labels,
            axis=args.axis,
            fan_in_fan_out=fan,
            device=args.device,
            workers=args.workers,
            progress=not args.quiet,
        )
    except PartialResultError as partial:
        return _write_partial(partial, args.out, args)
    except WDAnalysisError as error:
        hint = f"{error.hint}; nothing was written" if error.hint else "nothing was written"
        raise WDAnalysisError(error.problem, error.path, hint) from None
    path = write_csv_atomic(deltas, args.out / "deltas.csv")
    record = _write_record(args, deltas)
    print(summarize(deltas))
    print(f"\nwrote {path}\nwrote {record} (backend: {deltas.attrs.get('backend')})")
    if not args.no_figures:
        from wdanalysis.plots.report import write_report

        report = write_report(deltas, args.out)
        print("\n" + report.fit_table)
        for written in report.paths:
            print(f"wrote {written}")
    return 0


def run_plot(args: argparse.Namespace) -> int:
    """``fits.csv`` and the figures of a saved table, exactly as ``compare --out`` draws them."""
    from wdanalysis.plots.report import write_report
    from wdanalysis.table.schema import read_table

    table = read_table(args.table)
    _check_out_folder(args.out)
    print(summarize(table))
    report = write_report(table, args.out, dpi=args.dpi)
    print("\n" + report.fit_table)
    for note in report.notes:
        print(f"note: {note}")
    for written in report.paths:
        print(f"wrote {written}")
    return 0


def _check_out_folder(out: Path) -> None:
    """Fail before a long computation, not after it, when ``--out`` cannot be written."""
    if out.exists() and not out.is_dir():
        raise WDAnalysisError("--out is a file, not a folder", out, "choose another --out")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise WDAnalysisError(
            f"cannot create the output folder: {error.strerror}", out, "choose another --out"
        ) from None
    if not os.access(out, os.W_OK):
        raise WDAnalysisError("the output folder is not writable", out, "choose another --out")


def _write_record(args: argparse.Namespace, table: pd.DataFrame) -> Path:
    """``run.json`` beside ``deltas.csv``: the backend that ran and the options."""
    from wdanalysis.cli.entry_point import version
    from wdanalysis.table.run_record import write_run_record

    options = {k: v for k, v in vars(args).items() if k not in ("handler", "command")}
    return write_run_record(args.out, table, options, version())


def _write_partial(partial: PartialResultError, out: Path, args: argparse.Namespace) -> int:
    path = write_csv_atomic(partial.table, out / "deltas.csv")
    _write_record(args, partial.table)
    print(summarize(partial.table))
    for run, step, error in partial.failures:
        where = run if step is None else f"{run} step {step}"
        print(f"wdanalysis: error: {where}: {error}", file=sys.stderr)
    kept = partial.table[["run", "checkpoint"]].drop_duplicates()
    print(
        f"wdanalysis: wrote {path} with the {len(kept)} checkpoints that succeeded; "
        f"the {len(partial.failures)} above failed and are not in it; no figures were made",
        file=sys.stderr,
    )
    return 2


def summarize(deltas: pd.DataFrame) -> str:
    """One line per run: method, steps, weights, mean ΔM and ΔD at the last step."""
    lines = [
        f"{'run':<24} {'method':<8} {'steps':<18} {'weights':>7} {'ΔM last':>10} {'ΔD last':>10}"
    ]
    for run, group in deltas.groupby("run", sort=False):
        steps = group["step"].dropna().unique()
        last = group[group["step"] == steps.max()] if len(steps) else group
        step_text = ",".join(str(s) for s in sorted(steps)) or "?"
        lines.append(
            f"{run[:24]:<24} {group['method'].iloc[0][:8]:<8} {step_text[:18]:<18} "
            f"{last['parameter'].nunique():>7} {last['delta_m'].mean():>10.3g} "
            f"{last['delta_d'].mean():>10.3g}"
        )
    zero = int(deltas["zero_norm_vectors"].sum())
    if zero:
        lines.append(
            f"note: {zero} zero-norm vectors were left out of ΔD (column zero_norm_vectors)"
        )
    return "\n".join(lines)


def run_inspect(args: argparse.Namespace) -> int:
    from wdanalysis.table.inspection import format_inspection, inspect

    info = inspect(args.path)
    text = json.dumps(info, indent=2, default=str) if args.json else format_inspection(info)
    print(text, file=sys.stdout)
    return 0
