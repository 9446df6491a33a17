"""Issue 34: hostile inputs never hang, never read without bound, never mislead; a refused
checkpoint fails the run unless --skip-bad; output folders hold one whole result."""

from __future__ import annotations

import io
import json
import os
import pickle
import re
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_robustness import (
    assert_user_error,
    base_state,
    compare_cli,
    ft_run,
    run_cli,
    save_adapter,
    save_model,
)

from wdanalysis.errors import CheckpointFormatError, WDAnalysisError
from wdanalysis.loaders.peft_config import read_adapter_config
from wdanalysis.storage.safe_regex import UnsafePatternError, peft_pattern_key
from wdanalysis.storage.small_files import read_json, read_small_bytes
from wdanalysis.storage.tensor_store import load_torch_state_dict, pickle_danger

EVIL = "(.*.*)*XYZ$"  # Python's re backtracks exponentially on it


@pytest.fixture
def base(tmp_path) -> Path:
    return save_model(tmp_path / "base", base_state())


# ------------------------------------------------------------------ bounded small reads


def test_fifo_config_is_refused_without_opening(capsys, tmp_path, base):
    """A FIFO as the base's config.json: opening it for reading would block forever."""
    (base / "config.json").unlink()
    os.mkfifo(base / "config.json")
    ft = save_model(tmp_path / "ft", base_state(seed=3))
    code, _, err = compare_cli(capsys, tmp_path, base, ft)
    assert_user_error(code, err, base / "config.json", "FIFO", "not a regular file")


def test_fifo_adapter_config(tmp_path):
    folder = save_adapter(tmp_path / "lora")
    (folder / "adapter_config.json").unlink()
    os.mkfifo(folder / "adapter_config.json")
    with pytest.raises(CheckpointFormatError, match="FIFO"):
        read_adapter_config(folder / "adapter_config.json")


def test_dev_zero_config_is_refused(capsys, tmp_path, base):
    """config.json → /dev/zero read until memory ran out (5 GB in 13 s)."""
    ft = save_adapter(tmp_path / "lora")
    (ft / "adapter_config.json").unlink()
    (ft / "adapter_config.json").symlink_to("/dev/zero")
    code, _, err = compare_cli(capsys, tmp_path, base, ft)
    assert_user_error(code, err, ft / "adapter_config.json", "character device")


def test_size_cap(tmp_path):
    """A file over the cap is refused from its size, before a byte is read."""
    big = tmp_path / "adapter_config.json"
    with open(big, "wb") as handle:
        handle.truncate((64 << 20) + 1)  # sparse: no disk used
    with pytest.raises(CheckpointFormatError, match="larger than the 64 MiB") as caught:
        read_adapter_config(big)
    assert "\n" not in str(caught.value)
    small = tmp_path / "trainer_state.json"
    small.write_text(json.dumps({"global_step": 3, "pad": "x" * 100}))
    assert read_json(small)["global_step"] == 3
    with pytest.raises(CheckpointFormatError, match="larger than"):
        read_small_bytes(small, limit=50)


def test_deeply_nested_json_is_one_line(tmp_path):
    config = tmp_path / "adapter_config.json"
    config.write_text("[" * 200_000 + "]" * 200_000)
    with pytest.raises(CheckpointFormatError, match="nested too deeply"):
        read_adapter_config(config)


def test_symlink_loop_checkpoint_is_named(capsys, tmp_path, base):
    """A checkpoint-N link loop was skipped without a word; now it fails the run (named),
    or is left out and listed with --skip-bad."""
    run = ft_run(tmp_path / "run", base_state(), steps=(1,))
    (run / "checkpoint-2").symlink_to("checkpoint-2")
    code, _, err = compare_cli(capsys, tmp_path, base, run)
    assert_user_error(code, err, run / "checkpoint-2", "symbolic link loop", "--skip-bad")
    assert not (tmp_path / "out").exists()
    code, out, err = compare_cli(capsys, tmp_path, base, run, extra=["--skip-bad"])
    assert code == 0, err
    record = json.loads((tmp_path / "out" / "run.json").read_text())
    (left,) = record["left_out"]
    assert left["checkpoint"].endswith("checkpoint-2") and left["left_out"] == "refused"
    assert "symbolic link loop" in left["reason"] and "checkpoint-2" in out


# ------------------------------------------------------------------ regular expressions


def _long_module() -> str:
    return "base_model.model." + ".".join(["block"] * 12) + ".self_attn.q_proj"


def test_rank_pattern_redos_is_linear(tmp_path):
    """PEFT's rule on "(.*.*)*XYZ$" never returned under Python's re; RE2 answers."""
    started = time.perf_counter()
    assert peft_pattern_key({EVIL: 8, "q_proj": 4}, _long_module() + "x" * 5000) is None
    assert peft_pattern_key({EVIL: 8, "q_proj": 4}, _long_module()) == "q_proj"
    assert time.perf_counter() - started < 60  # generous: a hang is what is tested


def test_rank_pattern_redos_end_to_end(capsys, tmp_path, base):
    config = {
        "peft_type": "LORA",
        "r": 2,
        "lora_alpha": 4,
        "target_modules": ["q_proj", "v_proj"],
        "rank_pattern": {EVIL: 8},
        "alpha_pattern": {EVIL: 1.0},
    }
    lora = save_adapter(tmp_path / "lora", config=config)
    code, _, err = compare_cli(capsys, tmp_path, base, lora)
    assert code == 0, err


@pytest.mark.parametrize(
    "keys",
    [
        ["q_proj"],
        ["layers.0.self_attn.q_proj"],
        [r"layers\.[01]\..*_proj"],
        ["v_proj", "proj"],
        ["self_attn.q", "model.layers.1.self_attn.v_proj"],
        ["^model.*q_proj"],
        ["q_proj|v_proj"],
    ],
)
def test_peft_pattern_semantics(keys):
    """The same key wins as in the installed PEFT's own get_pattern_key."""
    other = pytest.importorskip("peft.utils.other")
    modules = [
        f"model.layers.{i}.self_attn.{name}" for i in (0, 1) for name in ("q_proj", "v_proj")
    ]
    for module in modules:
        theirs = other.get_pattern_key(keys, module)
        ours = peft_pattern_key(keys, module)
        assert (ours if ours is not None else module) == theirs, (keys, module)


def test_backreference_pattern_refused_in_one_line(tmp_path):
    folder = save_adapter(
        tmp_path / "lora",
        config={"peft_type": "LORA", "r": 2, "lora_alpha": 4, "rank_pattern": {r"(q)\1": 2}},
    )
    with pytest.raises(UnsafePatternError, match="linear time") as caught:
        read_adapter_config(folder / "adapter_config.json")
    assert "rank_pattern key" in str(caught.value) and "\n" not in str(caught.value)


def test_modules_redos_and_lookaround(capsys, tmp_path, base):
    ft = save_model(tmp_path / "ft", base_state(seed=3))
    code, _, err = compare_cli(capsys, tmp_path, base, ft, extra=["--modules", EVIL])
    assert_user_error(code, err, base, "selects no weight matrix")
    with pytest.raises(SystemExit):
        compare_cli(capsys, tmp_path, base, ft, extra=["--modules", "(?=q)q_proj"])
    err = capsys.readouterr().err
    assert "linear time" in err and len(err.strip().splitlines()) == 1


# ------------------------------------------------------------------ pickles


def _torch_zip_with_global(path: Path) -> None:
    """A torch zip whose data.pkl calls os.system; only ever loaded with weights_only."""
    buffer = io.BytesIO()
    torch.save({"w": torch.zeros(2)}, buffer)
    source = zipfile.ZipFile(io.BytesIO(buffer.getvalue()))
    evil = b"\x80\x02cos\nsystem\nX\x04\x00\x00\x00true\x85R."
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as out:
        for name in source.namelist():
            out.writestr(name, evil if name.endswith("data.pkl") else source.read(name))


def test_malicious_pickle_names_the_danger(tmp_path):
    path = tmp_path / "pytorch_model.bin"
    _torch_zip_with_global(path)
    with pytest.raises(CheckpointFormatError) as caught:
        load_torch_state_dict(path)
    text = str(caught.value)
    assert "could run code" in text and "os.system" in text, text
    assert "truncated" not in text and "\n" not in text


@pytest.mark.parametrize(
    "message, named",
    [
        (
            "Weights only load failed. ...\n\nTrying to load unsupported GLOBAL os.system whose "
            "module os is blocked.\n\nCheck the documentation",
            "the global os.system",
        ),
        (
            "Weights only load failed. Unsupported global: GLOBAL posix.system was not an "
            "allowed global by default.",
            "the global posix.system",
        ),
        ("Unsupported global: GLOBAL builtins.eval", "the global builtins.eval"),
        ("Weights only load failed.\n Unsupported operand 149", "Unsupported operand 149"),
    ],
)
def test_pickle_danger_every_message_form(message, named):
    assert named in pickle_danger(pickle.UnpicklingError(message))


def test_corrupt_pickle_is_not_called_dangerous():
    assert pickle_danger(pickle.UnpicklingError("pickle data was truncated")) is None
    assert pickle_danger(RuntimeError("failed finding central directory")) is None


# ------------------------------------------------------------------ refused checkpoints


def _bad_adapter(folder: Path) -> Path:
    save_adapter(folder)
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_Z.weight"] = torch.zeros(2, 4)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    return folder


def test_refused_checkpoint_fails_the_run_unless_skip_bad(capsys, tmp_path, base):
    run = tmp_path / "run"
    save_adapter(run / "checkpoint-1")
    _bad_adapter(run / "checkpoint-2")
    code, _, err = compare_cli(capsys, tmp_path, base, run)
    line = assert_user_error(code, err, run / "checkpoint-2", "unknown adapter tensor")
    assert "incomplete" not in line and "--skip-bad" in line and "nothing was written" in line
    assert not (tmp_path / "out").exists()
    code, out, err = compare_cli(capsys, tmp_path, base, run, extra=["--skip-bad"])
    assert code == 0, err
    assert "incomplete" not in err and "refused" in err
    record = json.loads((tmp_path / "out" / "run.json").read_text())
    assert [item["left_out"] for item in record["left_out"]] == ["refused"]
    assert "left out: run checkpoint-2 (refused" in out


def test_every_checkpoint_refused_is_not_called_incomplete(capsys, tmp_path, base):
    run = tmp_path / "run"
    for step in (1, 2):
        _bad_adapter(run / f"checkpoint-{step}")
    code, _, err = compare_cli(capsys, tmp_path, base, run, extra=["--skip-bad"])
    assert_user_error(code, err, run, "none of the 2 checkpoint folders could be read")


def test_checkpoint_being_written_is_skipped_and_recorded(capsys, tmp_path, base):
    run = tmp_path / "run"
    save_adapter(run / "checkpoint-1")
    save_adapter(run / "checkpoint-2")
    (run / "checkpoint-2" / "adapter_model.safetensors").unlink()  # weights not yet written
    code, _, err = compare_cli(capsys, tmp_path, base, run)
    assert code == 0, err
    record = json.loads((tmp_path / "out" / "run.json").read_text())
    (left,) = record["left_out"]
    assert left["left_out"] == "being written" and left["checkpoint"].endswith("checkpoint-2")


def test_still_growing_tells_a_save_in_progress(tmp_path):
    import threading

    from wdanalysis.loaders.run_checks import still_growing

    folder = tmp_path / "checkpoint-3"
    folder.mkdir()
    (folder / "pytorch_model.bin").write_bytes(b"PK")
    assert not still_growing(folder, wait=0.05)
    stop = threading.Event()

    def write():
        with open(folder / "pytorch_model.bin", "ab") as handle:
            while not stop.is_set():
                handle.write(b"x" * 64)
                handle.flush()
                stop.wait(0.005)

    writer = threading.Thread(target=write)
    writer.start()
    try:
        assert still_growing(folder, wait=0.2)
    finally:
        stop.set()
        writer.join()


# ------------------------------------------------------------------ output folders


def _names(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()} if folder.exists() else set()


def _leftovers(parent: Path) -> list[str]:
    """Temporaries of a transaction or of an atomic write: none may outlive a new run."""
    return sorted(
        p.name for p in parent.rglob("*") if re.search(r"\.wd(tmp|ready|old)-|\.tmp$", p.name)
    )


def test_second_compare_leaves_no_stale_figures(capsys, tmp_path, base):
    run = ft_run(tmp_path / "run", base_state())
    out = tmp_path / "out"
    (out).mkdir()
    (out / "notes.txt").write_text("mine")  # not wdanalysis': kept
    every = ("--figures", "all")  # a file per module: the first run's must go
    code, _, err = run_cli(capsys, "compare", base, run, "--out", out, "--quiet", *every)
    assert code == 0, err
    assert "figure2_v_proj.png" in _names(out)
    code, _, err = run_cli(
        capsys, "compare", base, run, "--out", out, "--quiet", "--modules", "up_proj", *every
    )
    assert code == 0, err
    names = _names(out)
    stale = [n for n in names if "q_proj" in n or "v_proj" in n]  # the first run's figures
    assert "figure2_up_proj.png" in names and not stale, names
    assert (out / "notes.txt").read_text() == "mine"
    assert _leftovers(tmp_path) == []


def test_ctrl_c_while_figures_are_drawn(capsys, tmp_path, base, monkeypatch):
    import wdanalysis.plots.drawing as drawing

    run = ft_run(tmp_path / "run", base_state())
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "compare", base, run, "--out", out, "--quiet", "--no-figures")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    original, calls = drawing.save_figure, []

    def interrupt_on_third(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # figure2 drawn and saved, the next one not
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(drawing, "save_figure", interrupt_on_third)
    argv = ["compare", base, run, "--out", out, "--quiet", "--axis", "in", "--modules", "q_proj"]
    code, _, err = run_cli(capsys, *argv)
    assert code == 130
    assert err.strip() == f"wdanalysis: interrupted; {out}: the previous result is unchanged"
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert _leftovers(tmp_path) == []


def test_failing_figures_keep_the_computed_table(capsys, tmp_path, base, monkeypatch):
    import wdanalysis.plots.overview as overview

    def broken(*args, **kwargs):
        raise RuntimeError("no display")

    monkeypatch.setattr(overview, "plot_trajectories_overview", broken)
    ft = ft_run(tmp_path / "run", base_state())
    code, _, err = run_cli(capsys, "compare", base, ft, "--out", tmp_path / "out", "--quiet")
    assert code == 2 and "the figures failed (no display)" in err
    assert _names(tmp_path / "out") == {"deltas.csv", "run.json"}


def test_plot_into_the_tables_folder_keeps_it(capsys, tmp_path, base):
    out = tmp_path / "out"
    code, _, err = compare_cli(capsys, tmp_path, base, ft_run(tmp_path / "run", base_state()))
    assert code == 0, err
    table = (out / "deltas.csv").read_bytes()
    code, _, err = run_cli(capsys, "plot", out / "deltas.csv", "--out", out)
    assert code == 0, err
    assert (out / "deltas.csv").read_bytes() == table and (out / "run.json").exists()
    assert "figure2.png" in _names(out)


def test_out_is_the_current_folder(capsys, tmp_path, base, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(capsys, "compare", base, base, "--out", ".", "--quiet")
    assert_user_error(code, err, tmp_path, "current folder", "sub-folder")


def test_concurrent_compare_is_refused(capsys, tmp_path, base):
    """While another process holds the folder's lock, a compare into it is refused at once."""
    import subprocess

    out = tmp_path / "out"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pathlib import Path; "
            "from wdanalysis.storage.out_folder import acquire_lock; "
            f"acquire_lock(Path({str(out)!r})); print('held', flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        code, _, err = compare_cli(capsys, tmp_path, base, base)
        assert_user_error(code, err, out, f"pid {holder.pid}", "another wdanalysis command")
    finally:
        holder.kill()
        holder.wait()
    code, _, err = compare_cli(capsys, tmp_path, base, base)  # the lock died with it
    assert code == 0, err


def test_tracker_table_lock_and_stale_temporaries(tmp_path):
    from wdanalysis.storage.out_folder import acquire_lock, release_lock
    from wdanalysis.tracking.tracker import remove_stale_temporaries

    table = tmp_path / "tracking.csv"
    stale = tmp_path / ".tracking.csv.k3j4h5g6.tmp"
    stale.write_text("half")
    remove_stale_temporaries(table)
    assert not stale.exists()
    lock = acquire_lock(table)
    release_lock(lock)


def test_wdanalysis_errors_are_one_line():
    error = WDAnalysisError("a\nb", "x", "c\nd")
    assert "\n" not in str(error)


def test_plot_of_a_fifo_table_is_refused(capsys, tmp_path):
    table = tmp_path / "deltas.csv"
    os.mkfifo(table)
    code, _, err = run_cli(capsys, "plot", table, "--out", tmp_path / "figures")
    assert_user_error(code, err, table, "FIFO")
    assert not (tmp_path / "figures").exists()
