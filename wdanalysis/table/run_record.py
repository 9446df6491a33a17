"""``run.json``: how a ``deltas.csv`` was computed, written beside it by ``compare --out``.

A table alone does not say which backend summed it (the fused C kernel, or the torch path
and why), with which options, or by which versions; the record does, so that two tables
that differ can be told apart by more than their numbers.
"""

from __future__ import annotations

import json
import platform
import sys
from pathlib import Path

import pandas as pd

from wdanalysis.storage.atomic_write import write_text_atomic

RECORD_NAME = "run.json"


def run_record(table: pd.DataFrame, options: dict, version: str) -> dict:
    """The record of one comparison: the backend, the options, the versions."""
    import torch

    return {
        "tool": "wdanalysis compare",
        "version": version,
        "backend": table.attrs.get("backend", "unknown"),
        "options": options,
        "rows": len(table),
        # checkpoints not in the table: still being written, or refused under --skip-bad
        "left_out": table.attrs.get("left_out", []),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "platform": platform.platform(),
    }


def write_run_record(out: Path, table: pd.DataFrame, options: dict, version: str) -> Path:
    """Write ``out/run.json`` atomically (``version``: wdanalysis' own)."""
    text = json.dumps(run_record(table, options, version), indent=2, default=str) + "\n"
    return write_text_atomic(Path(out) / RECORD_NAME, text)
