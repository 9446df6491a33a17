"""The ``compare`` and ``inspect`` sub-commands: argument parsing and printing only."""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from wdanalysis.cli.command_index import help_of
from wdanalysis.cli.entry_point import positive_int
from wdanalysis.errors import WDAnalysisError
from wdanalysis.storage.atomic_write import write_csv_atomic

if TYPE_CHECKING:  # the analysis (torch, pandas) is imported when a command runs, not for --help
    import pandas as pd

    from wdanalysis.table.comparison import PartialResultError


def register(subparsers) -> None:
    _register_compare(subparsers)
    _register_plot(subparsers)
    _register_inspect(subparsers)


COMPARE_EXAMPLES = """\
examples:
  wdanalysis compare models/base runs/ft runs/lora runs/dora --out results
  wdanalysis compare --modules q_proj v_proj meta-llama/Llama-2-7b-hf runs/dora --out results
  wdanalysis compare auto runs/lora --modules 'layers\\.[0-3]\\..*q_proj' --axis in --out results
  wdanalysis compare models/base runs/ft runs/lora --labels FT LoRA --workers 2 --out results
options may stand before, between or after BASE and RUN; --modules takes leaf names
(q_proj), module paths or regular expressions (searched in the module path).
"""
PLOT_EXAMPLES = """\
examples:
  wdanalysis plot results/deltas.csv --out results/figures
  wdanalysis plot runs/dora/tracking.csv --out figures --dpi 300
"""
INSPECT_EXAMPLES = """\
examples:
  wdanalysis inspect runs/dora/checkpoint-500
  wdanalysis inspect meta-llama/Llama-2-7b-hf --json
"""


def module_pattern(text: str) -> str:
    """An ``argparse`` type: a module name, or a regular expression that compiles."""
    if any(ch in text for ch in "*[]()|+?\\^$"):
        try:
            re.compile(text)
        except re.error as error:
            raise argparse.ArgumentTypeError(
                f"invalid regular expression {text!r}: {error}"
            ) from None
    return text


def _register_compare(subparsers) -> None:
    parser = subparsers.add_parser(
        "compare",
        help=help_of("compare"),
        description="Compare fine-tuning runs with their base model (DoRA paper, Figure 2).",
        usage="%(prog)s BASE RUN [RUN ...] --out OUT [options]",
        epilog=COMPARE_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    # Optional for argparse only: ``--modules a b BASE RUN`` hands them to --modules, and
    # :func:`claim_positionals` takes them back.
    parser.add_argument(
        "base",
        nargs="?",
        metavar="BASE",
        help="pretrained model: file, folder, hub id org/name[@revision] in the local "
        "Hugging Face cache, or auto (the base the adapters name)",
    )
    parser.add_argument(
        "runs", nargs="*", metavar="RUN", help="run folders, single checkpoints or cached hub ids"
    )
    parser.add_argument("--labels", nargs="+", help="display names, one per run (default: method)")
    parser.add_argument(
        "--modules",
        nargs="+",
        type=module_pattern,
        help="module names, paths or regexes to analyse (default: attention query/value)",
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
        "--workers",
        type=positive_int,
        help="compute threads, at least 1 (default: 2 on machines with 2+ cores)",
    )
    parser.add_argument(
        "--weight-decay",
        type=float,
        nargs="+",
        metavar="WD",
        help="decoupled weight decay of runs without decay_shrink.json (one, or one per "
        "run): S from trainer_state.json's per-step learning rates (delta_m_learned)",
    )
    parser.add_argument(
        "--decay-shrink",
        nargs="+",
        metavar="S",
        help="the decay's shrink factor per run: S, STEP:S[,STEP:S...] or - (unknown)",
    )
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--no-figures", action="store_true", help="write the tables only")
    _add_pool(parser)
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(handler=run_compare)


def _register_plot(subparsers) -> None:
    parser = subparsers.add_parser(
        "plot",
        help=help_of("plot"),
        description="Draw Figure 2, the trajectories and the fits from a saved table: "
        "deltas.csv (wdanalysis compare) or tracking.csv (live tracking while training).",
        epilog=PLOT_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("table", type=Path, help="deltas.csv or tracking.csv")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--dpi", type=float, default=200, help="PNG resolution (default 200)")
    _add_pool(parser)
    parser.set_defaults(handler=run_plot)


def _add_y(parser) -> None:
    parser.add_argument(
        "--y",
        choices=["delta_m", "delta_m_learned"],
        default="delta_m",
        help="what fits and figures put on the y axis: ΔM (default) or ΔM less the weight "
        "decay's shrinkage (delta_m_learned)",
    )


def _add_pool(parser) -> None:
    _add_y(parser)
    parser.add_argument(
        "--pool",
        action="store_true",
        help="one fit and one cloud of points per run and module, as the paper's Figure 2 "
        "(default: one per kind: component, encoder/decoder stack, self/cross attention)",
    )


def _register_inspect(subparsers) -> None:
    parser = subparsers.add_parser(
        "inspect",
        help=help_of("inspect"),
        description="Say what a checkpoint, adapter or run folder holds, and which backend "
        "compare would sum on.",
        epilog=INSPECT_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
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
    from wdanalysis.table.distributed import compare_distributed, join_compare_job

    claim_positionals(args)
    fan = {"auto": None, "yes": True, "no": False}[args.fan_in_fan_out]
    _check_out_folder(args.out)
    job = join_compare_job()  # under torchrun: each rank a share, rank 0 writes (README)
    compute = compare if job is None else partial(compare_distributed, job)
    try:
        deltas = compute(
            args.base,
            list(args.runs),
            modules=args.modules,
            labels=args.labels,
            axis=args.axis,
            fan_in_fan_out=fan,
            device=args.device,
            workers=args.workers,
            progress=not args.quiet,
            weight_decay=args.weight_decay,
            decay_shrink=args.decay_shrink,
        )
    except PartialResultError as partial_result:
        return _write_partial(partial_result, args.out, args)
    except WDAnalysisError as error:
        if job is not None and not job.is_main:
            return 2  # rank 0 prints the job's one error line
        hint = f"{error.hint}; nothing was written" if error.hint else "nothing was written"
        raise WDAnalysisError(error.problem, error.path, hint) from None
    if deltas is None:  # another rank than 0 under torchrun: rank 0 writes everything
        return 0
    path = write_csv_atomic(deltas, args.out / "deltas.csv")
    record = _write_record(args, deltas)
    print(summarize(deltas))
    for note in deltas.attrs.get("decay_notes", []):
        print(f"note: {note}")
    print(f"\nwrote {path}\nwrote {record} (backend: {deltas.attrs.get('backend')})")
    if not args.no_figures:
        from wdanalysis.plots.report import write_report

        report = write_report(deltas, args.out, pool=args.pool, y=args.y)
        print("\n" + report.fit_table)
        for written in report.paths:
            print(f"wrote {written}")
    return 0


def claim_positionals(args: argparse.Namespace) -> None:
    """Take BASE and RUN back from ``--modules``/``--labels`` when those swallowed them.

    ``compare --modules q_proj v_proj BASE RUN`` gives argparse no way to tell where the
    module names end. Only when BASE or RUN is missing, the values at the end of the
    option that name checkpoints (an existing path, ``auto``, a hub id ``org/name``) are
    taken back, in order; module names and labels name none of these.
    """
    given = ([args.base] if args.base else []) + list(args.runs)
    for option in ("modules", "labels"):
        values = list(getattr(args, option) or [])
        cut = len(values)
        while len(given) < 2 and cut > 0 and _names_checkpoint(values[cut - 1]):
            cut -= 1
        if cut == len(values):
            continue
        if cut == 0:
            raise WDAnalysisError(f"--{option} was given no value before BASE and RUN")
        taken, values = values[cut:], values[:cut]
        setattr(args, option, values)
        given = given + taken if args.base else taken + given
    if len(given) < 2:
        raise WDAnalysisError(
            "compare needs BASE and at least one RUN",
            hint="e.g. wdanalysis compare models/base runs/dora --out results; "
            "see wdanalysis compare --help",
        )
    args.base, args.runs = given[0], given[1:]


def _names_checkpoint(value: str) -> bool:
    hub_id = re.fullmatch(r"[\w.-]+/[\w.@-]+", value) is not None
    return value == "auto" or hub_id or Path(value).exists()


def run_plot(args: argparse.Namespace) -> int:
    """``fits.csv`` and the figures of a saved table, exactly as ``compare --out`` draws them."""
    from wdanalysis.plots.report import write_report
    from wdanalysis.table.schema import read_table

    table = read_table(args.table)
    _check_out_folder(args.out)
    print(summarize(table))
    report = write_report(table, args.out, dpi=args.dpi, pool=args.pool, y=args.y)
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

    # not "out": the record lies there, and the same comparison written elsewhere (or by
    # torchrun's rank 0) gives the same bytes
    skip = ("handler", "command", "out")
    options = {k: v for k, v in vars(args).items() if k not in skip}
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
