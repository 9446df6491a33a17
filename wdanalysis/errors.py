"""One error type for everything a user can get wrong, printed by the CLI as one line."""

from __future__ import annotations

from pathlib import Path


class WDAnalysisError(Exception):
    """A problem with the user's input: names the file (when there is one) and what to do.

    The CLI prints ``str(error)`` as a single line and exits with status 2, so the message
    must stand on its own: which file, what is wrong, and where possible the fix.
    """

    def __init__(self, problem: str, path: str | Path | None = None, hint: str | None = None):
        self.problem = problem
        self.path = None if path is None else Path(path)
        self.hint = hint
        super().__init__(self._format())

    def _format(self) -> str:
        text = self.problem if self.path is None else f"{self.path}: {self.problem}"
        if self.hint:
            text += f" ({self.hint})"
        return " ".join(text.split())  # one line, whatever the parts contained


class CheckpointFormatError(WDAnalysisError):
    """A file or folder is missing, truncated, corrupt or of an unknown format."""


class IncompleteCheckpointError(CheckpointFormatError):
    """A save not finished: files still being written, or a save cut short (weights
    without their config, a config without its weights, a file shorter than its header
    says, an empty checkpoint folder). The only refusal a run skips without being asked."""


class AdapterMismatchError(WDAnalysisError):
    """An adapter does not fit the base model (shapes, keys, config)."""


class NumericalError(WDAnalysisError):
    """Weights hold NaN/Inf or otherwise cannot give a defined ΔM/ΔD."""
