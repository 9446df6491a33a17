"""The command line starts fast: ``wdanalysis --help`` imports no analysis, plotting or
training code, and each sub-command imports only what it needs.

Each check runs in a fresh interpreter (the test process has long imported everything) and
reads ``sys.modules`` after the parser has printed its help.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from wdanalysis.cli import build_parser
from wdanalysis.cli.command_index import COMMANDS

_PROBE = """
import json, sys
from wdanalysis.cli import main
try:
    main(sys.argv[2:])
except SystemExit:
    pass
with open(sys.argv[1], "w") as handle:
    json.dump(sorted(sys.modules), handle)
"""
HEAVY = ("scipy", "matplotlib", "transformers", "wdanalysis.demo", "wdanalysis.train")


def _modules_after(tmp_path, *argv: str) -> set[str]:
    out = tmp_path / "modules.json"
    done = subprocess.run(
        [sys.executable, "-c", _PROBE, str(out), *argv], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert "usage: wdanalysis" in done.stdout
    return set(json.loads(out.read_text()))


def _imported(modules: set[str], package: str) -> bool:
    return any(m == package or m.startswith(package + ".") for m in modules)


def test_top_level_help_imports_neither_torch_nor_pandas_nor_the_demo(tmp_path):
    modules = _modules_after(tmp_path, "--help")
    assert "wdanalysis.cli.entry_point" in modules  # the probe ran the real command
    for package in (*HEAVY, "torch", "pandas", "wdanalysis.engine", "wdanalysis.table"):
        assert not _imported(modules, package), f"wdanalysis --help imported {package}"


@pytest.mark.parametrize("command", ["compare", "plot", "inspect"])
def test_analysis_sub_command_help_imports_no_scipy_matplotlib_demo_or_training(tmp_path, command):
    modules = _modules_after(tmp_path, command, "--help")
    assert "wdanalysis.cli.analysis_commands" in modules
    for package in HEAVY:
        assert not _imported(modules, package), f"{command} --help imported {package}"


def test_train_help_leaves_the_demo_and_the_analysis_alone(tmp_path):
    modules = _modules_after(tmp_path, "train", "--help")
    assert "wdanalysis.cli.train_command" in modules
    for package in ("wdanalysis.demo", "wdanalysis.table", "scipy", "matplotlib"):
        assert not _imported(modules, package), f"train --help imported {package}"


@pytest.mark.parametrize("command", ["train", "demo"])
def test_train_and_demo_help_are_as_light_as_compare_help(tmp_path, command):
    """``train --help`` and ``demo --help`` print their options without importing torch,
    transformers or the trainer (they took 2.7 s and 4.4 s when they did)."""
    modules = _modules_after(tmp_path, command, "--help")
    assert f"wdanalysis.cli.{command}_command" in modules
    for package in (*HEAVY, "torch", "pandas", "transformers", "peft"):
        assert not _imported(modules, package), f"{command} --help imported {package}"


def _options(command: str) -> list:
    parser = build_parser([command, "--help"])
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    return [
        action
        for action in sub.choices[command]._actions
        if action.option_strings and action.dest != "help"
    ]


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_option_has_a_help_text_that_says_its_default(command):
    for action in _options(command):
        text = action.help or ""
        assert len(text) > 10, f"{command} {action.option_strings[0]} has no help text"
        assert "default" in text or "required" in text, (
            f"{command} {action.option_strings[0]}: the help does not say its default: {text!r}"
        )
        if action.required:
            assert "required" in text, action.option_strings


def test_quiet_everywhere_and_no_progress_kept_as_its_alias():
    """Every command that shows progress takes ``--quiet``; ``train --no-progress`` (its
    old name) still works and means the same."""
    from wdanalysis.cli.entry_point import parse

    base = ["--method", "lora", "--model", "m", "--data", "d", "--out", "o"]
    for argv in (
        ["compare", "base", "run", "--out", "o", "--quiet"],
        ["demo", "--quiet"],
        ["train", *base, "--quiet"],
        ["train", *base, "--no-progress"],
    ):
        assert parse(build_parser(argv), argv).quiet is True, argv
    argv = ["train", *base]
    assert parse(build_parser(argv), argv).quiet is False
    from wdanalysis.cli.train_command import config_from_args

    argv = ["train", *base, "--no-progress"]
    assert config_from_args(parse(build_parser(argv), argv)).progress is False


def test_train_choices_written_out_are_the_trainers_methods():
    from wdanalysis.cli.train_command import METHODS
    from wdanalysis.train.config import METHODS as TRAINER_METHODS

    assert METHODS == TRAINER_METHODS


def _listed(parser) -> dict[str, str]:
    """Sub-command → help line, as ``wdanalysis --help`` lists them."""
    action = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    return {choice.dest: choice.help for choice in action._choices_actions}


def test_lazy_listing_is_the_listing_of_the_registered_commands():
    full = _listed(build_parser())  # every sub-command registered by its own module
    lazy = _listed(build_parser(["--help"]))  # from the command index alone
    assert list(full) == list(COMMANDS) == list(lazy)
    assert full == lazy


@pytest.mark.parametrize("command", list(COMMANDS))
def test_each_sub_command_parses_its_own_options_when_chosen(command, capsys):
    parser = build_parser([command, "--help"])
    with pytest.raises(SystemExit) as done:
        parser.parse_args([command, "--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    assert f"usage: wdanalysis {command}" in text and "--" in text.split("usage:", 1)[1]
