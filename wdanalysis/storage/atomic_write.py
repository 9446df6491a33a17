"""Atomic file writes: a reader never sees a half-written table, figure or checkpoint."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from wdanalysis.storage.kill_points import kill_point


@contextlib.contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; rename it onto ``target`` on success.

    The temporary file lives in the same folder so that the final ``os.replace`` is atomic
    on POSIX file systems. On any exception (Ctrl-C included) the temporary file is removed
    and ``target`` is left as it was.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; finished files get normal modes
    try:
        yield tmp
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        kill_point("file-written")  # tests: a kill with the temporary file on disk
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text_atomic(target: str | Path, text: str) -> Path:
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(target)


def write_csv_atomic(frame, target: str | Path) -> Path:
    """Write a pandas DataFrame as CSV, atomically."""
    with atomic_path(target) as tmp:
        frame.to_csv(tmp, index=False)
    return Path(target)


def save_figure_atomic(figure, target: str | Path, **savefig_kwargs) -> Path:
    """``figure.savefig`` to ``target`` atomically; the format follows the target's suffix."""
    target = Path(target)
    savefig_kwargs.setdefault("format", target.suffix.lstrip(".") or "png")
    with atomic_path(target) as tmp:
        figure.savefig(tmp, **savefig_kwargs)
    return target
