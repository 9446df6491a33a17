"""``wdanalysis`` command line: thin shells over the Python API.

Every sub-command lives in the module that owns its concern and exposes
``register(subparsers)``; the handler it installs returns an exit status.
User errors (:class:`WDAnalysisError`) become one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Sequence

from wdanalysis.errors import WDAnalysisError


def build_parser() -> argparse.ArgumentParser:
    from wdanalysis import commands, demo_cli
    from wdanalysis.train import cli as train_cli

    parser = argparse.ArgumentParser(
        prog="wdanalysis",
        description="Weight-decomposition analysis of fine-tuning (DoRA paper, Figure 2).",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands.register(subparsers)
    train_cli.register(subparsers)
    demo_cli.register(subparsers)
    return parser


def version() -> str:
    """The installed distribution's version, else the package's own (a source checkout)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed_version

    try:
        return installed_version("wdanalysis")
    except PackageNotFoundError:
        from wdanalysis import __version__

        return __version__


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return run_handler(args)


def run_handler(args: argparse.Namespace) -> int:
    """Run a sub-command; user errors, OS errors and Ctrl-C become one line on stderr.

    Warnings (e.g. skipped incomplete checkpoints) are printed as ``wdanalysis: warning:``
    lines instead of Python's two-line ``file:line: UserWarning`` form.
    """
    with warnings.catch_warnings():
        warnings.showwarning = _show_warning
        try:
            return int(args.handler(args) or 0)
        except WDAnalysisError as error:
            print(f"wdanalysis: error: {error}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("wdanalysis: interrupted; no partial output was left behind", file=sys.stderr)
            return 130
        except OSError as error:  # e.g. an --out folder that cannot be written, a full disk
            where = f"{error.filename}: " if error.filename else ""
            text = " ".join(f"{where}{error.strerror or error}".split())
            print(
                f"wdanalysis: error: {text} (check the path and its permissions)", file=sys.stderr
            )
            return 2


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"wdanalysis: warning: {' '.join(str(message).split())}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
