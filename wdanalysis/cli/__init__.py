"""The command line: ``wdanalysis compare|plot|inspect|train|demo``, thin shells over the
Python API, each registered only when it is run. May import every other subpackage."""

from __future__ import annotations

from wdanalysis.cli.entry_point import build_parser, main, run_handler, version

__all__ = ["build_parser", "main", "run_handler", "version"]
