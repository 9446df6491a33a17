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
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from wdanalysis.errors import CheckpointFormatError
from wdanalysis.storage import direct_read
from wdanalysis.storage.store_protocol import WeightStore
from wdanalysis.storage.tensor_store import real_key

_ST_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}
_ST_DTYPES["F64"] = torch.float64
READ_THREADS = 2  # reads in flight at once (see Reader)


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

    Background threads (:data:`READ_THREADS`) issue the ``pread`` calls (they release the
    GIL) while the caller computes; ``get`` returns them in request order (a tensor whose
    first byte is the request's first byte); ``release`` recycles it. Each thread takes a
    free buffer and the next request together, so buffers are handed out in request order
    (no thread can hold the last buffer while the consumer waits for an earlier request),
    and two reads are in flight: the disk is not idle while one thread waits for the GIL
    or for the CPU to hand its buffer over. Large files not in the page cache are read
    with ``O_DIRECT`` (:mod:`wdanalysis.storage.direct_read`).
    """

    def __init__(
        self,
        requests: Iterator[tuple[Path, int, int]],
        n_buffers: int,
        size: int,
        pin,
        trace: Callable[[str, float, float, int], None] | None = None,
    ):
        self._free: queue.Queue = queue.Queue()
        for _ in range(n_buffers):
            raw = torch.empty(size + 3 * direct_read.ALIGN, dtype=torch.uint8)
            raw = raw.pin_memory() if pin else raw
            skip = -raw.data_ptr() % direct_read.ALIGN  # block-aligned, for direct reads
            self._free.put(raw[skip : skip + size + 2 * direct_read.ALIGN])
        self._lent: dict[int, torch.Tensor] = {}  # data_ptr of a handed-out view -> buffer
        self._requests = iter(requests)
        self._take = threading.Lock()  # a free buffer and the next request, together
        self._done = threading.Condition()  # guards _ready, _fatal, _live
        self._ready: dict[int, tuple[torch.Tensor, OSError | None]] = {}  # by request number
        self._issued = self._next = 0  # requests taken by a thread / handed to the consumer
        self._fatal: BaseException | None = None  # the schedule itself broke
        self._files: dict[Path, io.FileIO] = {}
        self._direct: dict[Path, int | None] = {}  # O_DIRECT descriptor, None: buffered
        self._refused: list[int] = []  # direct descriptors given up on (closed at the end)
        self._stop = threading.Event()
        self._trace = trace  # (kind, start, end, bytes) of each read and wait, if given
        self.cpu_seconds = 0.0  # the reader threads' CPU time in reads (engine.cpu_profile)
        self.bytes_read = 0
        self.direct_bytes = 0  # of which read with O_DIRECT
        # positioned reads are thread safe; the seek + readinto fallback (Windows) is not
        positioned = hasattr(os, "preadv") or hasattr(os, "pread")
        self._threads = [
            threading.Thread(target=self._run, name=f"wdanalysis-reader-{i}", daemon=True)
            for i in range(READ_THREADS if positioned else 1)
        ]
        self._live = len(self._threads)
        for thread in self._threads:
            thread.start()

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

    def _next_request(self):
        """A free buffer, the next request, its number and its descriptors (``None``: no
        more requests or stopped); opening files happens here, under the lock."""
        waited = time.perf_counter()
        with self._take:
            buf = None
            while buf is None:
                if self._stop.is_set():
                    return None
                try:
                    buf = self._free.get(timeout=0.1)
                except queue.Empty:
                    continue
            if self._trace is not None:
                self._trace("no free buffer", waited, time.perf_counter(), 0)
            request = next(self._requests, None)
            if request is None:
                self._free.put(buf)
                return None
            path = request[0]
            handles = (self._file(path), self._direct_fd(path))
            self._issued += 1
            return buf, request, self._issued - 1, handles

    def _run(self) -> None:
        try:
            while (taken := self._next_request()) is not None:
                buf, (path, offset, nbytes), number, (handle, fd) = taken
                start, wall = time.thread_time(), time.perf_counter()
                try:
                    view, direct = self._read_into(buf, path, offset, nbytes, handle, fd)
                except OSError as error:  # this request only: handed to the consumer
                    self._hand_out(number, buf, buf, error, nbytes, False)
                else:
                    self._hand_out(number, buf, view, None, nbytes, direct)
                finally:
                    seconds = time.thread_time() - start
                    with self._done:
                        self.cpu_seconds += seconds
                    if self._trace is not None:
                        self._trace("read", wall, time.perf_counter(), nbytes)
        except BaseException as error:  # the schedule itself broke: stop the consumer
            with self._done:
                self._fatal = error
                self._done.notify_all()
        finally:
            with self._done:
                self._live -= 1
                last = self._live == 0
            if last:
                self._close_files()

    def _close_files(self) -> None:
        for handle in self._files.values():
            handle.close()
        for fd in [*self._direct.values(), *self._refused]:
            if fd is not None:
                os.close(fd)
        self._files.clear()
        self._direct.clear()
        self._refused.clear()

    def _hand_out(self, number, buf, view, error, nbytes: int, direct: bool) -> None:
        with self._done:
            self._lent[view.data_ptr()] = buf
            self._ready[number] = (view, error)
            if error is None:
                self.bytes_read += nbytes
                self.direct_bytes += nbytes if direct else 0
            self._done.notify_all()

    def _read_into(self, buf, path: Path, offset: int, nbytes: int, handle, fd):
        """Read the request into ``buf``; returns the view of ``buf`` that holds it and
        whether it was a direct read."""
        begin, length, delta = direct_read.window(offset, nbytes)
        if fd is not None and delta % 8 == 0 and length <= buf.numel():
            try:
                direct_read.read_direct(fd, memoryview(buf.numpy())[:length], begin, delta + nbytes)
                return buf[delta : delta + nbytes], True
            except OSError:  # this file system refuses it after all: buffered from now on
                with self._done:  # closed at the end: the other thread may still use it
                    if self._direct.get(path) == fd:
                        self._direct[path] = None
                        self._refused.append(fd)
        read_at(handle, memoryview(buf.numpy())[:nbytes], offset)
        return buf, False

    def get(self) -> tuple[torch.Tensor, OSError | None]:
        """The next buffer in request order, and the read error for it if any."""
        wall = time.perf_counter()
        with self._done:
            while self._next not in self._ready and self._fatal is None:
                self._done.wait()
            if self._next not in self._ready:
                raise self._fatal
            buf, error = self._ready.pop(self._next)
            self._next += 1
        if self._trace is not None:
            self._trace("wait for read", wall, time.perf_counter(), 0)
        return buf, error

    def release(self, buf: torch.Tensor) -> None:
        """Give back a tensor that :meth:`get` returned."""
        with self._done:
            raw = self._lent.pop(buf.data_ptr(), buf)
        self._free.put(raw)

    def close(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=5)


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


def as_matrix(buf: torch.Tensor, extent: Extent, rows: int, cols: int) -> torch.Tensor:
    """The first ``rows × cols`` values of ``extent``'s dtype in a read buffer."""
    return buf[: rows * cols * extent.dtype.itemsize].view(extent.dtype).view(rows, cols)


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
