"""``wdanalysis`` command line: thin shells over the Python API.

Every sub-command lives in the module that owns its concern and exposes
``register(subparsers)``; the handler it installs returns an exit status. The modules are
named in :mod:`~wdanalysis.cli.command_index` and imported only for the sub-command run.
User errors (:class:`WDAnalysisError`) and bad arguments become one line on stderr and exit
status 2. A sub-command's options may stand anywhere among its positionals (its arguments
are parsed with ``parse_intermixed_args``).
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Sequence
from importlib import import_module

from wdanalysis.cli.command_index import COMMANDS
from wdanalysis.errors import WDAnalysisError


class OneLineParser(argparse.ArgumentParser):
    """An argument error is one line, naming the option and where to read more."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())} (see {self.prog} --help)\n")


def positive_int(text: str) -> int:
    """An ``argparse`` type: an integer of at least 1 (``--workers 0`` is refused)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The ``wdanalysis`` parser.

    Given the command line, only the sub-command it runs is registered in full (its module
    imported); every other one is listed by its help line alone, so ``wdanalysis --help``
    imports no analysis, plotting or training code. Without it every sub-command is.
    """
    parser = OneLineParser(
        prog="wdanalysis",
        description="Weight-decomposition analysis of fine-tuning (DoRA paper, Figure 2).",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    chosen = COMMANDS.get(_command_in(argv)) if argv is not None else None
    registered: set[str] = set()  # modules whose sub-commands are in; one may add several
    for name, (module, help_line) in COMMANDS.items():
        if argv is None or (chosen is not None and module == chosen[0]):
            if module not in registered:
                import_module(module).register(subparsers)
                registered.add(module)
        else:
            subparsers.add_parser(name, help=help_line, add_help=False)
    return parser


def _command_in(argv: Sequence[str]) -> str | None:
    """The sub-command named on the command line (the first word that is not an option)."""
    return next((word for word in argv if not word.startswith("-")), None)


def version() -> str:
    """The installed distribution's version, else the package's own (a source checkout)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed_version

    try:
        return installed_version("wdanalysis")
    except PackageNotFoundError:
        from wdanalysis import __version__

        return __version__


def parse(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """Parse ``argv``; the sub-command's own arguments intermixed (options anywhere)."""
    command = _command_in(argv)
    at = argv.index(command) if command in argv else -1
    sub = _subparsers(parser).get(command)
    if at != 0 or sub is None:  # ``--version``, ``--help``, an unknown command: as usual
        return parser.parse_args(argv)
    args = sub.parse_intermixed_args(argv[1:])
    args.command = command
    return args


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:  # argparse keeps sub-parsers in its choices
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    line_buffered_output()
    parser = build_parser(argv)
    args = parse(parser, argv)
    return run_handler(args)


def line_buffered_output() -> None:
    """Each line printed reaches stdout as it is printed, also when stdout is a file or a
    pipe (block-buffered by default): ``wrote …`` appears when it happens, not at exit."""
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            try:
                reconfigure(line_buffering=True)
            except (ValueError, OSError):  # a closed or detached stream: leave it
                pass


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
        except KeyboardInterrupt as interrupt:
            # an output folder's transaction says what it left (storage.out_folder)
            left = getattr(interrupt, "left", None)
            print(f"wdanalysis: interrupted{f'; {left}' if left else ''}", file=sys.stderr)
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
