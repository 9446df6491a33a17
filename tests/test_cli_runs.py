"""How ``compare`` finds and names runs, and the traps of its command line.

A tiny LLaMA (built by transformers) is the base; PEFT writes LoRA and DoRA adapters into
Trainer-style ``runs/<name>/checkpoint-N`` folders, and a full fine-tuning is saved beside
them. Each test fails on the behaviour of issue 31: a run given as BASE got "no
recognisable checkpoint"; the same run given twice was analysed twice without a word;
single checkpoints were named ``checkpoint-10``/``checkpoint-10#2``; ``--labels``
overwrote the inferred method; "wrote …" reached a file only at exit.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pandas as pd
import pytest
from builders import finetuned, make_peft_adapter, save_model, tiny_model

import wdanalysis
from wdanalysis.cli import main
from wdanalysis.table.schema import read_table

pytest.importorskip("peft")

TARGETS = ["q_proj", "v_proj"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """``base/``, ``runs/{lora,dora}/checkpoint-{10,20}``, ``runs/ft/checkpoint-{10,20}``."""
    root = tmp_path_factory.mktemp("runs")
    model = tiny_model("llama")
    state = save_model(model, root / "base")
    for step in (10, 20):
        for name, dora in (("lora", False), ("dora", True)):
            make_peft_adapter(
                model,
                root / "runs" / name / f"checkpoint-{step}",
                seed=step + dora,
                r=2,
                lora_alpha=4,
                target_modules=TARGETS,
                use_dora=dora,
            )
        ft = finetuned(state, seed=step)
        save_model(ft, root / "runs" / "ft" / f"checkpoint-{step}", config=model.config)
    return root


def _compare(base, run_paths, **kwargs) -> pd.DataFrame:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return wdanalysis.compare(base, run_paths, progress=False, **kwargs)


def _cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


# ---------------------------------------------------------------------------- swapped


def test_a_run_given_as_base_is_said_to_look_swapped(runs, tmp_path, capsys):
    code, _, err = _cli(
        capsys, "compare", runs / "runs" / "lora", runs / "base", "--out", tmp_path / "o"
    )
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "look swapped" in lines[0] and "checkpoint-N" in lines[0]
    assert "no recognisable checkpoint" not in lines[0]
    assert not (tmp_path / "o" / "deltas.csv").exists()


def test_a_base_given_as_a_run_beside_an_adapter_base_is_said_to_look_swapped(
    runs, tmp_path, capsys
):
    adapter = runs / "runs" / "lora" / "checkpoint-10"
    code, _, err = _cli(capsys, "compare", adapter, runs / "base", "--out", tmp_path / "o")
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "look swapped" in lines[0], err
    assert "RUN base" in lines[0]


def test_an_adapter_base_without_a_plain_model_run_is_refused_as_before(runs, tmp_path, capsys):
    adapter = runs / "runs" / "lora" / "checkpoint-10"
    code, _, err = _cli(capsys, "compare", adapter, runs / "runs" / "dora", "--out", tmp_path)
    assert code == 2 and "must be a full model, not an adapter" in err
    assert "swapped" not in err


# ---------------------------------------------------------------------------- given twice


def test_the_same_run_given_twice_is_warned_about(runs, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(runs)
    code, out, err = _cli(
        capsys,
        "compare",
        "base",
        "runs/lora",
        "./runs/lora/",  # the same folder, written another way
        str(runs / "runs" / "dora"),
        "--out",
        tmp_path / "o",
        "--no-figures",
        "--quiet",
    )
    assert code == 0, err
    warned = [line for line in err.splitlines() if "given 2 times" in line]
    assert len(warned) == 1 and str(runs / "runs" / "lora") in warned[0], err
    assert "lora, lora#2" in warned[0]
    table = read_table(tmp_path / "o" / "deltas.csv")
    assert list(dict.fromkeys(table["run"])) == ["lora", "lora#2", "dora"]


def test_the_base_given_as_a_run_too_is_warned_about(runs):
    with pytest.warns(UserWarning, match="is the BASE itself"):
        table = wdanalysis.compare(runs / "base", [runs / "base"], progress=False)
    assert (table["delta_m"] == 0).all()


def test_distinct_runs_are_not_warned_about(runs):
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        wdanalysis.compare(
            runs / "base", [runs / "runs" / "lora", runs / "runs" / "dora"], progress=False
        )
    assert not [w for w in seen if "given" in str(w.message) or "BASE" in str(w.message)]


# ---------------------------------------------------------------------------- names


def test_single_checkpoints_are_named_after_their_run_folder(runs):
    table = _compare(
        runs / "base",
        [
            runs / "runs" / "lora" / "checkpoint-10",
            runs / "runs" / "dora" / "checkpoint-10",
            runs / "runs" / "ft" / "checkpoint-20" / "model.safetensors",
        ],
    )
    assert list(dict.fromkeys(table["run"])) == ["lora", "dora", "ft"]
    assert table.groupby("run", sort=False)["step"].first().to_list() == [10, 10, 20]
    adapter_file = runs / "runs" / "dora" / "checkpoint-20" / "adapter_model.safetensors"
    assert set(_compare(runs / "base", adapter_file)["run"]) == {"dora"}


def test_two_checkpoints_of_one_run_are_told_apart_by_their_step_folder(runs):
    ft = runs / "runs" / "ft"
    table = _compare(runs / "base", [ft / "checkpoint-10", ft / "checkpoint-20"])
    assert list(dict.fromkeys(table["run"])) == ["ft/checkpoint-10", "ft/checkpoint-20"]


def test_run_folders_of_the_same_name_are_told_apart_by_their_parents(runs, tmp_path):
    for seed in ("a", "b"):
        link = tmp_path / seed / "lora"
        link.parent.mkdir()
        link.symlink_to(runs / "runs" / ("lora" if seed == "a" else "dora"))
    table = _compare(runs / "base", [tmp_path / "a" / "lora", tmp_path / "b" / "lora"])
    assert list(dict.fromkeys(table["run"])) == ["a/lora", "b/lora"]


# ---------------------------------------------------------------------------- labels


def test_labels_set_the_label_column_and_keep_the_inferred_method(runs, tmp_path, capsys):
    out = tmp_path / "o"
    code, printed, err = _cli(
        capsys,
        "compare",
        runs / "base",
        runs / "runs" / "ft",
        runs / "runs" / "lora",
        runs / "runs" / "dora",
        "--labels",
        "full",
        "low-rank",
        "decomposed",
        "--out",
        out,
        "--quiet",
        "--no-figures",  # the fits below are those write_report saves as fits.csv
    )
    assert code == 0, err
    table = pd.read_csv(out / "deltas.csv")
    assert list(table.columns[:2]) == ["method", "label"]
    per_run = table.groupby("run", sort=False)[["method", "label"]].first()
    assert per_run["method"].to_list() == ["FT", "LoRA", "DoRA"]
    assert per_run["label"].to_list() == ["full", "low-rank", "decomposed"]
    assert "decomposed" in printed and "DoRA" in printed  # the per-run summary: both
    fits = wdanalysis.fit_lines(read_table(out / "deltas.csv"))
    pooled = fits[fits["scope"] == "pooled"].groupby("run", sort=False).first()
    assert pooled["label"].to_list() == ["full", "low-rank", "decomposed"]
    assert pooled["method"].to_list() == ["FT", "LoRA", "DoRA"]
    text = wdanalysis.stats.format_fit_table(fits)
    assert text.splitlines()[0].split()[0] == "label" and "decomposed" in text

    figure = wdanalysis.plot_figure2(read_table(out / "deltas.csv"), module="q_proj")
    titles = [ax.get_title() for ax in figure.axes if ax.get_title()]
    assert [t.split(" (")[0] for t in titles] == ["full", "low-rank", "decomposed"]
    # the dict keys of the Python API are labels too
    as_dict = _compare(runs / "base", {"mine": runs / "runs" / "dora"})
    assert set(as_dict["label"]) == {"mine"} and set(as_dict["method"]) == {"DoRA"}


def test_a_table_without_label_reads_its_method_as_the_label(runs, tmp_path):
    table = _compare(runs / "base", [runs / "runs" / "lora"], labels=["mine"])
    old = table.drop(columns=["label"]).assign(method="mine")  # schema 2: name in method
    old.to_csv(tmp_path / "old.csv", index=False)
    again = read_table(tmp_path / "old.csv")
    assert list(again.columns[:2]) == ["method", "label"]
    assert set(again["label"]) == {"mine"}
    fits = wdanalysis.fit_lines(again)
    assert set(fits["label"]) == {"mine"} and set(fits["method"]) == {"mine"}


# ---------------------------------------------------------------------------- flushed


_PROBE = """
import sys
from pathlib import Path
import wdanalysis.plots.report as report
from wdanalysis.cli import main

stdout_file = Path(sys.argv[1])

real = report.write_report

def spying(*args, **kwargs):  # what a reader of the file sees when figures begin
    Path(sys.argv[2]).write_text(stdout_file.read_text())
    return real(*args, **kwargs)

report.write_report = spying
sys.exit(main(sys.argv[3:]))
"""


def test_wrote_lines_reach_a_file_as_they_happen(runs, tmp_path):
    """stdout to a file is block-buffered by Python (unless PYTHONUNBUFFERED is set, as it
    is left unset here): the summary table must be in the file when the figures begin,
    not only at exit. The "wrote …" lines follow once the output folder is swapped in
    whole (before that, nothing is written in ``--out``)."""
    stdout_file, seen = tmp_path / "stdout.txt", tmp_path / "seen.txt"
    argv = ["compare", runs / "base", runs / "runs" / "lora", "--out", tmp_path / "o", "--quiet"]
    with stdout_file.open("w") as handle:
        done = subprocess.run(
            [sys.executable, "-c", _PROBE, stdout_file, seen, *map(str, argv)],
            stdout=handle,
            stderr=subprocess.PIPE,
            text=True,
            cwd=Path(__file__).resolve().parents[1],
            env={k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"},
        )
    assert done.returncode == 0, done.stderr
    assert "ΔM last" in seen.read_text() and "lora" in seen.read_text()
    assert "wrote " not in seen.read_text()  # not yet: --out still holds the old result
    assert f"wrote {tmp_path / 'o' / 'deltas.csv'}" in stdout_file.read_text()
    assert json.loads((tmp_path / "o" / "run.json").read_text())
