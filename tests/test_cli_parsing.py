"""The command line's parsing: one-line errors, options anywhere, examples in every --help,
the backend recorded in run.json, and a one-line message when transformers is missing."""

from __future__ import annotations

import json
import sys

import pandas as pd
import pytest
import torch
from safetensors.torch import save_file

import wdanalysis
from wdanalysis.cli import main
from wdanalysis.cli.command_index import COMMANDS
from wdanalysis.errors import WDAnalysisError

KEYS = [f"model.layers.0.self_attn.{m}.weight" for m in ("q_proj", "k_proj", "v_proj")]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A base and two fine-tuned checkpoints of one tiny attention layer."""
    root = tmp_path_factory.mktemp("cli")
    gen = torch.Generator().manual_seed(0)
    base = {k: torch.randn(6, 4, generator=gen) for k in KEYS}
    for name, scale in (("base", 0.0), ("ft1", 0.01), ("ft2", 0.02)):
        (root / name).mkdir()
        state = {k: v + scale * torch.randn(6, 4, generator=gen) for k, v in base.items()}
        save_file(state, str(root / name / "model.safetensors"))
    return root


def _one_line_error(capsys, argv) -> str:
    with pytest.raises(SystemExit) as stopped:
        main(argv)
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("workers", ["0", "-3", "two"])
def test_bad_workers_is_one_line(capsys, models, workers):
    argv = ["compare", str(models / "base"), str(models / "ft1"), "--out", "x"]
    err = _one_line_error(capsys, [*argv, "--workers", workers])
    assert "--workers" in err and workers in err


def test_bad_regex_is_one_line(capsys, models):
    argv = ["compare", str(models / "base"), str(models / "ft1"), "--modules", "q_proj("]
    err = _one_line_error(capsys, [*argv, "--out", "x"])
    assert "invalid regular expression 'q_proj('" in err


def test_bad_regex_and_workers_from_python(models):
    for options in ({"modules": ["(q"]}, {"workers": 0}):
        with pytest.raises(WDAnalysisError):
            wdanalysis.compare(models / "base", models / "ft1", progress=False, **options)


@pytest.mark.parametrize(
    "order",
    [
        ["--modules", "q_proj", "v_proj", "{base}", "{ft1}", "{ft2}", "--out", "{out}"],
        ["{base}", "--modules", "q_proj", "v_proj", "{ft1}", "{ft2}", "--out", "{out}"],
        ["--out", "{out}", "{base}", "{ft1}", "--modules", "q_proj", "v_proj", "--", "{ft2}"],
        ["{base}", "{ft1}", "--out", "{out}", "{ft2}", "--modules", "q_proj", "v_proj"],
    ],
)
def test_options_may_stand_anywhere(models, tmp_path, capsys, order):
    paths = {name: str(models / name) for name in ("base", "ft1", "ft2")}
    argv = [word.format(out=tmp_path, **paths) for word in order]
    assert main(["compare", "--no-figures", "--quiet", *argv]) == 0
    table = pd.read_csv(tmp_path / "deltas.csv")
    assert sorted(set(table["module"])) == ["q_proj", "v_proj"]
    assert table["checkpoint"].str.contains("ft2").sum() == 2
    record = json.loads((tmp_path / "run.json").read_text())
    assert record["backend"].startswith(("fused C kernel", "torch"))
    assert record["options"]["modules"] == ["q_proj", "v_proj"]


def test_missing_run_is_one_line(capsys, models):
    err = _one_line_error_from_handler(capsys, ["compare", str(models / "base"), "--out", "x"])
    assert "needs BASE and at least one RUN" in err


def _one_line_error_from_handler(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_help_shows_examples(capsys, command):
    with pytest.raises(SystemExit) as stopped:
        main([command, "--help"])
    assert stopped.value.code == 0
    out = capsys.readouterr().out
    assert "examples:" in out and f"wdanalysis {command} " in out.split("examples:")[1]


@pytest.mark.parametrize("command", ["train", "demo"])
def test_training_without_transformers_names_the_extra(capsys, monkeypatch, tmp_path, command):
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers fails
    argv = ["--method", "lora", "--model", "m", "--data", "builtin:tweets", "--out", str(tmp_path)]
    err = _one_line_error_from_handler(
        capsys, [command, *(argv if command == "train" else ["--out", str(tmp_path)])]
    )
    assert f"pip install 'wdanalysis[{command}]'" in err and "transformers" in err


def test_inspect_records_the_backend(models, capsys):
    assert main(["inspect", str(models / "ft1"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["sums_backend"].startswith(("fused C kernel", "torch"))
