"""The ``compare`` and ``inspect`` sub-commands: argument parsing and printing only."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import sys
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from wdanalysis.cli.command_index import help_of
from wdanalysis.cli.compare_output import (  # summarize: re-exported, the name users held
    summarize,
    write_partial,
    write_result,
)
from wdanalysis.cli.entry_point import positive_int
from wdanalysis.errors import WDAnalysisError

if TYPE_CHECKING:  # the analysis (torch, pandas) is imported when a command runs, not for --help
    pass


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
    from wdanalysis.storage.safe_regex import REGEX_CHARS, UnsafePatternError, compile_linear

    if any(ch in text for ch in REGEX_CHARS):
        try:
            compile_linear(text)  # matched by RE2 in linear time, or refused
        except UnsafePatternError as error:
            reason = error.problem.removeprefix("is not a valid regular expression ")
            raise argparse.ArgumentTypeError(
                f"invalid regular expression {text!r}: {reason}"
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
    parser.add_argument(
        "--labels",
        nargs="+",
        help="display names, one per run: the label column; method stays inferred "
        "(default: the method)",
    )
    parser.add_argument(
        "--modules",
        nargs="+",
        type=module_pattern,
        help="module names, paths or regexes to analyse (default: attention query/value)",
    )
    parser.add_argument(
        "--whole",
        nargs="+",
        type=module_pattern,
        default=[],
        metavar="NAME",
        help="fused weights to analyse unsplit (their parts' rows averaged); default: none, "
        "a fused weight with no known split is refused",
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
        "--device",
        choices=["cpu", "cuda"],
        default="cpu",
        help="where ΔM/ΔD sums are computed (default cpu)",
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
        "run): S from trainer_state.json's per-step learning rates (delta_m_learned; "
        "default: none, S unknown unless recorded)",
    )
    parser.add_argument(
        "--decay-shrink",
        nargs="+",
        metavar="S",
        help="the decay's shrink factor per run: S, STEP:S[,STEP:S...] or - (unknown; "
        "default: none)",
    )
    parser.add_argument("--out", type=Path, required=True, help="output folder (required)")
    parser.add_argument(
        "--no-figures", action="store_true", help="write the tables only (default: figures too)"
    )
    parser.add_argument(
        "--skip-bad",
        action="store_true",
        help="leave out checkpoints refused for their content (listed in run.json) instead "
        "of failing (default: fail); checkpoints still being written are always skipped "
        "and listed",
    )
    _add_format(parser)
    _add_pool(parser)
    parser.add_argument("--quiet", action="store_true", help="no progress bar (default: shown)")
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
    parser.add_argument("--out", type=Path, required=True, help="output folder (required)")
    parser.add_argument("--dpi", type=float, default=100, help="PNG resolution (default 100)")
    _add_format(parser)
    _add_pool(parser)
    parser.set_defaults(handler=run_plot)


def figure_formats(text: str) -> tuple[str, ...]:
    """An ``argparse`` type: comma-separated figure formats among png, svg, pdf."""
    chosen = tuple(dict.fromkeys(p.strip().lower() for p in text.split(",") if p.strip()))
    bad = [p for p in chosen if p not in ("png", "svg", "pdf")]
    if bad or not chosen:
        raise argparse.ArgumentTypeError(
            f"unknown figure format(s) {', '.join(bad) or '(none)'}: choose from png, svg, pdf"
        )
    return chosen


def _add_format(parser) -> None:
    parser.add_argument(
        "--format",
        type=figure_formats,
        default=("png",),
        metavar="FORMATS",
        help="figure formats, comma-separated among png, svg, pdf (default: png; "
        "e.g. png,svg,pdf for papers)",
    )
    parser.add_argument(
        "--figures",
        choices=["overview", "all"],
        default="overview",
        help="overview (default): figure2 and trajectories, every module on one page each, "
        "heatmaps in index.html; all: also figure2_, trajectories_ and heatmap_<module> files",
    )


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
    parser.add_argument(
        "--json", action="store_true", help="machine-readable output (default: text)"
    )
    parser.set_defaults(handler=run_inspect)


def run_compare(args: argparse.Namespace) -> int:
    """Write ``deltas.csv``, ``run.json`` and the report into ``--out`` as one transaction.

    Everything is written into a staging folder beside ``--out`` and swapped in whole on
    success (:mod:`wdanalysis.storage.out_folder`): a bad input, a failure or Ctrl-C leaves
    the previous result untouched. A checkpoint that fails mid-way (NaN weights, an
    unreadable tensor) is left out: the table of every other checkpoint is still written,
    each failure is printed, figures are not made and the exit status is 2. So is the
    table when only the figures fail.
    """
    if not args.no_figures and os.environ.get("RANK", "0") == "0":
        from wdanalysis.plots.drawing import prestart_workers

        prestart_workers()  # the figure workers import matplotlib while torch loads here
    from wdanalysis.storage.out_folder import output_folder
    from wdanalysis.table.comparison import PartialResultError, compare
    from wdanalysis.table.distributed import compare_distributed, join_compare_job

    claim_positionals(args)
    fan = {"auto": None, "yes": True, "no": False}[args.fan_in_fan_out]
    job = join_compare_job()  # under torchrun: each rank a share, rank 0 writes (README)
    compute = compare if job is None else partial(compare_distributed, job)
    writes = job is None or job.is_main
    said: list[str] = []  # "wrote …" lines, printed once the folder is swapped in
    with output_folder(args.out) if writes else contextlib.nullcontext() as stage:
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
                skip_bad=args.skip_bad,
                whole=args.whole,
                weight_decay=args.weight_decay,
                decay_shrink=args.decay_shrink,
            )
        except PartialResultError as partial_result:
            status = write_partial(partial_result, stage, args)
            deltas = None
        except WDAnalysisError as error:
            if not writes:
                return 2  # rank 0 prints the job's one error line
            left = "nothing was written"  # the staging folder goes; --out stays as it was
            hint = f"{error.hint}; {left}" if error.hint else left
            raise WDAnalysisError(error.problem, error.path, hint) from None
        if deltas is not None:
            status = write_result(deltas, stage, args, said)
        elif not writes:  # another rank than 0 under torchrun: rank 0 writes everything
            return 0
    for line in said:
        print(line, file=sys.stderr if line.startswith("wdanalysis: error") else sys.stdout)
    return status


def claim_positionals(args: argparse.Namespace) -> None:
    """Take BASE and RUN back from ``--modules``/``--labels`` when those swallowed them.

    ``compare --modules q_proj v_proj BASE RUN`` gives argparse no way to tell where the
    module names end. Only when BASE or RUN is missing, the values at the end of the
    option that name checkpoints (an existing path, ``auto``, a hub id ``org/name``) are
    taken back, in order; module names and labels name none of these.
    """
    given = ([args.base] if args.base else []) + list(args.runs)
    for option in ("modules", "labels", "whole"):
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
    """``fits.csv`` and the figures of a saved table, exactly as ``compare --out`` draws them,
    written into ``--out`` as one transaction (the table itself kept when it lies there)."""
    from wdanalysis.plots.report import write_report
    from wdanalysis.storage.out_folder import output_folder
    from wdanalysis.storage.small_files import regular_file
    from wdanalysis.table.schema import read_table

    if args.table.exists() or args.table.is_symlink():  # missing: read_table says so
        regular_file(args.table)  # a FIFO or device as the table would block or never end
    table = read_table(args.table)
    keep = set()
    if args.table.resolve().parent == args.out.resolve():  # plot results/deltas.csv --out results
        keep = {args.table.name, "run.json"}
    with output_folder(args.out, keep=keep) as stage:
        print(summarize(table))
        report = write_report(
            table,
            stage.path,
            dpi=args.dpi,
            pool=args.pool,
            formats=args.format,
            figures=args.figures,
            workers=None,
            y=args.y,
            progress=not getattr(args, "quiet", False),
        )
    print("\n" + report.fit_table)
    for note in report.notes:
        print(f"note: {note}")
    for written in report.paths:
        print(f"wrote {stage.final(written)}")
    return 0


def run_inspect(args: argparse.Namespace) -> int:
    from wdanalysis.table.inspection import format_inspection, inspect

    info = inspect(args.path)
    text = json.dumps(info, indent=2, default=str) if args.json else format_inspection(info)
    print(text, file=sys.stdout)
    return 0
