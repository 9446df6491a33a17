"""Bad inputs (issue 7): each one gets a one-line error naming the file and the fix.

Every test builds a tiny model on disk, breaks it one way, runs ``wdanalysis compare`` (or
``inspect``) through the CLI entry point and checks the message: one line, prefixed
``wdanalysis: error:``, naming the offending file, saying what is wrong and what to do,
exit status 2 and no traceback. Results already computed are never lost.
"""

from __future__ import annotations

import argparse
import json
import pickle
import struct
import warnings
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import save_file

import wdanalysis.table.comparison as analysis
from wdanalysis import compare, inspect
from wdanalysis.errors import WDAnalysisError
from wdanalysis.loaders.peft_adapter import read_adapter_config
from wdanalysis.storage.tensor_store import load_torch_state_dict, read_safetensors_header

OUT, IN = 6, 4  # non-square on purpose
LAYERS = 2


# ------------------------------------------------------------------------------ builders


def base_state(seed: int = 0, layers: int = LAYERS) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for i in range(layers):
        for name in ("q_proj", "v_proj"):
            state[f"model.layers.{i}.self_attn.{name}.weight"] = torch.randn(OUT, IN, generator=gen)
        state[f"model.layers.{i}.mlp.up_proj.weight"] = torch.randn(8, IN, generator=gen)
    return state


def save_model(folder: Path, state: dict[str, torch.Tensor]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    return folder


def tuned(state: dict[str, torch.Tensor], seed: int, scale: float = 0.05) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return {k: v + scale * torch.randn(v.shape, generator=gen) for k, v in state.items()}


def ft_run(folder: Path, base: dict, steps=(10, 20), seed: int = 1) -> Path:
    for i, step in enumerate(steps):
        save_model(folder / f"checkpoint-{step}", tuned(base, seed * 100 + i, 0.01 * (i + 1)))
    return folder


def adapter_config(**overrides) -> dict:
    config = {
        "peft_type": "LORA",
        "r": 2,
        "lora_alpha": 4,
        "target_modules": ["q_proj", "v_proj"],
        "use_dora": False,
    }
    config.update(overrides)
    return config


def save_adapter(
    folder: Path,
    modules=("model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.v_proj"),
    rank: int = 2,
    out_in: tuple[int, int] = (OUT, IN),
    dora: bool = False,
    magnitude_size: int | None = None,
    config: dict | None = None,
    prefix: str = "base_model.model.",
) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(7)
    out_f, in_f = out_in
    tensors = {}
    for module in modules:
        tensors[f"{prefix}{module}.lora_A.weight"] = torch.randn(rank, in_f, generator=gen)
        tensors[f"{prefix}{module}.lora_B.weight"] = 0.1 * torch.randn(out_f, rank, generator=gen)
        if dora:
            size = magnitude_size or out_f
            tensors[f"{prefix}{module}.lora_magnitude_vector"] = 1 + torch.rand(size, generator=gen)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    cfg = config if config is not None else adapter_config(r=rank, use_dora=dora)
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    return folder


def safetensors_bytes(header: dict, data: bytes = b"") -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


@pytest.fixture
def base(tmp_path) -> Path:
    return save_model(tmp_path / "base", base_state())


# ------------------------------------------------------------------------------ the CLI


def _main(argv: list[str]) -> int:
    """``wdanalysis.cli.main``, or the same wrapper over ``compare``/``inspect`` alone while a
    sibling sub-command (train, demo) cannot be imported."""
    from wdanalysis.cli import entry_point as cli

    try:
        parser = cli.build_parser()
    except ImportError:  # pragma: no cover - only while sibling CLIs are being written
        from wdanalysis.cli import analysis_commands as commands

        parser = argparse.ArgumentParser(prog="wdanalysis")
        commands.register(parser.add_subparsers(dest="command", required=True))
    return cli.run_handler(parser.parse_args(argv))


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = _main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def compare_cli(capsys, tmp_path, base, *runs, extra=()) -> tuple[int, str, str]:
    out = tmp_path / "out"
    return run_cli(capsys, "compare", base, *runs, "--out", out, "--no-figures", "--quiet", *extra)


def error_line(err: str) -> str:
    """The one ``wdanalysis: error:`` line on stderr (no traceback, nothing else)."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err
    errors = [line for line in lines if line.startswith("wdanalysis: error: ")]
    assert len(errors) == 1, err
    return errors[0]


def assert_user_error(code: int, err: str, path, *phrases: str) -> str:
    """Exit 2, one line naming ``path``, holding every phrase (case-insensitive)."""
    assert code == 2, err
    line = error_line(err)
    assert str(path) in line, line
    for phrase in phrases:
        assert phrase.lower() in line.lower(), f"{phrase!r} not in {line!r}"
    return line


def no_output_written(out: Path) -> bool:
    return not out.exists() or not any(out.iterdir())


# ------------------------------------------------------------------------------ paths


def test_missing_path(capsys, tmp_path, base):
    missing = tmp_path / "no-such-run"
    code, _, err = compare_cli(capsys, tmp_path, base, missing)
    assert_user_error(code, err, missing, "no such file or folder", "check the path")


def test_missing_base(capsys, tmp_path):
    missing = tmp_path / "no-such-base"
    run = save_model(tmp_path / "ft", base_state())
    code, _, err = compare_cli(capsys, tmp_path, missing, run)
    assert_user_error(code, err, missing, "no such file or folder")


def test_empty_folder(capsys, tmp_path, base):
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = compare_cli(capsys, tmp_path, base, empty)
    assert_user_error(code, err, empty, "empty", "model.safetensors")


def test_folder_without_checkpoint(capsys, tmp_path, base):
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "notes.txt").write_text("hello")
    (junk / "weights.npy").write_bytes(b"\x93NUMPY")
    code, _, err = compare_cli(capsys, tmp_path, base, junk)
    assert_user_error(code, err, junk, "no recognisable checkpoint", "checkpoint-N")


def test_partly_incomplete_run_skips_with_warning(capsys, tmp_path, base):
    run = ft_run(tmp_path / "run", base_state(), steps=(10, 20, 30, 40))
    (run / "checkpoint-20" / "model.safetensors").unlink()  # killed before writing weights
    shard = run / "checkpoint-30" / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[:-50])  # killed mid-write
    code, _, err = compare_cli(capsys, tmp_path, base, run)
    assert code == 0, err
    warning = [line for line in err.splitlines() if line.startswith("wdanalysis: warning:")]
    assert len(warning) == 1 and "Traceback" not in err
    assert "skipped 2 incomplete checkpoint(s)" in warning[0]
    assert "checkpoint-20" in warning[0] and "checkpoint-30" in warning[0]
    table = pd.read_csv(tmp_path / "out" / "deltas.csv")
    assert sorted(table["step"].unique()) == [10, 40]


def test_partly_incomplete_run_python_api(tmp_path, base):
    run = ft_run(tmp_path / "run", base_state(), steps=(5, 50, 500))
    (run / "checkpoint-50" / "model.safetensors").write_bytes(b"")
    with pytest.warns(UserWarning, match=r"skipped 1 incomplete checkpoint\(s\): checkpoint-50"):
        table = compare(base, run, progress=False)
    assert sorted(table["step"].unique()) == [5, 500]


def test_run_with_only_incomplete_checkpoints(capsys, tmp_path, base):
    run = ft_run(tmp_path / "run", base_state(), steps=(10, 20))
    for step in (10, 20):
        (run / f"checkpoint-{step}" / "model.safetensors").unlink()
    code, _, err = compare_cli(capsys, tmp_path, base, run)
    assert_user_error(code, err, run, "none of the 2 checkpoint folders is complete")


def test_trainer_temporary_folder_is_ignored(tmp_path, base):
    """A run killed mid-save leaves ``.checkpoint-N.*.tmp``: never taken for a checkpoint."""
    run = ft_run(tmp_path / "run", base_state(), steps=(10,))
    stray = run / ".checkpoint-20.x1y2.tmp"
    stray.mkdir()
    (stray / "model.safetensors").write_bytes(b"\x08\x00")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "skipped" warning either: it is not a checkpoint
        table = compare(base, run, progress=False)
    assert table["step"].unique().tolist() == [10]


# ------------------------------------------------------------------------------ safetensors


def save_sharded(folder: Path, state: dict[str, torch.Tensor], n: int = 2) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    keys = list(state)
    weight_map = {}
    for i in range(n):
        name = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        part = {k: state[k] for k in keys[i::n]}
        save_file(part, str(folder / name))
        weight_map.update(dict.fromkeys(part, name))
    index = {"metadata": {}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return folder


def test_truncated_safetensors(capsys, tmp_path, base):
    ft = save_model(tmp_path / "ft", tuned(base_state(), 1))
    weights = ft / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-7])
    code, _, err = compare_cli(capsys, tmp_path, base, ft)
    assert_user_error(code, err, weights, "truncated", "fetch the file again")


def test_file_shorter_than_a_header(capsys, tmp_path, base):
    ft = tmp_path / "ft"
    ft.mkdir()
    (ft / "model.safetensors").write_bytes(b"\x10\x00\x00")
    code, _, err = run_cli(capsys, "inspect", ft)
    assert_user_error(code, err, ft / "model.safetensors", "too short", "re-download")


def test_corrupt_safetensors_header(capsys, tmp_path, base):
    ft = tmp_path / "ft"
    ft.mkdir()
    raw = b'{"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]'  # JSON cut short
    (ft / "model.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(8))
    code, _, err = compare_cli(capsys, tmp_path, base, ft)
    assert_user_error(code, err, ft / "model.safetensors", "corrupt safetensors header", "re-")


def test_header_not_json_object(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(safetensors_bytes([1, 2, 3]))  # valid JSON, wrong type
    with pytest.raises(WDAnalysisError, match="corrupt safetensors header"):
        read_safetensors_header(path)


def test_header_longer_than_file(capsys, tmp_path, base):
    ft = tmp_path / "ft"
    ft.mkdir()
    raw = json.dumps({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).encode()
    (ft / "model.safetensors").write_bytes(struct.pack("<Q", 10_000) + raw + bytes(4))
    code, _, err = compare_cli(capsys, tmp_path, base, ft)
    assert_user_error(code, err, ft / "model.safetensors", "header claims 10000 bytes", "re-")


def test_data_size_disagrees_with_shape(capsys, tmp_path, base):
    """Offsets inside the file but spanning the wrong number of bytes for shape × dtype."""
    ft = tmp_path / "ft"
    ft.mkdir()
    header = {"w": {"dtype": "F32", "shape": [3, 2], "data_offsets": [0, 16]}}
    (ft / "model.safetensors").write_bytes(safetensors_bytes(header, bytes(16)))
    code, _, err = run_cli(capsys, "inspect", ft)
    assert_user_error(code, err, ft / "model.safetensors", "'w'", "24 bytes", "16", "re-")


def test_unknown_dtype_in_header(capsys, tmp_path):
    ft = tmp_path / "ft"
    ft.mkdir()
    header = {"w": {"dtype": "F33", "shape": [2], "data_offsets": [0, 8]}}
    (ft / "model.safetensors").write_bytes(safetensors_bytes(header, bytes(8)))
    code, _, err = run_cli(capsys, "inspect", ft)
    assert_user_error(code, err, ft / "model.safetensors", "unknown dtype 'F33'")


def test_shard_missing(capsys, tmp_path, base):
    ft = save_sharded(tmp_path / "ft", tuned(base_state(), 1), n=3)
    (ft / "model-00002-of-00003.safetensors").unlink()
    code, _, err = compare_cli(capsys, tmp_path, base, ft)
    assert_user_error(
        code,
        err,
        ft / "model.safetensors.index.json",
        "model-00002-of-00003",
        "missing",
        "download",
    )


def test_index_key_missing_from_shard(capsys, tmp_path, base):
    ft = save_sharded(tmp_path / "ft", tuned(base_state(), 1))
    index_file = ft / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    index["weight_map"]["model.layers.9.self_attn.q_proj.weight"] = (
        "model-00001-of-00002.safetensors"
    )
    index_file.write_text(json.dumps(index))
    code, _, err = compare_cli(capsys, tmp_path, base, ft)
    assert_user_error(
        code,
        err,
        index_file,
        "model.layers.9.self_attn.q_proj.weight",
        "model-00001-of-00002",
        "re-",
    )


def test_malformed_index(capsys, tmp_path, base):
    ft = save_sharded(tmp_path / "ft", tuned(base_state(), 1))
    index_file = ft / "model.safetensors.index.json"
    index_file.write_text('{"weight_map": ["a", "b"]}')
    code, _, err = compare_cli(capsys, tmp_path, base, ft)
    assert_user_error(code, err, index_file, "malformed shard index", "weight_map")


def test_duplicate_keys_across_indexed_shards(capsys, tmp_path, base):
    ft = save_sharded(tmp_path / "ft", tuned(base_state(), 1))
    key = "model.layers.0.self_attn.q_proj.weight"
    save_file({key: torch.zeros(OUT, IN)}, str(ft / "model-00002-of-00002.safetensors"))
    index_file = ft / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    index["weight_map"][key] = "model-00001-of-00002.safetensors"
    index_file.write_text(json.dumps(index))
    code, _, err = compare_cli(capsys, tmp_path, base, ft)
    assert_user_error(code, err, index_file, "duplicate key", key, "model-00002-of-00002")


def test_duplicate_keys_across_loose_shards(capsys, tmp_path, base):
    ft = tmp_path / "ft"
    ft.mkdir()
    state = tuned(base_state(), 1)
    save_file(state, str(ft / "part-a.safetensors"))
    save_file(state, str(ft / "part-b.safetensors"))
    code, _, err = compare_cli(capsys, tmp_path, base, ft)
    assert_user_error(code, err, ft, "duplicate key", "part-a.safetensors", "part-b.safetensors")


# ------------------------------------------------------------------------------ shapes, keys


def test_adapter_factors_do_not_fit_base(capsys, tmp_path, base):
    adapter = save_adapter(tmp_path / "lora", out_in=(OUT, IN + 3))
    code, _, err = compare_cli(capsys, tmp_path, base, adapter)
    assert_user_error(code, err, adapter, "does not fit the base weight", "another size")


def test_adapter_rank_disagrees_with_config(capsys, tmp_path, base):
    adapter = save_adapter(tmp_path / "lora", rank=3, config=adapter_config(r=2))
    code, _, err = compare_cli(capsys, tmp_path, base, adapter)
    assert_user_error(code, err, adapter, "rank 2", "rank 3", "adapter_config.json")


def test_dora_magnitude_does_not_fit_base(capsys, tmp_path, base):
    adapter = save_adapter(tmp_path / "dora", dora=True, magnitude_size=IN)
    code, _, err = compare_cli(capsys, tmp_path, base, adapter)
    assert_user_error(code, err, adapter, "magnitude", f"{OUT} output features", "another size")


def test_adapter_with_only_lora_a(capsys, tmp_path, base):
    adapter = save_adapter(tmp_path / "lora")
    path = adapter / "adapter_model.safetensors"
    from safetensors.torch import load_file

    tensors = {k: v for k, v in load_file(str(path)).items() if "lora_B" not in k}
    save_file(tensors, str(path))
    code, _, err = compare_cli(capsys, tmp_path, base, adapter)
    assert_user_error(code, err, adapter, "only one of lora_A/lora_B", "re-save")


def test_adapter_for_another_architecture(capsys, tmp_path, base):
    """BERT-style keys on a LLaMA-style base: a model mismatch, said as such."""
    adapter = save_adapter(
        tmp_path / "lora", modules=("bert.encoder.layer.0.attention.self.query",)
    )
    code, _, err = compare_cli(capsys, tmp_path, base, adapter)
    assert_user_error(
        code,
        err,
        adapter,
        "match no base weight",
        "'query'",
        "model mismatch",
        "q_proj",
        "pass the base model this adapter was trained on",
    )


def test_adapter_for_a_deeper_model(capsys, tmp_path, base):
    """Same names, more layers than the base: a model mismatch, with the nearest base key."""
    modules = ("model.layers.0.self_attn.q_proj", "model.layers.5.self_attn.q_proj")
    adapter = save_adapter(tmp_path / "lora", modules=modules)
    code, _, err = compare_cli(capsys, tmp_path, base, adapter)
    assert_user_error(
        code,
        err,
        adapter,
        "1 of 2 adapted modules match no base weight",
        "model.layers.5.self_attn.q_proj",
        "model mismatch",
        "trained on",
    )


def test_adapter_key_prefix_mismatch(capsys, tmp_path):
    """Keys saved relative to a sub-module fit the encoder and the decoder alike."""
    state = {}
    for stack in ("encoder", "decoder"):
        for name in ("q_proj", "v_proj"):
            state[f"model.{stack}.layers.0.self_attn.{name}.weight"] = torch.randn(OUT, IN)
    base = save_model(tmp_path / "base", state)
    adapter = save_adapter(tmp_path / "lora", modules=("layers.0.self_attn.q_proj",))
    code, _, err = compare_cli(capsys, tmp_path, base, adapter)
    assert_user_error(
        code,
        err,
        adapter,
        "prefix mismatch",
        "model.encoder.layers.0.self_attn.q_proj",
        "model.decoder.layers.0.self_attn.q_proj",
        "full module names",
    )


def test_base_and_checkpoint_of_different_models_shapes(capsys, tmp_path, base):
    other = {k: torch.randn(v.shape[0] * 2, v.shape[1]) for k, v in base_state().items()}
    ft = save_model(tmp_path / "ft", other)
    code, _, err = compare_cli(capsys, tmp_path, base, ft)
    assert_user_error(
        code, err, ft / "model.safetensors", "shape", "different models", "fine-tuned from"
    )


def test_base_and_checkpoint_of_different_models_keys(capsys, tmp_path, base):
    other = {
        f"encoder.layer.{i}.attention.self.query.weight": torch.randn(OUT, IN) for i in range(2)
    }
    ft = save_model(tmp_path / "ft", other)
    code, _, err = compare_cli(capsys, tmp_path, base, ft)
    assert_user_error(
        code, err, ft / "model.safetensors", "lacks 4 of the 4 selected weights", "fine-tuned from"
    )


def test_modules_select_nothing(capsys, tmp_path, base):
    ft = save_model(tmp_path / "ft", tuned(base_state(), 1))
    code, _, err = compare_cli(capsys, tmp_path, base, ft, extra=("--modules", "query", "key"))
    assert_user_error(
        code,
        err,
        base,
        "--modules query key selects no weight matrix",
        "q_proj",
        "v_proj",
        "up_proj",
    )


def test_base_without_attention_weights(capsys, tmp_path):
    base = save_model(tmp_path / "base", {"mlp.fc1.weight": torch.randn(OUT, IN)})
    ft = save_model(tmp_path / "ft", {"mlp.fc1.weight": torch.randn(OUT, IN)})
    code, _, err = compare_cli(capsys, tmp_path, base, ft)
    assert_user_error(code, err, base, "no attention query/value weights", "--modules", "fc1")


def test_adapter_given_as_base(capsys, tmp_path, base):
    adapter = save_adapter(tmp_path / "lora")
    code, _, err = compare_cli(capsys, tmp_path, adapter, adapter)
    assert_user_error(code, err, adapter, "base must be a full model", "pretrained model")


# ------------------------------------------------------------------------------ values


Q0 = "model.layers.0.self_attn.q_proj.weight"


def test_nan_in_base_stops_with_nothing_written(capsys, tmp_path):
    state = base_state()
    state[Q0][2, 1] = float("nan")
    base = save_model(tmp_path / "base", state)
    ft = save_model(tmp_path / "ft", tuned(base_state(), 1))
    code, _, err = compare_cli(capsys, tmp_path, base, ft)
    assert_user_error(
        code,
        err,
        base / "model.safetensors",
        "1 NaN/Inf",
        Q0,
        "re-download the base",
        "nothing was written",
    )
    assert no_output_written(tmp_path / "out")


def test_inf_in_one_checkpoint_keeps_every_other_result(capsys, tmp_path, base):
    """Run 3 of 4 breaks mid-computation: runs 1, 2 and 4 are written, complete."""
    state = base_state()
    runs = [ft_run(tmp_path / f"run{i}", state, steps=(10, 20), seed=i) for i in (1, 2, 3, 4)]
    bad = runs[2] / "checkpoint-20" / "model.safetensors"
    broken = tuned(state, 999)
    broken["model.layers.1.self_attn.v_proj.weight"][0, 0] = float("inf")  # found late
    save_file(broken, str(bad))
    code, _, err = compare_cli(capsys, tmp_path, base, *runs)
    assert code == 2
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert all(line.startswith("wdanalysis: ") for line in lines), err
    line = error_line(err)
    assert str(bad) in line and "run3 step 20" in line and "1 NaN/Inf" in line
    assert "earlier checkpoint" in line
    assert "the 1 above failed" in lines[-1] and "deltas.csv" in lines[-1]
    table = pd.read_csv(tmp_path / "out" / "deltas.csv")
    per = table.groupby(["run", "step"]).size().to_dict()
    expected = {(r, s): 4 for r in ("run1", "run2", "run4") for s in (10, 20)}
    expected[("run3", 10)] = 4
    assert per == expected  # every kept checkpoint has all 4 weights; run3 step 20 is out
    assert table[["delta_m", "delta_d"]].notna().all().all()
    assert not list((tmp_path / "out").glob(".*.tmp"))


def test_partial_result_python_api(tmp_path, base):
    state = base_state()
    good = save_model(tmp_path / "good", tuned(state, 1))
    broken = tuned(state, 2)
    broken[Q0][:] = float("nan")
    bad = save_model(tmp_path / "bad", broken)
    with pytest.raises(analysis.PartialResultError) as caught:
        compare(base, [good, bad], progress=False)
    error = caught.value
    assert "1 of 2 checkpoints failed" in str(error) and "\n" not in str(error)
    assert error.table["run"].unique().tolist() == ["good"]
    assert len(error.table) == 4
    assert [(run, step) for run, step, _ in error.failures] == [("bad", None)]


def test_nan_in_adapter(capsys, tmp_path, base):
    adapter = save_adapter(tmp_path / "lora")
    path = adapter / "adapter_model.safetensors"
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    key = next(k for k in tensors if k.endswith("lora_B.weight"))
    tensors[key][0, 0] = float("nan")
    save_file(tensors, str(path))
    code, _, err = compare_cli(capsys, tmp_path, base, adapter)
    assert_user_error(code, err, adapter, "NaN/Inf", "nothing was written")


def _zero_row_base(tmp_path) -> tuple[Path, dict]:
    state = base_state()
    state[Q0][3] = 0.0
    return save_model(tmp_path / "base", state), state


def test_zero_norm_rows_are_counted_not_nan(capsys, tmp_path):
    base, state = _zero_row_base(tmp_path)
    ft = save_model(tmp_path / "ft", tuned(state, 1))
    with pytest.warns(UserWarning, match="zero-norm vectors"):
        table = compare(base, ft, progress=False)
    counts = dict(zip(table["parameter"], table["zero_norm_vectors"], strict=True))
    assert counts[Q0] == 1 and sum(counts.values()) == 1
    assert table[["delta_m", "delta_d"]].notna().all().all()
    code, out, err = compare_cli(capsys, tmp_path, base, ft)
    assert code == 0, err
    assert "note: 1 zero-norm vectors were left out" in out
    assert "wdanalysis: warning:" in err and "zero_norm_vectors" in err


def test_all_zero_weight_warns_about_nan(tmp_path):
    state = base_state()
    state[Q0][:] = 0.0
    base = save_model(tmp_path / "base", state)
    ft_state = tuned(base_state(), 1)
    ft_state[Q0][:] = 0.0
    ft = save_model(tmp_path / "ft", ft_state)
    with pytest.warns(UserWarning, match="NaN because every vector was zero"):
        table = compare(base, ft, progress=False)
    row = table[table["parameter"] == Q0].iloc[0]
    assert row["zero_norm_vectors"] == row["n_vectors"] == OUT
    assert pd.isna(row["delta_d"])
    assert table[table["parameter"] != Q0]["delta_d"].notna().all()


def test_dora_magnitude_over_zero_base_row(tmp_path):
    """A magnitude-only DoRA module over a pruned (zero) row: counted, never NaN."""
    base, _ = _zero_row_base(tmp_path)
    folder = tmp_path / "dora"
    folder.mkdir()
    module = "base_model.model." + Q0[: -len(".weight")]
    save_file(
        {f"{module}.lora_magnitude_vector": 1 + torch.rand(OUT)},
        str(folder / "adapter_model.safetensors"),
    )
    (folder / "adapter_config.json").write_text(json.dumps(adapter_config(use_dora=True)))
    with pytest.warns(UserWarning, match="zero-norm"):
        table = compare(base, folder, progress=False)
    row = table[table["parameter"] == Q0].iloc[0]
    assert row["zero_norm_vectors"] == 1
    assert table[["delta_m", "delta_d"]].notna().all().all()


def test_integer_base_weights(capsys, tmp_path):
    state = base_state()
    state[Q0] = torch.randint(-5, 5, (OUT, IN), dtype=torch.int8)
    base = save_model(tmp_path / "base", state)
    ft = save_model(tmp_path / "ft", tuned(base_state(), 1))
    code, _, err = compare_cli(capsys, tmp_path, base, ft)
    assert_user_error(code, err, base, "int8", "not supported", "unquantized")


def test_integer_checkpoint_weights(capsys, tmp_path, base):
    state = tuned(base_state(), 1)
    state[Q0] = torch.randint(-5, 5, (OUT, IN), dtype=torch.int32)
    ft = save_model(tmp_path / "ft", state)
    code, _, err = compare_cli(capsys, tmp_path, base, ft)
    assert_user_error(code, err, ft / "model.safetensors", "int32", "not supported")


def test_integer_adapter_weights(capsys, tmp_path, base):
    adapter = save_adapter(tmp_path / "lora")
    path = adapter / "adapter_model.safetensors"
    from safetensors.torch import load_file

    tensors = {k: (v * 10).to(torch.int8) for k, v in load_file(str(path)).items()}
    save_file(tensors, str(path))
    code, _, err = compare_cli(capsys, tmp_path, base, adapter)
    assert_user_error(code, err, adapter, "int8", "not supported", "fp32/fp16/bf16")


def test_bitsandbytes_4bit_base(capsys, tmp_path):
    state = {k: v for k, v in base_state().items()}
    for key in [k for k in state if "self_attn" in k]:
        state[key] = torch.randint(0, 255, (OUT * IN // 2, 1), dtype=torch.uint8)
        state[key + ".absmax"] = torch.rand(1)
        state[key + ".quant_map"] = torch.rand(16)
        state[key + ".quant_state.bitsandbytes__nf4"] = torch.zeros(8, dtype=torch.uint8)
    base = save_model(tmp_path / "base", state)
    ft = save_model(tmp_path / "ft", tuned(base_state(), 1))
    code, _, err = compare_cli(capsys, tmp_path, base, ft)
    assert_user_error(
        code, err, base / "model.safetensors", "bitsandbytes 4-bit", "not supported", "unquantized"
    )


def test_gptq_checkpoint(capsys, tmp_path, base):
    state = {}
    for i in range(LAYERS):
        for name in ("q_proj", "v_proj"):
            prefix = f"model.layers.{i}.self_attn.{name}"
            state[f"{prefix}.qweight"] = torch.zeros(IN // 8 + 1, OUT, dtype=torch.int32)
            state[f"{prefix}.qzeros"] = torch.zeros(1, 1, dtype=torch.int32)
            state[f"{prefix}.scales"] = torch.ones(1, OUT, dtype=torch.float16)
    ft = save_model(tmp_path / "ft", state)
    code, _, err = compare_cli(capsys, tmp_path, base, ft)
    assert_user_error(code, err, ft / "model.safetensors", "GPTQ/AWQ", "not supported")


def test_fp8_checkpoint_without_scale(capsys, tmp_path, base):
    """FP8 with its scales is read (tests/test_fp8.py); without a scale it is refused."""
    state = tuned(base_state(), 1)
    for key in [k for k in state if "self_attn" in k]:
        state[key] = state[key].to(torch.float8_e4m3fn)
    ft = save_model(tmp_path / "ft", state)
    code, _, err = compare_cli(capsys, tmp_path, base, ft)
    assert_user_error(code, err, ft / "model.safetensors", "F8_E4M3", "has no scale")


# ------------------------------------------------------------------------------ configs


@pytest.mark.parametrize(
    ("text", "phrases"),
    [
        ('{"peft_type": "LORA", "r": 8,', ("malformed adapter_config.json", "fix the JSON")),
        ("[1, 2]", ("not a JSON object", "re-save")),
        # (IA3 and PEFT's other tuners are read: tests/test_peft_tuners.py)
        (json.dumps(adapter_config(peft_type="FANCY")), ("unsupported peft_type 'FANCY'", "LoRA")),
        (json.dumps(adapter_config(peft_type=None)), ("unsupported peft_type None",)),
        (json.dumps(adapter_config(r=0)), ("r must be a positive integer, got 0", "rank")),
        (json.dumps(adapter_config(r=-4)), ("got -4",)),
        (json.dumps(adapter_config(r="8")), ("got '8'",)),
        (json.dumps({"peft_type": "LORA", "r": 8}), ("lora_alpha is missing", "alpha/r")),
        (json.dumps(adapter_config(lora_alpha="16")), ("lora_alpha", "not a number")),
        (json.dumps(adapter_config(rank_pattern={"q_proj": "four"})), ("rank_pattern", "'four'")),
        (json.dumps(adapter_config(rank_pattern=[1, 2])), ("rank_pattern", "object")),
        (json.dumps(adapter_config(alpha_pattern={"q_proj": None})), ("alpha_pattern",)),
        (json.dumps(adapter_config(alpha_pattern={"q_(proj": 8})), ("alpha_pattern", "regular")),
        (json.dumps(adapter_config(Wdecompose_target_modules=7)), ("Wdecompose",)),
        (json.dumps(adapter_config(Wdecompose_target_modules=["q", 1])), ("Wdecompose",)),
    ],
)
def test_bad_adapter_config(capsys, tmp_path, base, text, phrases):
    adapter = save_adapter(tmp_path / "lora")
    config = adapter / "adapter_config.json"
    config.write_text(text)
    code, _, err = compare_cli(capsys, tmp_path, base, adapter)
    assert_user_error(code, err, config, *phrases)


def test_dora_authors_regex_string_for_magnitude_only_modules(tmp_path):
    config = tmp_path / "adapter_config.json"
    config.write_text(json.dumps(adapter_config(Wdecompose_target_modules=".*v_proj")))
    assert read_adapter_config(config).magnitude_only_modules == [".*v_proj"]


def test_adapter_config_unreadable_encoding(tmp_path):
    config = tmp_path / "adapter_config.json"
    config.write_bytes(b'{"r": 8, "lora_alpha": 16, "peft_type": "\xff\xfe"}')
    with pytest.raises(WDAnalysisError, match="malformed adapter_config.json"):
        read_adapter_config(config)


def test_adapter_weights_without_config(capsys, tmp_path, base):
    adapter = save_adapter(tmp_path / "lora")
    (adapter / "adapter_config.json").unlink()
    code, _, err = compare_cli(capsys, tmp_path, base, adapter)
    assert_user_error(code, err, adapter, "without adapter_config.json", "copy the config")


def test_adapter_config_without_weights(capsys, tmp_path, base):
    adapter = save_adapter(tmp_path / "lora")
    (adapter / "adapter_model.safetensors").unlink()
    code, _, err = compare_cli(capsys, tmp_path, base, adapter)
    assert_user_error(code, err, adapter, "no adapter_model.safetensors", "copy")


# ------------------------------------------------------------------------------ security


class _WritesAFile:
    """Unpickling this calls ``open(marker, "w")``: a file appears iff the pickle ran code."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _malicious_files(tmp_path: Path, marker: Path) -> dict[str, Path]:
    payload = {
        "model.layers.0.self_attn.q_proj.weight": torch.zeros(OUT, IN),
        "evil": _WritesAFile(marker),
    }
    files = {}
    for kind in ("zip", "legacy", "raw"):
        folder = tmp_path / kind
        folder.mkdir()
        path = files[kind] = folder / "pytorch_model.bin"
        if kind == "zip":
            torch.save(payload, path)
        elif kind == "legacy":
            torch.save(payload, path, _use_new_zipfile_serialization=False)
        else:
            path.write_bytes(pickle.dumps(payload))
    return files


def test_crafted_pickle_would_run_code(tmp_path):
    """The control: loading the crafted pickle without ``weights_only`` does write a file."""
    marker = tmp_path / "pwned"
    files = _malicious_files(tmp_path, marker)
    torch.load(files["zip"], weights_only=False)
    assert marker.exists()


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("kind", ["zip", "legacy", "raw"])
def test_malicious_pickle_is_refused(capsys, tmp_path, base, kind):
    marker = tmp_path / "pwned"
    path = _malicious_files(tmp_path, marker)[kind]
    with pytest.raises(WDAnalysisError) as caught:
        load_torch_state_dict(path)
    assert not marker.exists()
    assert str(path) in str(caught.value) and "\n" not in str(caught.value)
    code, _, err = compare_cli(capsys, tmp_path, base, path.parent)
    assert code == 2 and not marker.exists()
    line = error_line(err)
    assert str(path) in line
    if kind != "raw":  # a bare pickle is not a torch file at all: "corrupt" is right too
        assert "refusing to load" in line and "safetensors" in line
    code, _, err = run_cli(capsys, "inspect", path)
    assert code == 2 and not marker.exists() and str(path) in error_line(err)


def test_plain_bin_state_dict_still_loads(tmp_path, base):
    """``weights_only=True`` refuses code, not ordinary checkpoints."""
    ft = tmp_path / "ft"
    ft.mkdir()
    torch.save(tuned(base_state(), 1), ft / "pytorch_model.bin")
    table = compare(base, ft, progress=False)
    assert len(table) == 2 * LAYERS and table["delta_d"].gt(0).all()


def test_truncated_bin(capsys, tmp_path, base):
    ft = tmp_path / "ft"
    ft.mkdir()
    path = ft / "pytorch_model.bin"
    torch.save(tuned(base_state(), 1), path)
    path.write_bytes(path.read_bytes()[:200])
    code, _, err = compare_cli(capsys, tmp_path, base, ft)
    assert_user_error(code, err, path, "corrupt, truncated", "re-download")


def test_bin_that_is_not_a_state_dict(capsys, tmp_path, base):
    ft = tmp_path / "ft"
    ft.mkdir()
    torch.save([torch.zeros(2)], ft / "pytorch_model.bin")
    code, _, err = compare_cli(capsys, tmp_path, base, ft)
    assert_user_error(code, err, ft / "pytorch_model.bin", "expected a state dict", "list")


# ------------------------------------------------------------------------------ nothing lost


def _interrupt_after(calls: int, original):
    count = {"n": 0}

    def wrapper(*args, **kwargs):
        count["n"] += 1
        if count["n"] > calls:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    return wrapper, count


def test_ctrl_c_during_compare(capsys, tmp_path, base, monkeypatch):
    runs = [ft_run(tmp_path / f"run{i}", base_state(), seed=i) for i in (1, 2)]
    wrapper, count = _interrupt_after(5, analysis._row)  # called once per (weight, checkpoint)
    monkeypatch.setattr(analysis, "_row", wrapper)
    code, _, err = run_cli(capsys, "compare", base, *runs, "--out", tmp_path / "out", "--quiet")
    assert code == 130 and count["n"] == 6
    assert "Traceback" not in err
    assert err.strip() == f"wdanalysis: interrupted; {tmp_path / 'out'}: nothing was written"
    assert no_output_written(tmp_path / "out")


def test_ctrl_c_while_writing_the_table(capsys, tmp_path, base, monkeypatch):
    """Interrupted half-way through the CSV: no deltas.csv, no temporary left behind."""
    ft = save_model(tmp_path / "ft", tuned(base_state(), 1))
    out = tmp_path / "out"
    out.mkdir()
    original = pd.DataFrame.to_csv

    def half_then_interrupt(self, path, *args, **kwargs):
        original(self.iloc[: len(self) // 2], path, *args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(pd.DataFrame, "to_csv", half_then_interrupt)
    code, _, err = compare_cli(capsys, tmp_path, base, ft)
    assert code == 130 and "interrupted" in err
    assert list(out.iterdir()) == []


def test_failed_compare_keeps_the_previous_table(capsys, tmp_path, base):
    ft = save_model(tmp_path / "ft", tuned(base_state(), 1))
    code, _, err = compare_cli(capsys, tmp_path, base, ft)
    assert code == 0, err
    table = tmp_path / "out" / "deltas.csv"
    before = table.read_bytes()
    weights = ft / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-3])
    code, _, err = compare_cli(capsys, tmp_path, base, ft)
    assert_user_error(code, err, weights, "truncated", "nothing was written")
    assert table.read_bytes() == before
    assert sorted(p.name for p in table.parent.iterdir()) == ["deltas.csv", "run.json"]


def test_unwritable_output_folder(capsys, tmp_path, base):
    ft = save_model(tmp_path / "ft", tuned(base_state(), 1))
    blocker = tmp_path / "out"
    blocker.write_text("a file where the output folder should go")
    code, _, err = compare_cli(capsys, tmp_path, base, ft)
    assert_user_error(code, err, blocker, "--out is a file", "choose another --out")


def test_interrupted_training_save_leaves_no_complete_looking_checkpoint(tmp_path, base):
    """``wdanalysis.train`` fills ``checkpoint-N`` in a hidden temporary folder and renames
    it whole: Ctrl-C mid-save leaves neither ``checkpoint-N`` nor a temporary."""
    ckpt = pytest.importorskip("wdanalysis.train.checkpoint")
    run = ft_run(tmp_path / "run", base_state(), steps=(10,))
    state = tuned(base_state(), 5)

    def fill(folder: Path) -> None:
        save_file(state, str(folder / "model.safetensors"))
        raise KeyboardInterrupt  # before trainer_state.json

    with pytest.raises(KeyboardInterrupt):
        ckpt.write_checkpoint(run, 20, fill)
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint-10"]
    table = compare(base, run, progress=False)
    assert table["step"].unique().tolist() == [10]


def test_killed_training_save_is_never_analysed(tmp_path, base):
    """SIGKILL cannot clean up: the stray temporary is ignored and removed on restart."""
    ckpt = pytest.importorskip("wdanalysis.train.checkpoint")
    run = ft_run(tmp_path / "run", base_state(), steps=(10,))
    stray = run / ".checkpoint-20.abc123.tmp"
    save_model(stray, tuned(base_state(), 5))
    assert [step for step, _ in ckpt.list_checkpoints(run)] == []  # no trainer_state.json
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        table = compare(base, run, progress=False)
    assert table["step"].unique().tolist() == [10]
    ckpt.remove_stale_temporaries(run)
    assert not stray.exists()


# ------------------------------------------------------------------------------ fuzz findings


@pytest.mark.parametrize("blob", [b"\x80", b"\x85", b"\x80\x02K\x01.", b"PK\x03\x04garbage"])
def test_garbage_bin_bytes(tmp_path, blob):
    """Found by the fuzzer: torch's weights-only unpickler raised IndexError/KeyError/…"""
    path = tmp_path / "pytorch_model.bin"
    path.write_bytes(blob)
    with pytest.raises(WDAnalysisError) as caught:
        load_torch_state_dict(path)
    assert str(path) in str(caught.value) and "re-download" in str(caught.value)


@pytest.mark.parametrize(
    ("weight_map", "phrase"),
    [
        ({}, "lists no weights"),
        ({"a.weight": None}, "gives None"),
        ({"a.weight": ["x"]}, "gives ['x']"),
        ({"a.weight": "/etc/hostname"}, "not the file name of a shard"),
        ({"a.weight": "../model.safetensors"}, "not the file name of a shard"),
    ],
)
def test_bad_shard_index_values(tmp_path, weight_map, phrase):
    """Found by the fuzzer: non-string shard names crashed; paths escaped the folder."""
    ft = save_sharded(tmp_path / "ft", tuned(base_state(), 1))
    index_file = ft / "model.safetensors.index.json"
    index_file.write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(WDAnalysisError) as caught:
        inspect(ft)
    assert str(index_file) in str(caught.value) and phrase in str(caught.value)
