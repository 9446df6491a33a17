"""``wdanalysis demo``: the command-line shell over :mod:`wdanalysis.demo.reproduction` (one
run), :mod:`wdanalysis.demo.studies` (seeds, ablation) and :mod:`wdanalysis.demo.dose_study`
(``--study dose``). Kept apart so that neither imports
the other's caller: reproduction ← studies ← demo_command."""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from wdanalysis.cli.command_index import help_of
from wdanalysis.cli.train_command import require_training_libraries
from wdanalysis.errors import WDAnalysisError
from wdanalysis.storage.atomic_write import write_csv_atomic
from wdanalysis.storage.out_folder import folder_lock, output_folder

if TYPE_CHECKING:  # the demo (torch, transformers) is imported when it runs, not for --help
    from wdanalysis.demo.reproduction import DemoSettings

DEMO_EXAMPLES = """\
examples:
  wdanalysis demo --quick                     # ~1 minute smoke run
  wdanalysis demo --out runs/demo --figures figures
  wdanalysis demo --seeds 3 --out runs/seeds  # the same study over seeds 0..2
  wdanalysis demo --analyse-only --out runs/demo
"""


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "demo",
        help=help_of("demo"),
        description="Train FT, LoRA and DoRA on a small text classifier, analyse the "
        "checkpoints and draw Figure 2 (CPU; needs pip install 'wdanalysis[demo]').",
        epilog=DEMO_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--out", type=Path, default=Path("runs/demo"), help="working folder (default runs/demo)"
    )
    parser.add_argument(
        "--figures", type=Path, help="also publish figures and tables here (default: not)"
    )
    parser.add_argument(
        "--quick", action="store_true", help="~1 minute smoke run, 20 steps (default: off)"
    )
    parser.add_argument("--seed", type=int, default=0, help="training seed (default 0)")
    parser.add_argument(
        "--seeds",
        type=int,
        default=1,
        help="train and analyse seeds 0..K-1, report across seeds (default 1)",
    )
    parser.add_argument("--steps", type=int, help="training steps per method (default 500)")
    parser.add_argument(
        "--weight-decay",
        type=float,
        help="AdamW weight decay for every method (default: per method, the one that applies "
        "the paper's decay dose wd·Σlr over the schedule: FT 0.05, LoRA/DoRA 0.5)",
    )
    parser.add_argument("--warmup-ratio", type=float, help="warm-up share of steps (default 0.1)")
    parser.add_argument(
        "--ablation",
        action="store_true",
        help="train every cell of steps {150, 500} × weight decay {0, 0.01} × warm-up "
        "{0, 10 %%} (default: off)",
    )
    parser.add_argument(
        "--study",
        choices=("dose",),
        help="dose: weight decay {0.01, 0.1, the paper's dose} × steps × FT/LoRA/DoRA, "
        "one cached JSON per cell, resumes (default: none, the single demo run)",
    )
    parser.add_argument(
        "--cache",
        type=Path,
        help="--study: folder of finished cells (default FIGURES/dose_study or OUT/cells)",
    )
    parser.add_argument(
        "--lengths",
        type=lambda text: tuple(int(p) for p in text.split(",") if p.strip()),
        help="--study: training lengths (default 500,2000)",
    )
    parser.add_argument(
        "--cells",
        type=lambda text: [p.strip() for p in text.split(",") if p.strip()],
        help="--study: only these cells, in this order, e.g. paper_steps500_seed0_dora "
        "(default: every cell)",
    )
    parser.add_argument(
        "--analyse-only",
        action="store_true",
        help="re-analyse the runs already in --out (default: train first)",
    )
    parser.add_argument(
        "--if-stale",
        action="store_true",
        help="skip when --figures is already up to date (default: always run)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars (default: shown)")
    parser.set_defaults(handler=run_demo_command)


def settings_from_args(args) -> DemoSettings:
    from wdanalysis.demo.reproduction import DemoSettings

    settings = DemoSettings.quick(args.seed) if args.quick else DemoSettings(seed=args.seed)
    overrides = {
        "steps": args.steps,
        "weight_decay": args.weight_decay,
        "warmup_ratio": args.warmup_ratio,
    }
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if overrides.get("steps", 1) <= 0 or not 0 <= overrides.get("warmup_ratio", 0) < 1:
        raise WDAnalysisError("--steps must be positive and --warmup-ratio in [0, 1)")
    if args.seeds < 1:
        raise WDAnalysisError("--seeds must be at least 1")
    return replace(settings, **overrides)


def run_demo_command(args) -> int:
    require_training_libraries("demo")
    from wdanalysis.demo.reproduction import figures_are_fresh, publish_figures, run_demo
    from wdanalysis.demo.summary import format_summary, sign_verdict

    settings = settings_from_args(args)
    if args.if_stale and args.figures and figures_are_fresh(args.figures, settings):
        print(f"{args.figures} is up to date with the code; nothing to do")
        return 0
    if args.study == "dose":
        return _dose_study_command(args, settings)
    if args.ablation:
        return _ablation_command(args, settings)
    if args.seeds > 1:
        return _seed_study_command(args, settings)
    result = run_demo(args.out, settings, progress=not args.quiet, analyse_only=args.analyse_only)
    print("\n" + format_summary(result.summary))
    print("\n" + sign_verdict(result.summary))
    if args.figures:
        with output_folder(args.figures, update=True) as stage:  # all published, or none
            publish_figures(result, stage.path)
        print(f"published figures and tables to {args.figures}/")
    print(f"done in {result.seconds / 60:.1f} min; outputs in {result.out_dir}/")
    return 0


def _seed_study_command(args, settings: DemoSettings) -> int:
    from wdanalysis.demo.reproduction import publish_figures
    from wdanalysis.demo.studies import format_seed_table, run_seed_study
    from wdanalysis.demo.summary import format_summary

    study = run_seed_study(args.out, settings, args.seeds, progress=not args.quiet)
    print("\nseed 0:\n" + format_summary(study.first.summary))
    print(f"\npooled Pearson r over {args.seeds} seeds:\n")
    print(format_seed_table(study.summary, study.per_seed))
    if args.figures:
        with output_folder(args.figures, update=True) as stage:
            publish_figures(study.first, stage.path, extra=study.files, seeds=args.seeds)
        print(f"published seed 0's figures and the seed study to {args.figures}/")
    print(f"done in {study.seconds / 60:.1f} min; outputs in {args.out}/")
    return 0


def _ablation_command(args, settings: DemoSettings) -> int:
    from wdanalysis.demo.studies import run_ablation

    table = run_ablation(args.out, settings, progress=not args.quiet)
    columns = ["cell", "method", "module", "accuracy", "pearson_r", "within_step_r"]
    print(table[columns].to_string(index=False, float_format=lambda v: f"{v:+.2f}"))
    if args.figures:
        with output_folder(args.figures, update=True) as stage:
            write_csv_atomic(table, stage.path / "ablation.csv")
        print(f"published ablation.csv to {args.figures}/")
    return 0


def _dose_study_command(args, settings: DemoSettings) -> int:
    """Issue 23's dose × length study; cells are cached in ``--cache`` (commit it)."""
    from wdanalysis.demo.dose_study import (
        LENGTHS,
        DoseCell,
        cached_table,
        format_study_table,
        missing_cells,
        run_dose_study,
        study_cells,
        write_outputs,
    )

    cache = args.cache or (args.figures / "dose_study" if args.figures else args.out / "cells")
    if args.cells:
        cells = [DoseCell.parse(name) for name in args.cells]
    else:
        cells = study_cells(lengths=args.lengths or LENGTHS)
    figures = Path(args.figures or args.out).absolute()
    figures.parent.mkdir(parents=True, exist_ok=True)
    with folder_lock(figures):  # no demo --figures swaps the folder while cells are written
        if args.analyse_only:  # the table and figure from the finished cells, no training
            table = cached_table(cache)
            write_outputs(table, figures)
        else:
            table = run_dose_study(args.out, cache, figures, settings, cells, not args.quiet)
    print("\n" + format_study_table(table))
    left = missing_cells(cells, cache)
    print(f"\n{len(cells) - len(left)} of {len(cells)} cells finished; cache in {cache}/")
    return 0
