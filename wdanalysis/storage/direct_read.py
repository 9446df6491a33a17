"""Reads that bypass the page cache (``O_DIRECT``) for large files that are not cached.

A buffered read costs the CPU a copy out of the page cache and, on a machine whose memory
is full of cache, the reclaim of old pages for the new ones: measured at 0.17 to 1.1
core-seconds per GB on the 2-core VM (more under load), more than the engine's own sums.
``O_DIRECT`` lets the device write straight into the reader's buffer (about 0.06 core-s/GB
there), at the price of alignment: the offset, the length and the buffer's address must
be multiples of the device's block size (4096 covers every common device). A request
``(offset, nbytes)`` is therefore widened to whole blocks, read into a block-aligned buffer,
and the data starts ``offset % 4096`` bytes into it.

Direct reads are used only where they help and cannot change a result:

* Linux (``os.O_DIRECT``), files of at least :data:`DIRECT_MIN_BYTES`;
* not when the file's data is already in the page cache (a second run, a file just
  written): a one-block ``RWF_NOWAIT`` probe in the middle of the file says so (its
  start is cached once the header was read), and the cached copy is read as before;
* ``WDANALYSIS_DIRECT_IO=0`` turns them off; any error opening or reading with ``O_DIRECT``
  (a file system without it, such as tmpfs) falls back to the buffered read for that file.
"""

from __future__ import annotations

import os

ALIGN = 4096  # bytes: offsets, lengths and buffer addresses of direct reads
DIRECT_MIN_BYTES = 64 << 20  # smaller files: buffered reads (cheap, often cached)


def enabled() -> bool:
    return hasattr(os, "O_DIRECT") and os.environ.get("WDANALYSIS_DIRECT_IO", "1") != "0"


def window(offset: int, nbytes: int) -> tuple[int, int, int]:
    """The block-aligned ``(start, length)`` holding ``offset .. offset+nbytes``, and where
    the data begins in it."""
    start = offset - offset % ALIGN
    delta = offset - start
    length = -(-(delta + nbytes) // ALIGN) * ALIGN
    return start, length, delta


def is_cached(fd: int, offset: int) -> bool:
    """Whether the block at ``offset`` is in the page cache (``RWF_NOWAIT`` read of it);
    ``False`` where the probe itself is not available."""
    flag = getattr(os, "RWF_NOWAIT", None)
    if flag is None or not hasattr(os, "preadv"):
        return False
    probe = bytearray(ALIGN)
    try:
        return os.preadv(fd, [probe], offset - offset % ALIGN, flag) > 0
    except OSError:  # EAGAIN: not cached; EOPNOTSUPP: cannot tell
        return False


def open_direct(path) -> int | None:
    """A file descriptor opened with ``O_DIRECT``, or ``None`` where that is refused."""
    try:
        return os.open(path, os.O_RDONLY | os.O_DIRECT)
    except OSError:
        return None


def read_direct(fd: int, view: memoryview, start: int, need: int) -> None:
    """Fill the block-aligned ``view`` from ``start`` (aligned) until at least ``need`` bytes
    are in (the file may end inside the last block); an ``OSError`` if it ends sooner."""
    done = 0
    while done < need:
        got = os.preadv(fd, [view[done:]], start + done)
        if got <= 0:
            raise OSError(f"unexpected end of file at byte {start + done}")
        done += got
        if done < need and done % ALIGN:  # a short read inside the file: not aligned
            raise OSError(f"short direct read at byte {start + done}")
