"""Reads work where ``os.preadv`` is missing (Windows; ``os.pread`` too is missing there).

The safetensors differential corpus is read again with the OS's positioned reads taken
away, so that :func:`wdanalysis.storage.row_reader.read_at` falls back to ``os.pread`` or
to ``seek`` + ``readinto``: every tensor must come back with the library's bytes.
"""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import save_file
from safetensors_oracle import check_against_library
from test_safetensors_differential import CORPUS

from wdanalysis import compare
from wdanalysis.storage import row_reader

FALLBACKS = {"pread": ("preadv",), "seek+readinto": ("preadv", "pread")}


@pytest.fixture(params=sorted(FALLBACKS))
def without_positioned_reads(request, monkeypatch):
    for name in FALLBACKS[request.param]:
        monkeypatch.delattr(os, name, raising=False)
    return request.param


def test_corpus_reads_the_same_bytes(tmp_path, without_positioned_reads):
    accepted = 0
    for i, data in enumerate(CORPUS.values()):
        path = tmp_path / f"{i}.safetensors"
        path.write_bytes(data)
        accepted += check_against_library(path) == "accepted"
    assert accepted >= 20  # the fallback really read tensors


def test_short_read_is_an_error(tmp_path, without_positioned_reads):
    path = tmp_path / "short.bin"
    path.write_bytes(bytes(range(10)))
    view = memoryview(bytearray(16))
    with row_reader.open_for_reading(path) as handle:
        row_reader.read_at(handle, view[:6], 3)
        assert bytes(view[:6]) == bytes(range(3, 9))
        with pytest.raises(OSError, match="unexpected end of file"):
            row_reader.read_at(handle, view, 0)


def test_compare_streams_without_preadv(tmp_path, without_positioned_reads):
    """A whole comparison through the reader thread: the same numbers as with preadv."""
    gen = torch.Generator().manual_seed(0)
    base = {"layers.0.q_proj.weight": torch.randn(48, 20, generator=gen).to(torch.bfloat16)}
    tuned = {k: (v.float() + 0.01 * torch.randn(v.shape, generator=gen)) for k, v in base.items()}
    for name, state in (("base", base), ("run", tuned)):
        (tmp_path / name).mkdir()
        save_file(state, str(tmp_path / name / "model.safetensors"))
    got = compare(tmp_path / "base", [tmp_path / "run"], modules=["q_proj"], progress=False)
    w0, wt = base["layers.0.q_proj.weight"].double(), tuned["layers.0.q_proj.weight"].double()
    expected = (wt.norm(dim=1) - w0.norm(dim=1)).abs().mean().item()
    assert got["delta_m"].iloc[0] == pytest.approx(expected, rel=1e-9)
