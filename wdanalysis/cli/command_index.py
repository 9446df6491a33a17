"""The sub-commands, where each lives and its one-line help, known without importing them.

``wdanalysis --help`` lists every sub-command from this table alone; only the sub-command
that is run (or asked for ``--help``) imports its module and, with it, torch, pandas or the
trainer. Each module's ``register(subparsers)`` takes its help line from here.
"""

from __future__ import annotations

#: sub-command → (module that registers it, one-line help), in the order ``--help`` lists
COMMANDS: dict[str, tuple[str, str]] = {
    "compare": (
        "wdanalysis.cli.analysis_commands",
        "ΔM/ΔD of every run against the base model; table, fits and Figure 2",
    ),
    "plot": (
        "wdanalysis.cli.analysis_commands",
        "fits, Figure 2 and trajectories from a deltas.csv or tracking.csv table",
    ),
    "inspect": (
        "wdanalysis.cli.analysis_commands",
        "say what a checkpoint, adapter or run folder holds",
    ),
    "train": (
        "wdanalysis.cli.train_command",
        "fine-tune with ft, lora or dora and save checkpoints for the analysis",
    ),
    "demo": (
        "wdanalysis.cli.demo_command",
        "end-to-end Figure-2 reproduction on CPU: train FT/LoRA/DoRA, analyse, plot",
    ),
}


def help_of(command: str) -> str:
    """The one-line help of ``command`` (as ``wdanalysis --help`` lists it)."""
    return COMMANDS[command][1]
