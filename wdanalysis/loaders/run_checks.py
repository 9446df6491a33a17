"""What a run leaves out, and why: odd paths named, saves in progress told apart.

Used by :func:`wdanalysis.loaders.runs.open_run`: a path that is a link loop, a dangling
link, a FIFO, socket or device is refused in one line; a refused checkpoint whose files
still grow is a save in progress (skipped), any other refusal is the checkpoint's own.
"""

from __future__ import annotations

import errno
import os
import time
import warnings
from pathlib import Path

from wdanalysis.errors import CheckpointFormatError
from wdanalysis.storage.small_files import kind_of


def refuse_odd_path(path: Path) -> None:
    """A symbolic link loop or dangling link, a FIFO, socket or device: one line, named."""
    try:
        mode = os.stat(path).st_mode
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise CheckpointFormatError(
                "symbolic link loop (the link leads back to itself)",
                path,
                "fix or remove the link",
            ) from None
        if path.is_symlink():
            raise CheckpointFormatError(
                f"dangling symbolic link (to {os.readlink(path)})", path, "fix or remove the link"
            ) from None
        return  # missing: the caller says so
    if not (os.path.isdir(path) or os.path.isfile(path)):
        raise CheckpointFormatError(
            f"is {kind_of(mode)}, not a regular file or a folder; refusing to read it",
            path,
            "check the path",
        )


def still_growing(folder: Path, wait: float = 0.25) -> bool:
    """Whether a file of ``folder`` changes size or time within ``wait`` seconds (a save
    in progress); asked only of a checkpoint that was refused."""

    def sizes() -> dict:
        try:
            entries = [folder] if folder.is_file() else list(folder.iterdir())
            return {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in entries}
        except OSError:
            return {}

    before = sizes()
    time.sleep(wait)
    return bool(before) and sizes() != before


def warn_left_out(run) -> None:
    """One warning for the checkpoints ``run`` skipped, one for those it refused."""
    if run.skipped:
        warnings.warn(
            f"{run.path}: skipped {len(run.skipped)} incomplete checkpoint(s): "
            + ", ".join(f"{p.name} ({why})" for p, why in run.skipped)
            + "; still being written, or the save was cut short (listed in run.json)",
            stacklevel=3,
        )
    if run.refused:
        warnings.warn(
            f"{run.path}: --skip-bad left out {len(run.refused)} refused checkpoint(s) "
            "(listed in run.json): " + ", ".join(f"{p.name} ({why})" for p, why in run.refused),
            stacklevel=3,
        )


def left_out(runs: list) -> list[dict]:
    """Every checkpoint a comparison left out, with why: for ``run.json`` and the report."""
    return [
        {"run": run.name, "checkpoint": str(folder), "left_out": kind, "reason": why}
        for run in runs
        for kind, entries in (("being written", run.skipped), ("refused", run.refused))
        for folder, why in entries
    ]
