"""Bounded, non-blocking reads of the small files wdanalysis parses.

``config.json``, ``adapter_config.json``, shard indexes, ``trainer_state.json`` … come from
users and the internet. Every one is read through :func:`read_json` /
:func:`read_small_bytes`, which never hang and never read without bound:

* the path is ``stat``-ed first (symbolic links followed; a loop is named); anything but a
  regular file (a FIFO, a device such as ``/dev/zero``, a socket, a folder) is refused in
  one line without being opened for reading;
* it is opened with ``O_NONBLOCK`` and checked again with ``fstat`` (a file swapped for a
  FIFO in between cannot block the read);
* at most ``limit`` bytes are read (:data:`SMALL_FILE_LIMIT` unless said); a larger file
  is refused in one line, as is one that grows past the limit while read.
"""

from __future__ import annotations

import errno
import json
import os
import stat
from pathlib import Path

from wdanalysis.errors import CheckpointFormatError

SMALL_FILE_LIMIT = 64 << 20  # the largest shard index seen (~100k tensors) is ~10 MB
_KINDS = (
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISDIR, "a folder"),
)


def kind_of(mode: int) -> str:
    """``"a FIFO (named pipe)"``, ``"a character device"`` … for a non-regular file."""
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def regular_file(path: str | Path) -> os.stat_result:
    """``os.stat`` of ``path`` (links followed), refusing loops and non-regular files.

    Raises:
        CheckpointFormatError: a symbolic link loop, a dangling link, or anything that is
            not a regular file; one line naming the path.
        OSError: a missing file (``FileNotFoundError``) or one that may not be read.
    """
    path = Path(path)
    try:
        info = os.stat(path)
    except OSError as error:
        raise _stat_error(path, error) from None
    if not stat.S_ISREG(info.st_mode):
        raise CheckpointFormatError(
            f"is {kind_of(info.st_mode)}, not a regular file; refusing to read it",
            path,
            "point at a real file",
        )
    return info


def _stat_error(path: Path, error: OSError) -> Exception:
    """A loop or a dangling link: named in one line. A missing file or a permission error:
    the ``OSError`` itself, which callers of optional files (``config.json``) catch."""
    if error.errno == errno.ELOOP:
        return CheckpointFormatError(
            "symbolic link loop (the link leads back to itself)", path, "fix or remove the link"
        )
    if error.errno == errno.ENOENT and path.is_symlink():
        target = os.readlink(path)
        return CheckpointFormatError(
            f"dangling symbolic link (to {target})", path, "fix or remove the link"
        )
    return error


def read_small_bytes(path: str | Path, limit: int = SMALL_FILE_LIMIT) -> bytes:
    """The bytes of a small regular file, at most ``limit`` of them (module docstring)."""
    path = Path(path)
    info = regular_file(path)
    if info.st_size > limit:
        raise _too_large(path, info.st_size, limit)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as error:
        raise _stat_error(path, error) from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):  # swapped after the stat
            raise CheckpointFormatError(
                f"is {kind_of(mode)}, not a regular file; refusing to read it", path
            )
        chunks, total = [], 0
        while total <= limit:
            chunk = os.read(fd, min(1 << 20, limit + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
    except OSError as error:
        raise _stat_error(path, error) from None
    finally:
        os.close(fd)
    if total > limit:
        raise _too_large(path, total, limit)
    return b"".join(chunks)


def _too_large(path: Path, size: int, limit: int) -> CheckpointFormatError:
    return CheckpointFormatError(
        f"{size} bytes or more, larger than the {limit >> 20} MiB a {path.name} may have; "
        "refusing to read it",
        path,
        "this is not the small JSON file expected here",
    )


def read_small_text(path: str | Path, limit: int = SMALL_FILE_LIMIT) -> str:
    """:func:`read_small_bytes` decoded as UTF-8 (``UnicodeDecodeError``, a ``ValueError``,
    for other bytes)."""
    return read_small_bytes(path, limit).decode("utf-8")


def read_json(path: str | Path, limit: int = SMALL_FILE_LIMIT):
    """A small JSON file, parsed; malformed or too deeply nested JSON raises ``ValueError``
    (as ``json.loads`` does), an unreadable or hostile file :class:`CheckpointFormatError`."""
    data = read_small_bytes(path, limit)
    try:
        return json.loads(data)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None
