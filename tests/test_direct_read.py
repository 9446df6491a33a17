"""``O_DIRECT`` reads (``storage.direct_read``): the same bytes as the buffered read at any
offset, a buffered fallback wherever direct reads are refused, and the same ΔM/ΔD."""

from __future__ import annotations

import errno
import json
import os

import pytest
import torch
from safetensors.torch import save_file

from wdanalysis import compare
from wdanalysis.storage import direct_read, row_reader

pytestmark = pytest.mark.skipif(not hasattr(os, "O_DIRECT"), reason="no O_DIRECT here")


@pytest.fixture
def force_direct(monkeypatch):
    """Direct reads for every file, whatever its size or cache state."""
    monkeypatch.setattr(direct_read, "DIRECT_MIN_BYTES", 0)
    monkeypatch.setattr(direct_read, "is_cached", lambda fd, offset: False)
    monkeypatch.delenv("WDANALYSIS_DIRECT_IO", raising=False)


def test_window_covers_the_request_in_whole_blocks():
    for offset, nbytes in [(0, 1), (1, 4095), (4095, 2), (12345, 100_000), (8192, 4096)]:
        start, length, delta = direct_read.window(offset, nbytes)
        assert start % 4096 == 0 and length % 4096 == 0 and start + delta == offset
        assert start + length >= offset + nbytes and length - (delta + nbytes) < 4096


def _read_all(path, requests, size):
    reader = row_reader.Reader(iter(requests), 3, size, False)
    out = []
    try:
        for _ in requests:
            buf, error = reader.get()
            assert error is None
            out.append(bytes(buf[: requests[len(out)][2]].numpy()))
            reader.release(buf)
    finally:
        reader.close()
    return out, reader.direct_bytes


def _requests(path, size):
    total = path.stat().st_size
    offsets = [8, 4096, 5000, 70_000, total - 3000]  # unaligned, aligned, up to the end
    return [(path, o, min(size, total - o)) for o in offsets]


def test_direct_reads_give_the_buffered_bytes(tmp_path, force_direct):
    path = tmp_path / "blob.bin"
    data = os.urandom(300_000 + 123)  # not a whole number of blocks
    path.write_bytes(data)
    if direct_read.open_direct(path) is None:
        pytest.skip("this file system refuses O_DIRECT")
    requests = _requests(path, 20_000)
    got, direct = _read_all(path, requests, 20_000)
    assert got == [data[o : o + n] for _, o, n in requests]
    assert direct == sum(n for _, o, n in requests if o % 8 == 0)  # odd offsets: buffered


def test_a_refused_direct_read_falls_back_to_buffered(tmp_path, force_direct, monkeypatch):
    path = tmp_path / "blob.bin"
    data = os.urandom(100_000)
    path.write_bytes(data)

    def refuse(*args):
        raise OSError(errno.EINVAL, "Invalid argument")

    monkeypatch.setattr(direct_read, "read_direct", refuse)
    requests = _requests(path, 9000)
    got, direct = _read_all(path, requests, 9000)
    assert got == [data[o : o + n] for _, o, n in requests] and direct == 0


def test_a_cached_file_is_read_through_the_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(direct_read, "DIRECT_MIN_BYTES", 0)
    path = tmp_path / "blob.bin"
    data = os.urandom(200_000)
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.read(fd, len(data))
        if not direct_read.is_cached(fd, len(data) // 2):
            pytest.skip("RWF_NOWAIT cannot tell here")
    finally:
        os.close(fd)
    got, direct = _read_all(path, _requests(path, 9000), 9000)
    assert direct == 0 and got[0] == data[8:9008]


def test_compare_gives_the_same_numbers_with_direct_reads(tmp_path, force_direct, monkeypatch):
    gen = torch.Generator().manual_seed(0)
    base = {
        "odd": torch.randn(3, generator=gen),  # 12 bytes: the bf16 tensor starts off 8-byte bounds
        "model.layers.0.self_attn.q_proj.weight": torch.randn(96, 70, generator=gen),
        "model.layers.0.self_attn.v_proj.weight": torch.randn(40, 70, generator=gen).bfloat16(),
    }
    for name, state in (("base", base), ("ft", {k: v * 1.01 + 0.01 for k, v in base.items()})):
        (tmp_path / name).mkdir()
        save_file(state, str(tmp_path / name / "model.safetensors"))
        (tmp_path / name / "config.json").write_text(json.dumps({"model_type": "llama"}))
    if direct_read.open_direct(tmp_path / "base" / "model.safetensors") is None:
        pytest.skip("this file system refuses O_DIRECT")
    seen = []
    read_direct = direct_read.read_direct
    monkeypatch.setattr(direct_read, "read_direct", lambda *a: seen.append(a[3]) or read_direct(*a))
    direct = compare(tmp_path / "base", tmp_path / "ft", progress=False)
    assert seen  # the direct path ran
    monkeypatch.setenv("WDANALYSIS_DIRECT_IO", "0")
    buffered = compare(tmp_path / "base", tmp_path / "ft", progress=False)
    assert direct[["delta_m", "delta_d"]].equals(buffered[["delta_m", "delta_d"]])
