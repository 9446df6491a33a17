"""The engine's reader (``storage.row_reader.Reader``): several reads in flight, yet every
buffer handed out in request order with its own bytes, a failed read reported for that
request only, and a broken schedule raised to the consumer."""

from __future__ import annotations

import os
import random
import threading
import time

import pytest

from wdanalysis.storage import row_reader


def _blob(tmp_path, n=200_000):
    path = tmp_path / "blob.bin"
    data = os.urandom(n)
    path.write_bytes(data)
    return path, data


def test_reads_come_back_in_request_order_with_their_bytes(tmp_path, monkeypatch):
    path, data = _blob(tmp_path)
    rng = random.Random(0)
    requests = []
    for _ in range(300):  # sizes and offsets at random: reads finish out of order
        n = rng.randrange(1, 9000)
        requests.append((path, rng.randrange(0, len(data) - n), n))
    preadv = os.preadv

    def slow_sometimes(fd, buffers, offset, *flags):  # the other thread overtakes this one
        if rng.random() < 0.2:
            time.sleep(0.002)
        return preadv(fd, buffers, offset, *flags)

    monkeypatch.setattr(os, "preadv", slow_sometimes)
    monkeypatch.setenv("WDANALYSIS_DIRECT_IO", "0")
    threads = set()
    reader = row_reader.Reader(
        iter(requests),
        3,
        9000,
        False,
        lambda *e: threads.add(threading.current_thread().name) if e[0] == "read" else None,
    )
    try:
        for _, offset, n in requests:
            buf, error = reader.get()
            assert error is None
            assert bytes(buf[:n].numpy()) == data[offset : offset + n]
            reader.release(buf)
    finally:
        reader.close()
    assert reader.bytes_read == sum(n for *_, n in requests)
    assert len(threads) >= 2  # the reads did run in several threads


def test_a_failed_read_is_that_request_s_error_only(tmp_path):
    path, data = _blob(tmp_path, 10_000)
    requests = [(path, 0, 100), (path, 9_990, 500), (path, 200, 100)]  # the 2nd ends early
    reader = row_reader.Reader(iter(requests), 2, 600, False)
    try:
        buf, error = reader.get()
        assert error is None and bytes(buf[:100].numpy()) == data[:100]
        reader.release(buf)
        buf, error = reader.get()
        assert isinstance(error, OSError) and "end of file" in str(error)
        reader.release(buf)
        buf, error = reader.get()
        assert error is None and bytes(buf[:100].numpy()) == data[200:300]
        reader.release(buf)
    finally:
        reader.close()


def test_a_broken_schedule_is_raised_to_the_consumer(tmp_path):
    path, data = _blob(tmp_path, 10_000)

    def requests():
        yield path, 0, 100
        raise RuntimeError("the plan broke")

    reader = row_reader.Reader(requests(), 2, 100, False)
    try:
        buf, error = reader.get()
        assert error is None and bytes(buf[:100].numpy()) == data[:100]
        reader.release(buf)
        with pytest.raises(RuntimeError, match="the plan broke"):
            reader.get()
    finally:
        reader.close()
