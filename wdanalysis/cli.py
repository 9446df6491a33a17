"""``wdanalysis`` command line: thin shells over the Python API.

Every sub-command lives in the module that owns its concern and exposes
``register(subparsers)``; the handler it installs returns an exit status.
User errors (:class:`WDAnalysisError`) become one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from wdanalysis.errors import WDAnalysisError


def build_parser() -> argparse.ArgumentParser:
    from wdanalysis import commands
    from wdanalysis.train import cli as train_cli

    parser = argparse.ArgumentParser(
        prog="wdanalysis",
        description="Weight-decomposition analysis of fine-tuning (DoRA paper, Figure 2).",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands.register(subparsers)
    train_cli.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except WDAnalysisError as error:
        print(f"wdanalysis: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("wdanalysis: interrupted; no partial output was left behind", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
