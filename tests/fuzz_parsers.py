"""Fuzz the parsers of untrusted input with hypothesis.

Targets: safetensors headers and tensor reads, shard indexes, ``adapter_config.json`` and
``torch.save`` (``.bin``) files. Each input is built three ways (structured from the
format's fields, a valid file mutated, raw bytes). An input must either parse (and then
every tensor it lists must read back) or raise :class:`WDAnalysisError` with a one-line
message naming the file; any other exception, or a multi-line message, is a crash.
Safetensors inputs are also checked against the safetensors library itself
(``tests/safetensors_oracle.py``): accepted exactly when it accepts, with the same values.

    python tests/fuzz_parsers.py --seconds 300          # about 5 minutes over all targets
    python tests/fuzz_parsers.py --seconds 60 --target safetensors_structured

``tests/test_robustness_fuzz.py`` runs the same targets briefly in the normal test suite.
"""

from __future__ import annotations

import argparse
import atexit
import io
import json
import math
import shutil
import struct
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save as save_safetensors
from safetensors_oracle import check_against_library

from wdanalysis.errors import WDAnalysisError
from wdanalysis.loaders.peft_adapter import group_adapter_keys, read_adapter_config
from wdanalysis.storage.safetensors_refusal import DTYPE_BITS
from wdanalysis.storage.tensor_store import (
    load_torch_state_dict,
    open_sharded,
    read_safetensors_header,
)

WORKDIR = Path(tempfile.mkdtemp(prefix="wdanalysis-fuzz-"))
atexit.register(shutil.rmtree, WORKDIR, True)
STATS: dict[str, dict[str, int]] = {}


def _count(target: str, outcome: str) -> None:
    STATS.setdefault(target, {}).setdefault(outcome, 0)
    STATS[target][outcome] += 1


def expect_clean(target: str, path: Path, action: Callable[[], object]) -> object | None:
    """Run ``action``: success or a one-line ``WDAnalysisError`` naming ``path``."""
    try:
        result = action()
    except WDAnalysisError as error:
        text = str(error)
        assert "\n" not in text, f"multi-line message: {text!r}"
        assert str(path) in text or path.name in text, f"message does not name the file: {text}"
        _count(target, "clear error")
        return None
    _count(target, "parsed")
    return result


# ----------------------------------------------------------------------- value strategies

json_scalars = st.none() | st.booleans() | st.integers(-(2**66), 2**66) | st.text(max_size=12)
json_scalars |= st.floats(allow_nan=True, allow_infinity=True)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
small_ints = st.integers(-3, 40)
dtype_names = st.sampled_from(sorted(DTYPE_BITS)) | st.sampled_from(["F33", "f32", "", "I4"])


def _dump_json(value) -> bytes:
    return json.dumps(value, allow_nan=True).encode()


# --------------------------------------------------------------------------- safetensors


@st.composite
def safetensors_structured(draw) -> bytes:
    """A header built field by field: mostly plausible, sometimes wrong in one place."""
    n = draw(st.integers(0, 4))
    header: dict = {}
    offset = 0
    for i in range(n):
        dtype = draw(dtype_names)
        shape = draw(st.lists(st.integers(0, 5), max_size=3))
        bits = DTYPE_BITS.get(dtype, 32)
        nbytes = math.prod(shape) * bits // 8
        begin = draw(st.sampled_from([offset, offset, offset, max(offset - 1, 0), offset + 1]))
        end = begin + draw(
            st.sampled_from([nbytes, nbytes, nbytes, nbytes + 1, max(nbytes - 1, 0)])
        )
        entry = {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}
        if draw(st.integers(0, 9)) == 0:  # one field replaced by anything JSON
            entry[draw(st.sampled_from(sorted(entry)))] = draw(json_values)
        if draw(st.integers(0, 19)) == 0:
            entry = draw(json_values)
        header[draw(st.text(min_size=1, max_size=6)) + str(i)] = entry
        offset = max(end, offset)
    if draw(st.booleans()):
        header["__metadata__"] = draw(
            st.dictionaries(st.text(max_size=4), st.text(max_size=4), max_size=2) | json_values
        )
    raw = _dump_json(header)
    raw += b" " * draw(st.integers(0, 8))  # safetensors pads headers with spaces
    data_len = offset + draw(st.sampled_from([0, 0, 0, -1, 1, -4, 7]))
    data = draw(st.binary(min_size=max(data_len, 0), max_size=max(data_len, 0)))
    length = len(raw) + draw(st.sampled_from([0, 0, 0, 0, -1, 1, 2**40, 2**64 - 1 - len(raw)]))
    return struct.pack("<Q", length) + raw + data


@st.composite
def safetensors_mutated(draw) -> bytes:
    """A valid file from random small tensors, then truncated, patched or extended."""
    tensors = {}
    for i in range(draw(st.integers(1, 3))):
        dtype = draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16, torch.int8]))
        shape = draw(st.lists(st.integers(0, 4), min_size=1, max_size=2))
        tensors[f"t{i}.weight"] = torch.zeros(shape, dtype=dtype)
    blob = bytearray(save_safetensors(tensors))
    (header_len,) = struct.unpack("<Q", blob[:8])
    for _ in range(draw(st.integers(0, 3))):
        kind = draw(st.sampled_from(["truncate", "flip", "data", "insert", "length", "append"]))
        position = draw(st.integers(0, max(len(blob) - 1, 0)))
        if kind == "truncate":
            del blob[position:]
        elif kind == "flip" and blob:
            blob[position] ^= 1 << draw(st.integers(0, 7))
        elif kind == "data" and len(blob) > 8 + header_len:  # tensor bytes: still valid
            blob[draw(st.integers(8 + header_len, len(blob) - 1))] ^= 0xFF
        elif kind == "insert":
            blob[position:position] = draw(st.binary(min_size=1, max_size=4))
        elif kind == "length" and len(blob) >= 8:
            blob[0:8] = struct.pack("<Q", draw(st.integers(0, 2**64 - 1)))
        elif kind == "append":
            blob += draw(st.binary(min_size=1, max_size=8))
    return bytes(blob)


def check_safetensors(target: str, blob: bytes) -> None:
    path = WORKDIR / "model.safetensors"
    path.write_bytes(blob)
    # Differential: accepted iff the safetensors library accepts it, with the same values.
    outcome = check_against_library(path)
    _count(target, "clear error" if outcome == "refused" else "parsed")
    expect_clean(target + " (header)", path, lambda: read_safetensors_header(path))


# --------------------------------------------------------------------------- shard index


@st.composite
def shard_indexes(draw):
    names = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    keys = ["a.weight", "b.weight", "c.weight"]
    values = (
        st.sampled_from(
            names
            + [
                "missing.safetensors",
                "../model-00001-of-00002.safetensors",
                "/etc/hostname",
                "",
                "sub/x.safetensors",
            ]
        )
        | json_values
    )
    weight_map = draw(
        st.dictionaries(st.sampled_from(keys) | st.text(max_size=5), values, max_size=4)
    )
    index = draw(
        st.sampled_from(
            [{"weight_map": weight_map}, {"weight_map": weight_map, "metadata": {"total_size": 1}}]
        )
        | json_values
    )
    return index


def _write_shards(folder: Path) -> None:
    (folder / "model-00001-of-00002.safetensors").write_bytes(
        save_safetensors({"a.weight": torch.zeros(2), "b.weight": torch.ones(3)})
    )
    (folder / "model-00002-of-00002.safetensors").write_bytes(
        save_safetensors({"c.weight": torch.zeros(2), "a.weight": torch.zeros(1)})
    )


def check_index(target: str, index) -> None:
    folder = WORKDIR / "sharded" / "model"
    if not folder.is_dir():
        folder.mkdir(parents=True)
        _write_shards(folder)
    path = folder / "model.safetensors.index.json"
    path.write_bytes(_dump_json(index))
    store = expect_clean(target, path, lambda: open_sharded(path))
    if store is not None:
        for key in store.keys():
            expect_clean(target + " (read)", path, lambda key=key: store.get(key))


# --------------------------------------------------------------------------- adapter config

_PLAUSIBLE = {
    "peft_type": st.sampled_from(["LORA", "lora", "DORA", "IA3", "ADALORA"]) | json_values,
    "r": st.sampled_from([1, 4, 8]) | small_ints | json_values,
    "lora_alpha": st.sampled_from([8, 16.0, 0.5]) | json_values,
    "use_rslora": st.booleans() | json_values,
    "use_dora": st.booleans() | json_values,
    "fan_in_fan_out": st.booleans() | json_values,
    "rank_pattern": st.dictionaries(
        st.sampled_from(["q_proj", "layers\\.0\\..*", "(", "[a-"]),
        small_ints | json_values,
        max_size=2,
    )
    | json_values,
    "alpha_pattern": st.dictionaries(
        st.sampled_from(["v_proj", "q", ")", "*"]), small_ints | json_values, max_size=2
    )
    | json_values,
    "target_modules": st.lists(st.text(max_size=6), max_size=3) | json_values,
    "Wdecompose_target_modules": st.lists(st.text(max_size=6), max_size=2) | json_values,
}


@st.composite
def adapter_configs(draw) -> bytes:
    kind = draw(st.sampled_from(["fields", "fields", "fields", "json", "bytes"]))
    if kind == "bytes":
        return draw(st.binary(max_size=64))
    if kind == "json":
        return _dump_json(draw(json_values))
    fields = draw(st.lists(st.sampled_from(sorted(_PLAUSIBLE)), unique=True, max_size=10))
    config = {name: draw(_PLAUSIBLE[name]) for name in fields}
    raw = _dump_json(config)
    if draw(st.integers(0, 9)) == 0:
        raw = raw[: draw(st.integers(0, len(raw)))]
    return raw


def check_adapter_config(target: str, raw: bytes) -> None:
    path = WORKDIR / "adapter" / "adapter_config.json"
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(raw)
    config = expect_clean(target, path, lambda: read_adapter_config(path))
    if config is None:
        return
    for module in ("model.layers.0.self_attn.q_proj", "v_proj", "decoder.q"):
        # a parsed config must give a scaling for any module, or a clear error
        result = expect_clean(
            target + " (scaling)", path, lambda m=module: config.rank_and_scaling(m, config.r, path)
        )
        if result is not None:
            rank, scale = result
            assert rank > 0 and math.isfinite(scale), (rank, scale)


adapter_keys = st.lists(
    st.sampled_from(["base_model.model.", "", "model."]).flatmap(
        lambda p: st.builds(
            lambda s, suffix: p + s + suffix,
            st.text(max_size=10),
            st.sampled_from(
                [
                    ".lora_A.weight",
                    ".lora_B.weight",
                    ".lora_magnitude_vector",
                    ".weight_m",
                    ".weight",
                    "",
                    ".lora_embedding_A",
                    ".lora_embedding_B",
                    ".lora_E",  # AdaLoRA: not a LoRA/DoRA factor, refused
                ]
            ),
        )
    ),
    max_size=6,
)


def check_adapter_keys(target: str, keys: list[str]) -> None:
    path = WORKDIR / "adapter"
    expect_clean(target, path, lambda: group_adapter_keys(keys, path))


# --------------------------------------------------------------------------- .bin files


def _torch_bytes(state, legacy: bool) -> bytes:
    buffer = io.BytesIO()
    torch.save(state, buffer, _use_new_zipfile_serialization=not legacy)
    return buffer.getvalue()


@st.composite
def bin_files(draw) -> bytes:
    kind = draw(st.sampled_from(["zip", "legacy", "bytes"]))
    if kind == "bytes":
        return draw(st.binary(max_size=256))
    state = {f"w{i}": torch.zeros(draw(st.integers(0, 6))) for i in range(draw(st.integers(1, 3)))}
    blob = bytearray(_torch_bytes(state, legacy=kind == "legacy"))
    for _ in range(draw(st.integers(1, 3))):
        position = draw(st.integers(0, max(len(blob) - 1, 0)))
        action = draw(st.sampled_from(["truncate", "flip", "flip", "insert"]))
        if action == "truncate":
            del blob[position:]
        elif action == "flip" and blob:
            blob[position] ^= 1 << draw(st.integers(0, 7))
        else:
            blob[position:position] = draw(st.binary(min_size=1, max_size=4))
    return bytes(blob)


def check_bin(target: str, blob: bytes) -> None:
    path = WORKDIR / "pytorch_model.bin"
    path.write_bytes(blob)
    state = expect_clean(target, path, lambda: load_torch_state_dict(path))
    if state is not None:
        assert all(isinstance(v, torch.Tensor) for v in state.values())


# --------------------------------------------------------------------------- the targets

TARGETS: dict[str, tuple[st.SearchStrategy, Callable]] = {
    "safetensors_structured": (safetensors_structured(), check_safetensors),
    "safetensors_mutated": (safetensors_mutated(), check_safetensors),
    "safetensors_bytes": (st.binary(max_size=96), check_safetensors),
    "shard_index": (shard_indexes(), check_index),
    "adapter_config": (adapter_configs(), check_adapter_config),
    "adapter_keys": (adapter_keys, check_adapter_keys),
    "bin_file": (bin_files(), check_bin),
}


def run_target(name: str, max_examples: int, seed: int | None = None) -> None:
    """Run one target for ``max_examples`` inputs; a crash raises (hypothesis shrinks it)."""
    strategy, check = TARGETS[name]

    @settings(
        max_examples=max_examples,
        deadline=None,
        database=None,
        derandomize=seed is None,
        suppress_health_check=list(HealthCheck),
        print_blob=True,
    )
    @given(strategy)
    def fuzz(value) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's pickle-protocol notices
            check(name, value)

    if seed is not None:
        fuzz = __import__("hypothesis").seed(seed)(fuzz)
    fuzz()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=180, help="total time over all targets")
    parser.add_argument("--target", choices=sorted(TARGETS), action="append")
    parser.add_argument("--batch", type=int, default=200, help="examples per hypothesis run")
    args = parser.parse_args(argv)
    targets = args.target or list(TARGETS)
    deadline = time.monotonic() + args.seconds
    crashes: list[str] = []
    seed = 0
    print(f"fuzzing {', '.join(targets)} for {args.seconds:g} s (files in {WORKDIR})")
    while time.monotonic() < deadline:
        for name in targets:
            if time.monotonic() >= deadline:
                break
            seed += 1
            try:
                run_target(name, args.batch, seed=seed)
            except Exception:  # noqa: BLE001 - a crash: report it and keep fuzzing
                report = f"[{name}, seed {seed}]\n{traceback.format_exc()}"
                print(report, file=sys.stderr)
                crashes.append(report)
    total = sum(sum(STATS.get(name, {}).values()) for name in targets)
    for target, counts in sorted(STATS.items()):
        print(f"{target:<32} " + ", ".join(f"{k}: {v}" for k, v in sorted(counts.items())))
    print(f"{total} inputs in {args.seconds:g} s; {len(crashes)} crash(es)")
    return 1 if crashes else 0


if __name__ == "__main__":
    sys.exit(main())
