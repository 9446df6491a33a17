"""The one-line notices and refusals ``compare`` gives before reading any matrix: bad
options, QLoRA runs compared against a full-precision base, resized vocabularies."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

from wdanalysis.errors import WDAnalysisError
from wdanalysis.loaders.quantized_training import quantized_base
from wdanalysis.loaders.runs import Run
from wdanalysis.storage.safe_regex import REGEX_CHARS, check_pattern
from wdanalysis.weights.bound_checkpoint import BoundCheckpoint


def check_options(modules: Sequence[str] | None, workers: int | None) -> None:
    """Bad options fail at once, in one line (not as a traceback after reading headers)."""
    if workers is not None and (
        isinstance(workers, bool) or not isinstance(workers, int) or workers < 1
    ):
        raise WDAnalysisError(f"workers must be a positive integer, got {workers!r}")
    for name in modules or ():
        if any(ch in name for ch in REGEX_CHARS):  # else a plain name: never compiled
            check_pattern(name, "--modules")  # matched by RE2 in linear time, or refused


def note_quantized_training(runs: list[Run]) -> None:
    """One line per QLoRA run: W0 here is the full-precision base, not the one it trained on."""
    for run in runs:
        scheme = next(filter(None, (quantized_base(c.path) for c in run.checkpoints)), None)
        if scheme:
            warnings.warn(
                f"note: {run.name}: its adapter was trained against a {scheme} quantization of "
                "the base; W0 here is the base as given (full precision), so ΔM/ΔD measure the "
                "adapter's update applied to those weights, not the change of the quantized "
                "model it trained (the live callback's rows measure that)",
                stacklevel=3,
            )


def warn_rows_added(bound: list[BoundCheckpoint], selected, shapes) -> None:
    """One warning per run whose vocabulary was resized (added tokens)."""
    chosen = set(selected)
    by_run: dict[str, dict[str, int]] = {}
    for item in bound:
        for key, n in item.rows_added.items():
            if key in chosen:
                by_run.setdefault(item.run.name, {})[key] = n
    for run, added in by_run.items():
        what = ", ".join(f"{key} +{n}" for key, n in added.items())
        warnings.warn(
            f"run {run}: rows beyond the base's in {what} (a vocabulary resized for added "
            "tokens): ΔM/ΔD compare the base's rows only; the column rows_added counts "
            "the rows left out",
            UserWarning,
            stacklevel=3,
        )
