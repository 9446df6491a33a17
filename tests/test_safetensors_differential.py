"""Safetensors headers: we accept exactly what the safetensors library accepts.

A corpus of hand-made files (valid and invalid in one place each) is checked against the
library with :func:`safetensors_oracle.check_against_library`: the library's ``safe_open``
and ``load_file`` decide, we must agree (same keys, shapes, dtypes and bytes, or a one-line
``WDAnalysisError`` naming the file). The hypothesis fuzz targets run the same check on
random files (``tests/test_robustness_fuzz.py``).
"""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import load_file
from safetensors_oracle import check_against_library, library_verdict, same_tensor

from wdanalysis.errors import WDAnalysisError
from wdanalysis.storage.tensor_store import open_tensor_file

W = b'"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}'
DATA8 = struct.pack("<2f", 1.5, -2.25)


def entry(dtype: str, shape, begin: int, end: int) -> dict:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


def blob(raw: bytes | dict, data: bytes = b"", length: int | None = None) -> bytes:
    if isinstance(raw, dict):
        raw = json.dumps(raw).encode()
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


def raw_header(body: bytes) -> bytes:
    return b"{" + body + b"}"


CORPUS: dict[str, bytes] = {
    # --- metadata
    "metadata null (mlx)": blob(raw_header(b'"__metadata__":null,' + W), DATA8),
    "metadata strings": blob(raw_header(b'"__metadata__":{"format":"pt"},' + W), DATA8),
    "metadata empty": blob(raw_header(b'"__metadata__":{},' + W), DATA8),
    "metadata int value": blob(raw_header(b'"__metadata__":{"a":1},' + W), DATA8),
    "metadata null value": blob(raw_header(b'"__metadata__":{"a":null},' + W), DATA8),
    "metadata nested": blob(raw_header(b'"__metadata__":{"a":{"b":"c"}},' + W), DATA8),
    "metadata list": blob(raw_header(b'"__metadata__":[],' + W), DATA8),
    "metadata string": blob(raw_header(b'"__metadata__":"x",' + W), DATA8),
    "metadata twice": blob(raw_header(b'"__metadata__":{},"__metadata__":{},' + W), DATA8),
    "metadata only": blob({"__metadata__": {"a": "b"}}),
    "metadata looks like a tensor": blob(
        {"__metadata__": {"dtype": "F32"}, "w": entry("F32", [2], 0, 8)}, DATA8
    ),
    # --- whitespace and encoding
    "trailing spaces (alignment padding)": blob(raw_header(W) + b"       ", DATA8),
    "trailing newline": blob(raw_header(W) + b"\n", DATA8),
    "leading space": blob(b" " + raw_header(W), DATA8),
    "trailing NUL padding": blob(raw_header(W) + b"\x00\x00", DATA8),
    "trailing junk": blob(raw_header(W) + b"x", DATA8),
    "UTF-8 BOM": blob(b"\xef\xbb\xbf" + raw_header(W), DATA8),
    "non-UTF-8 key": blob(b'{"\xff":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}', DATA8),
    "non-UTF-8 padding": blob(raw_header(W) + b"\xff", DATA8),
    "escaped key": blob(b'{"w\\u00e9":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}', DATA8),
    "unicode key": blob({"gewicht.\u00fc": entry("F32", [2], 0, 8)}, DATA8),
    "empty key": blob({"": entry("F32", [2], 0, 8)}, DATA8),
    "NaN literal in offsets": blob(
        b'{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,NaN]}}', DATA8
    ),
    "not JSON": blob(b"{'w': 1}", DATA8),
    "JSON cut short": blob(b'{"w":{"dtype":"F32"', DATA8),
    "JSON array": blob(b"[1,2]"),
    "JSON string": blob(b'"w"'),
    # --- keys
    "duplicate key, same entry": blob(raw_header(W + b"," + W), DATA8),
    "duplicate key, last shorter": blob(
        raw_header(W + b',"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}'), DATA8
    ),
    "duplicate key, last covers": blob(
        raw_header(b'"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},' + W), DATA8
    ),
    # --- offsets
    "out of order": blob({"b": entry("F32", [1], 4, 8), "a": entry("F32", [1], 0, 4)}, DATA8),
    "overlapping": blob({"b": entry("F32", [1], 0, 4), "a": entry("F32", [2], 0, 8)}, DATA8),
    "gap before": blob({"w": entry("F32", [2], 4, 12)}, bytes(12)),
    "gap between": blob({"a": entry("F32", [1], 0, 4), "b": entry("F32", [1], 8, 12)}, bytes(12)),
    "reversed offsets": blob({"w": entry("F32", [0], 8, 0)}, bytes(8)),
    "past the end": blob({"w": entry("F32", [4], 0, 16)}, DATA8),
    "bytes after the last tensor": blob({"w": entry("F32", [2], 0, 8)}, DATA8 + bytes(4)),
    "three offsets": blob(b'{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8,8]}}', DATA8),
    "negative offset": blob({"w": entry("F32", [2], -8, 0)}, DATA8),
    "float offset": blob(b'{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8.0]}}', DATA8),
    "offset beyond u64": blob({"w": entry("F32", [2], 0, 2**64 + 8)}, DATA8),
    # --- shapes and sizes
    "0-d tensor": blob({"w": entry("F32", [], 0, 4)}, struct.pack("<f", 3.5)),
    "empty tensor": blob({"w": entry("F32", [0, 3], 0, 0)}),
    "two empty tensors at one offset": blob(
        {"w": entry("F32", [0], 0, 0), "v": entry("BF16", [4, 0], 0, 0)}
    ),
    "empty and full": blob({"e": entry("F16", [0], 0, 0), "w": entry("F32", [2], 0, 8)}, DATA8),
    "no tensors": blob(b"{}"),
    "no tensors but data": blob(b"{}", bytes(4)),
    "shape too small for bytes": blob({"w": entry("F32", [3, 2], 0, 16)}, bytes(16)),
    "shape too large for bytes": blob({"w": entry("F32", [1], 0, 8)}, DATA8),
    "negative dim": blob({"w": entry("F32", [-2], 0, 8)}, DATA8),
    "float dim": blob(b'{"w":{"dtype":"F32","shape":[2.0],"data_offsets":[0,8]}}', DATA8),
    "bool dim": blob(b'{"w":{"dtype":"F32","shape":[true],"data_offsets":[0,4]}}', bytes(4)),
    "shape overflows": blob({"w": entry("F32", [2**32, 2**32], 0, 0)}),
    "missing shape": blob(b'{"w":{"dtype":"F32","data_offsets":[0,8]}}', DATA8),
    "missing dtype": blob(b'{"w":{"shape":[2],"data_offsets":[0,8]}}', DATA8),
    "extra field in entry": blob(
        b'{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8],"x":[1]}}', DATA8
    ),
    "entry is a list": blob(b'{"w":[1,2]}', DATA8),
    "entry is null": blob(b'{"w":null}', DATA8),
    # --- dtypes
    "unknown dtype": blob({"w": entry("F33", [2], 0, 8)}, DATA8),
    "lower-case dtype": blob({"w": entry("f32", [2], 0, 8)}, DATA8),
    "BF16": blob({"w": entry("BF16", [2, 2], 0, 8)}, bytes(range(8))),
    "F16": blob({"w": entry("F16", [4], 0, 8)}, bytes(range(8))),
    "F64": blob({"w": entry("F64", [1], 0, 8)}, struct.pack("<d", -0.0)),
    "F32 NaN payload": blob({"w": entry("F32", [2], 0, 8)}, b"\x01\x00\xc0\x7f" + DATA8[4:]),
    "I8 and U8": blob(
        {"a": entry("I8", [2], 0, 2), "b": entry("U8", [2], 2, 4)}, b"\x80\x7f\x00\xff"
    ),
    "I64": blob({"w": entry("I64", [1], 0, 8)}, struct.pack("<q", -(2**40))),
    "BOOL": blob({"w": entry("BOOL", [2], 0, 2)}, b"\x01\x00"),
    "U16": blob({"w": entry("U16", [2], 0, 4)}, bytes(range(4))),
    "C64": blob({"w": entry("C64", [1], 0, 8)}, DATA8),
    "F8_E4M3": blob({"w": entry("F8_E4M3", [2], 0, 2)}, b"\x38\xb8"),
    "F8_E8M0": blob({"w": entry("F8_E8M0", [2], 0, 2)}, b"\x7f\x80"),
    "F4 (no torch dtype)": blob({"w": entry("F4", [2], 0, 1)}, b"\x12"),
    "F4 odd count": blob({"w": entry("F4", [3], 0, 2)}, b"\x12\x34"),
    # --- the 8-byte length prefix
    "empty file": b"",
    "shorter than the prefix": b"\x10\x00\x00",
    "zero header length": blob(b"", length=0),
    "header longer than the file": blob(raw_header(W), DATA8, length=10_000),
    "header length huge": blob(raw_header(W), DATA8, length=2**63),
    "header length one short": blob(raw_header(W), DATA8, length=len(raw_header(W)) - 1),
}


@pytest.mark.parametrize("name", sorted(CORPUS))
def test_agrees_with_the_safetensors_library(tmp_path, name):
    path = tmp_path / "model.safetensors"
    path.write_bytes(CORPUS[name])
    if check_against_library(path) == "accepted":
        _, values = library_verdict(path)
        if all(v is not None for v in values.values()):  # and load_file says the same
            loaded = load_file(str(path))
            assert loaded.keys() == values.keys()
            assert all(same_tensor(loaded[k], open_tensor_file(path).get(k)) for k in loaded)


def test_corpus_has_both_verdicts(tmp_path):
    """The corpus really tests both sides: many files the library loads, many it refuses."""
    verdicts = []
    for i, data in enumerate(CORPUS.values()):
        path = tmp_path / f"{i}.safetensors"
        path.write_bytes(data)
        verdicts.append(library_verdict(path)[0])
    assert sum(verdicts) >= 20 and len(verdicts) - sum(verdicts) >= 30


def test_null_metadata_reads_values(tmp_path):
    """mlx's ``"__metadata__": null`` (the file that used to be refused) reads its values."""
    path = tmp_path / "model.safetensors"
    path.write_bytes(CORPUS["metadata null (mlx)"])
    store = open_tensor_file(path)
    assert torch.equal(store.get("w"), torch.tensor([1.5, -2.25]))


@pytest.mark.parametrize(
    ("name", "words"),
    [
        ("past the end", ["truncated", "'w'", "fetch the file again"]),
        ("overlapping", ["overlaps another tensor"]),
        ("gap between", ["leaves a gap"]),
        ("bytes after the last tensor", ["4 bytes after the last tensor"]),
        ("unknown dtype", ["unknown dtype 'F33'"]),
        ("metadata int value", ["__metadata__ must map names to strings"]),
        ("non-UTF-8 key", ["corrupt safetensors header", "UTF-8"]),
        ("trailing junk", ["corrupt safetensors header", "trailing characters"]),
        ("empty file", ["too short"]),
    ],
)
def test_refusals_say_why(tmp_path, name, words):
    path = tmp_path / "model.safetensors"
    path.write_bytes(CORPUS[name])
    with pytest.raises(WDAnalysisError) as caught:
        open_tensor_file(path)
    message = str(caught.value)
    assert "\n" not in message and str(path) in message
    for word in words:
        assert word in message


def test_mlx_saved_base_loads(tmp_path):
    """A base model saved by mlx itself (``mx.save_safetensors`` writes null metadata)."""
    mx = pytest.importorskip("mlx.core", reason="mlx (pip install 'mlx[cpu]') is not installed")
    weights = {
        "model.layers.0.self_attn.q_proj.weight": mx.random.normal((6, 4)),
        "model.layers.0.self_attn.v_proj.weight": mx.random.normal((6, 4)).astype(mx.bfloat16),
    }
    path = tmp_path / "model.safetensors"
    mx.save_safetensors(str(path), weights)
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    assert json.loads(raw[8 : 8 + length]).get("__metadata__", "absent") is None
    assert check_against_library(path) == "accepted"
    store = open_tensor_file(path)
    for key, value in weights.items():
        got = store.get(key)
        expected = torch.tensor(value.astype(mx.float32).tolist()).to(got.dtype)
        assert torch.equal(got, expected)
