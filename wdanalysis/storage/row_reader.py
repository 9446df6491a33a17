"""Reading a weight's rows straight from disk: the I/O half of the streaming engine.

* :func:`extent` finds where a tensor's bytes lie in a safetensors file (header parsed once
  per file), so that any block of its rows is one ``pread``.
* :class:`Reader` issues those reads from a background thread into a small pool of
  reusable buffers, in the order the engine will consume them (no mmap: mapped pages would
  count in the process's RSS until unmapped).
* :func:`read_at` is the one positioned read: ``os.preadv`` straight into the buffer where
  the OS has it (Linux, BSD, macOS 11+), ``os.pread`` and a copy where only that exists,
  and ``seek`` + ``readinto`` elsewhere (Windows has neither). The file is opened in binary
  mode (``O_BINARY`` on Windows), so every OS reads the same bytes.
"""

from __future__ import annotations

import io
import os
import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from wdanalysis.errors import CheckpointFormatError
from wdanalysis.storage import direct_read
from wdanalysis.storage.store_protocol import WeightStore
from wdanalysis.storage.tensor_store import real_key

_ST_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}
_ST_DTYPES["F64"] = torch.float64


# ----------------------------------------------------------------------- safetensors layout


@dataclass(frozen=True)
class Extent:
    """Where a tensor's bytes lie in a safetensors file."""

    file: Path
    offset: int  # absolute byte offset of the data
    nbytes: int
    dtype: torch.dtype
    shape: tuple[int, ...]


_layouts: dict[tuple, dict[str, Extent]] = {}


def safetensors_layout(file: Path) -> dict[str, Extent]:
    """Absolute data offsets of every tensor (header already validated by the loader)."""
    stat = file.stat()  # a file re-saved at the same path must not reuse stale offsets
    cache_key = (file, stat.st_mtime_ns, stat.st_size, stat.st_ino)
    cached = _layouts.get(cache_key)
    if cached is not None:
        return cached
    import json
    import struct

    with open(file, "rb") as handle:
        (header_len,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(header_len))
    extents = {}
    for key, entry in header.items():
        if key == "__metadata__" or entry.get("dtype") not in _ST_DTYPES:
            continue
        begin, end = entry["data_offsets"]
        dtype = _ST_DTYPES[entry["dtype"]]
        shape = tuple(entry["shape"])
        numel = 1
        for n in shape:
            numel *= n
        if end - begin != numel * dtype.itemsize:
            continue  # inconsistent entry: let the loader's slow path report it
        extents[key] = Extent(file, 8 + header_len + begin, end - begin, dtype, shape)
    if len(_layouts) > 4096:
        _layouts.clear()
    _layouts[cache_key] = extents
    return extents


def extent_of(store: WeightStore, key: str) -> Extent | None:
    """Byte range of ``key`` if it can be streamed with pread, else ``None``."""
    info = store.infos.get(key)
    if info is None or info.file.suffix != ".safetensors":
        return None
    try:
        extent = safetensors_layout(info.file).get(real_key(info, key))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    # a store that presents the tensor otherwise (FP8 dequantized on read) reads it itself
    return extent if extent is None or extent.dtype == info.dtype else None


# ----------------------------------------------------------------------------- reader


class Reader:
    """Reads byte ranges, in the order they will be consumed, into a pool of buffers.

    A single background thread issues the ``pread`` calls (they release the GIL) while the
    caller computes; ``get`` returns them in request order (a tensor whose first byte is
    the request's first byte); ``release`` recycles it. Large files not in the page cache
    are read with ``O_DIRECT`` (:mod:`wdanalysis.storage.direct_read`).
    """

    def __init__(self, requests: Iterator[tuple[Path, int, int]], n_buffers: int, size: int, pin):
        self._free: queue.Queue = queue.Queue()
        for _ in range(n_buffers):
            raw = torch.empty(size + 3 * direct_read.ALIGN, dtype=torch.uint8)
            raw = raw.pin_memory() if pin else raw
            skip = -raw.data_ptr() % direct_read.ALIGN  # block-aligned, for direct reads
            self._free.put(raw[skip : skip + size + 2 * direct_read.ALIGN])
        self._lent: dict[int, torch.Tensor] = {}  # data_ptr of a handed-out view -> buffer
        self._ready: queue.Queue = queue.Queue()
        self._requests = requests
        self._files: dict[Path, io.FileIO] = {}
        self._direct: dict[Path, int | None] = {}  # O_DIRECT descriptor, None: buffered
        self._stop = threading.Event()
        self.cpu_seconds = 0.0  # the reader thread's CPU time in reads (engine.cpu_profile)
        self.bytes_read = 0
        self.direct_bytes = 0  # of which read with O_DIRECT
        self._thread = threading.Thread(target=self._run, name="wdanalysis-reader", daemon=True)
        self._thread.start()

    def _file(self, path: Path) -> io.FileIO:
        handle = self._files.get(path)
        if handle is None:
            handle = self._files[path] = open_for_reading(path)
        return handle

    def _direct_fd(self, path: Path) -> int | None:
        """The file's ``O_DIRECT`` descriptor, decided at its first request: a large file
        whose middle is not in the page cache (its start is, once the header was read)."""
        if path not in self._direct:
            fd = None
            handle = self._file(path)
            size = os.fstat(handle.fileno()).st_size
            if (
                direct_read.enabled()
                and size >= direct_read.DIRECT_MIN_BYTES
                and not direct_read.is_cached(handle.fileno(), size // 2)
            ):
                fd = direct_read.open_direct(path)
            self._direct[path] = fd
        return self._direct[path]

    def _run(self) -> None:
        try:
            for path, offset, nbytes in self._requests:
                buf = None
                while buf is None:
                    if self._stop.is_set():
                        return
                    try:
                        buf = self._free.get(timeout=0.1)
                    except queue.Empty:
                        continue
                start = time.thread_time()
                try:
                    view = self._read_into(buf, path, offset, nbytes)
                    self.bytes_read += nbytes
                except OSError as error:  # this request only: handed to the consumer
                    self._hand_out(buf, buf, error)
                else:
                    self._hand_out(buf, view, None)
                finally:
                    self.cpu_seconds += time.thread_time() - start
        except BaseException as error:  # the schedule itself broke: stop the consumer
            self._ready.put((None, error))
        finally:
            for handle in self._files.values():
                handle.close()
            for fd in self._direct.values():
                if fd is not None:
                    os.close(fd)
            self._files.clear()
            self._direct.clear()

    def _hand_out(self, buf: torch.Tensor, view: torch.Tensor, error) -> None:
        self._lent[view.data_ptr()] = buf
        self._ready.put((view, error))

    def _read_into(self, buf: torch.Tensor, path: Path, offset: int, nbytes: int) -> torch.Tensor:
        """Read the request into ``buf``; returns the view of ``buf`` that holds it."""
        fd = self._direct_fd(path)
        begin, length, delta = direct_read.window(offset, nbytes)
        if fd is not None and delta % 8 == 0 and length <= buf.numel():
            try:
                direct_read.read_direct(fd, memoryview(buf.numpy())[:length], begin, delta + nbytes)
                self.direct_bytes += nbytes
                return buf[delta : delta + nbytes]
            except OSError:  # this file system refuses it after all: buffered from now on
                os.close(fd)
                self._direct[path] = None
        read_at(self._file(path), memoryview(buf.numpy())[:nbytes], offset)
        return buf

    def get(self) -> tuple[torch.Tensor, OSError | None]:
        """The next buffer in request order, and the read error for it if any."""
        buf, error = self._ready.get()
        if buf is None:
            raise error
        return buf, error

    def release(self, buf: torch.Tensor) -> None:
        """Give back a tensor that :meth:`get` returned."""
        self._free.put(self._lent.pop(buf.data_ptr(), buf))

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def open_for_reading(path: Path) -> io.FileIO:
    """An unbuffered binary handle (the reads go straight into the caller's buffers)."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
    if hasattr(os, "posix_fadvise"):
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
    return io.FileIO(fd, "rb", closefd=True)


def read_at(handle: io.FileIO, view: memoryview, offset: int) -> None:
    """Fill ``view`` with the file's bytes from ``offset``; an error if the file ends first.

    The OS's own positioned read where it has one, looked up at each call (so that a test
    can take it away): ``preadv`` into ``view``, else ``pread`` and a copy, else ``seek`` +
    ``readinto`` (Windows). Only the reader thread uses a handle, so seeking is safe.
    """
    done, nbytes = 0, len(view)
    preadv, pread = getattr(os, "preadv", None), getattr(os, "pread", None)
    while done < nbytes:
        position = offset + done
        if preadv is not None:
            got = preadv(handle.fileno(), [view[done:]], position)
        elif pread is not None:
            data = pread(handle.fileno(), nbytes - done, position)
            got = len(data)
            view[done : done + got] = data
        else:
            handle.seek(position)
            got = handle.readinto(view[done:]) or 0
        if got <= 0:
            raise OSError(f"unexpected end of file at byte {position}")
        done += got


def read_error(key: str, extent: Extent, error: OSError) -> CheckpointFormatError:
    """The one-line error for a tensor whose bytes could not be read."""
    return CheckpointFormatError(f"cannot read tensor {key!r}: {error}", extent.file)


def slice_request(extent: Extent, rows: int, start: int, n: int) -> tuple[Path, int, int]:
    row_bytes = extent.nbytes // max(rows, 1)
    return extent.file, extent.offset + start * row_bytes, n * row_bytes


def read_rows(extent: Extent, start: int, n: int) -> torch.Tensor:
    """Rows ``start .. start + n`` of a tensor (dimension 0), in one ``pread`` into a fresh
    tensor: nothing else of the file is read or mapped (FSDP shards, row-range loading)."""
    rows = extent.shape[0] if extent.shape else 1
    path, offset, nbytes = slice_request(extent, rows, start, n)
    out = torch.empty(nbytes, dtype=torch.uint8)
    view, done = memoryview(out.numpy()), 0
    fd = os.open(path, os.O_RDONLY)
    try:
        while done < nbytes:  # one pread returns at most ~2 GiB on Linux
            got = os.preadv(fd, [view[done:]], offset + done)
            if got == 0:
                break
            done += got
    finally:
        os.close(fd)
    if done != nbytes:
        raise CheckpointFormatError(f"file is truncated: {done} of {nbytes} bytes read", path)
    return out.view(extent.dtype).reshape(n, *extent.shape[1:])
