"""MkDocs hooks of the documentation site (named in ``mkdocs.yml``).

* ``figures/`` (the committed results, outside ``docs/``) are added to the site under
  ``figures/``, so the guides show the very files the demo wrote.
* ``reference/cli.md`` is generated from the command line's own ``argparse`` parsers at
  every build (the ``<!-- cli-reference -->`` marker is replaced), so it cannot go stale.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parents[2]
FIGURES = ROOT / "figures"
CLI_MARKER = "<!-- cli-reference -->"


def on_files(files: Files, config) -> Files:
    """Add every committed figure (PNG/SVG) to the site as ``figures/<name>``."""
    for path in sorted(FIGURES.rglob("*")):
        if path.suffix in {".png", ".svg"}:
            uri = "figures/" + path.relative_to(FIGURES).as_posix()
            files.append(File.generated(config, uri, abs_src_path=str(path)))
    return files


def on_page_markdown(markdown: str, page, config, files) -> str:
    """Fill the CLI reference page from the parsers."""
    if CLI_MARKER in markdown:
        markdown = markdown.replace(CLI_MARKER, cli_reference())
    return markdown


def cli_reference() -> str:
    """One section per sub-command: its ``--help``, as ``wdanalysis COMMAND --help`` prints it.

    The help is formatted 100 columns wide whatever the terminal, so builds agree.
    """
    if str(ROOT) not in sys.path:  # the checkout's own package, installed or not
        sys.path.insert(0, str(ROOT))
    from wdanalysis.cli import build_parser
    from wdanalysis.cli.command_index import COMMANDS

    saved = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "100"
    try:
        parser = build_parser()
        subparsers = _subparsers(parser)
        parts = [_block("wdanalysis --help", parser.format_help())]
        for name in COMMANDS:
            sub = subparsers[name]
            parts.append(f"## `wdanalysis {name}`\n\n{COMMANDS[name][1]}.\n")
            parts.append(_block(f"wdanalysis {name} --help", sub.format_help()))
    finally:
        if saved is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = saved
    return "\n".join(parts)


def _subparsers(parser):
    import argparse

    for action in parser._actions:  # argparse keeps the sub-parsers in its choices
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    raise RuntimeError("the wdanalysis parser has no sub-commands")


def _block(command: str, text: str) -> str:
    text = re.sub(r"\n{3,}", "\n\n", text.rstrip())
    return f"```text\n$ {command}\n{text}\n```\n"
