"""Output folders written as one transaction: the old result or the whole new one.

:func:`output_folder` is what ``compare``, ``plot`` and ``demo --figures`` write through:

* a **lock** (``flock`` on ``.<name>.lock`` beside the folder) is taken first; a second
  command into the same folder is refused in one line at once instead of mixing its files
  with the first one's (refused rather than waited for: a comparison can run for an hour,
  and a command that waits without a word looks like a hang);
* under the lock, what a killed earlier command left is **recovered**: a finished result
  that was not yet swapped in is swapped in, every other temporary is removed;
* the command writes into a **staging folder** beside the target (``.<name>.wdtmp-<pid>``);
  files of the previous result are not carried over (no stale figure survives), files
  wdanalysis did not write are (hard links, else copies). What wdanalysis wrote is listed
  in ``.<name>.wdfiles.json`` beside the folder (and known output names are recognised);
* on success the staging folder is **committed** (renamed ``.<name>.wdready-<pid>``: from
  here the new result counts as written) and swapped in with two renames, the old folder
  going to ``.<name>.wdold-<pid>`` and then deleted. A kill between the renames is finished
  by the next command's recovery. On any failure or Ctrl-C the staging folder is removed and
  the previous result is left untouched.

``update=True`` (``demo --figures``, whose folder also holds studies published by other
commands) carries every file over and replaces only those written anew.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import glob
import json
import os
import re
import shutil
import signal
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from wdanalysis.errors import WDAnalysisError
from wdanalysis.storage.atomic_write import write_text_atomic
from wdanalysis.storage.kill_points import kill_point

# Files of a result written before manifests existed (recognised by name, not carried over).
OUTPUT_NAMES = re.compile(
    r"^(deltas\.csv|run\.json|fits\.csv|index\.html|summary\.csv|accuracy\.csv"
    r"|(figure2|trajectories|heatmap)[^/]*\.(png|svg|pdf))$"
)
_STALE_FILE = re.compile(r"^\..+\.tmp$")  # atomic_path's temporaries of a killed write
_KINDS = ("wdtmp", "wdready", "wdold")


class OutputInterrupted(KeyboardInterrupt):
    """Ctrl-C inside :func:`output_folder`; ``left`` says truthfully what is on disk."""

    def __init__(self, left: str):
        super().__init__(left)
        self.left = left


@dataclass
class Staging:
    """Where a command writes (``path``) and where its files will be (``target``)."""

    path: Path
    target: Path  # absolute
    carried: set[str] = field(default_factory=set)  # relative paths carried over
    shown: Path | None = None  # the target as the user gave it, for messages

    def final(self, written: str | Path) -> Path:
        """The path a file written into the staging folder will have once committed (as
        the user named the folder)."""
        return (self.shown or self.target) / Path(written).relative_to(self.path)

    def discard_new(self, keep: Iterable[str] = ()) -> None:
        """Remove what this command wrote so far, except the top-level names in ``keep``."""
        keep = set(keep)
        for entry in list(self.path.iterdir()):
            if entry.name not in keep and entry.name not in self.carried:
                _remove(entry)


def sibling(target: Path, kind: str) -> Path:
    """``.<name>.<kind>-<pid>`` beside ``target``: this process's staging, commit or trash."""
    return target.parent / f".{target.name}.{kind}-{os.getpid()}"


@contextlib.contextmanager
def output_folder(
    target: str | Path, *, keep: Iterable[str] = (), update: bool = False
) -> Iterator[Staging]:
    """Write a result folder as one transaction (module docstring).

    Args:
        target: the folder (``--out``).
        keep: top-level names of the previous result to carry over although written by
            wdanalysis (``plot`` keeps the ``deltas.csv`` it draws from).
        update: carry every file over; replace only those written anew.

    Raises:
        WDAnalysisError: ``target`` is a file, the current folder (or holds it), or another
            command holds the lock.
        OutputInterrupted: on Ctrl-C, saying what the folder holds.
    """
    shown, target = Path(target), Path(os.path.abspath(target))
    _check_target(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    with folder_lock(target):
        recover(target)
        existed = target.is_dir() and any(target.iterdir())
        staging = sibling(target, "wdtmp")
        staging.mkdir()
        try:
            stage = Staging(staging, target, shown=shown)
            stage.carried = _carry(target, staging, set(keep), update)
            kill_point("staged")
            yield stage
            _commit(stage)
        except KeyboardInterrupt as interrupt:
            _remove(staging)
            if isinstance(interrupt, OutputInterrupted):
                raise
            left = "the previous result is unchanged" if existed else "nothing was written"
            raise OutputInterrupted(f"{shown}: {left}") from None
        except BaseException:
            _remove(staging)
            raise


def _check_target(target: Path) -> None:
    if target.exists() and not target.is_dir():
        raise WDAnalysisError("--out is a file, not a folder", target, "choose another --out")
    cwd = Path.cwd().resolve()
    resolved = target.resolve()
    if resolved == cwd or resolved in cwd.parents or resolved.parent == resolved:
        raise WDAnalysisError(
            "--out is the current folder or holds it; the result folder is replaced whole",
            target,
            "choose a sub-folder, e.g. --out results",
        )


# ------------------------------------------------------------------------------ the lock

_HELD: dict[Path, int] = {}  # lock files this process holds -> their descriptor
_COUNTS: dict[Path, int] = {}  # -> how many holders in this process
_HELD_LOCK = threading.Lock()


@contextlib.contextmanager
def folder_lock(target: Path) -> Iterator[None]:
    """Hold ``.<name>.lock`` beside ``target``; another holder is refused in one line.

    Re-entrant within a process (a command that writes one folder twice); ``flock`` locks
    die with their process, so a killed command never leaves the folder locked.
    """
    lock = acquire_lock(target)
    try:
        yield
    finally:
        release_lock(lock)


def acquire_lock(target: Path) -> Path:
    """Take the lock of ``target`` (see :func:`folder_lock`); returns the lock file."""
    path = Path(os.path.abspath(target))
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = path.parent / f".{path.name}.lock"
    with _HELD_LOCK:
        if lock in _HELD:
            _COUNTS[lock] += 1
            return lock
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "?"
            os.close(fd)
            if error.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise WDAnalysisError(
                    f"another wdanalysis command (pid {holder}) is writing it now",
                    path,
                    "wait for it to finish or choose another output",
                ) from None
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        _HELD[lock], _COUNTS[lock] = fd, 1
        return lock


def release_lock(lock: Path) -> None:
    with _HELD_LOCK:
        _COUNTS[lock] -= 1
        if _COUNTS[lock] == 0:
            os.close(_HELD.pop(lock))  # closing drops the flock
            del _COUNTS[lock]


# -------------------------------------------------------------------- recovery, carrying


def recover(target: Path) -> None:
    """Finish or undo what a killed command left beside ``target`` (lock held).

    A committed result (``wdready``) is swapped in (it was whole); staging folders and
    trash are removed. Stale temporary files inside the folder go when it is rewritten.
    """
    found: dict[str, list[Path]] = {kind: [] for kind in _KINDS}
    prefix = f".{target.name}."
    for entry in target.parent.iterdir():
        if entry.name.startswith(prefix):
            kind = entry.name[len(prefix) :].split("-", 1)[0]
            if kind in found:
                found[kind].append(entry)
    stale_manifest = f".{manifest_of(target).name}."  # its temporaries from a killed write
    for entry in target.parent.glob(f"{glob.escape(stale_manifest)}*.tmp"):
        entry.unlink(missing_ok=True)
    ready = sorted(found["wdready"], key=lambda p: p.stat().st_mtime)
    if ready:
        _swap(ready[-1], target)
    for entry in found["wdtmp"] + found["wdold"] + ready[:-1]:
        _remove(entry)


def _carry(target: Path, staging: Path, keep: set[str], update: bool) -> set[str]:
    """Link into ``staging`` the files of ``target`` that the new result keeps."""
    if not target.is_dir():
        return set()
    previous = set() if update else _previous_outputs(target)
    carried = set()
    for entry in target.iterdir():
        name = entry.name
        if _STALE_FILE.match(name):
            continue
        if name in previous and name not in keep:
            continue
        _link_tree(entry, staging / name)
        carried.add(name)
    return carried


def _previous_outputs(target: Path) -> set[str]:
    names = {p.name for p in target.iterdir() if OUTPUT_NAMES.match(p.name)}
    return names | {name.split("/")[0] for name in _listed(target)}


def _link_tree(source: Path, dest: Path) -> None:
    if source.is_symlink():
        os.symlink(os.readlink(source), dest)
    elif source.is_dir():
        dest.mkdir()
        for child in source.iterdir():
            if not _STALE_FILE.match(child.name):
                _link_tree(child, dest / child.name)
    else:
        try:
            os.link(source, dest)
        except OSError:
            shutil.copy2(source, dest)


# ------------------------------------------------------------------------------ commit


def _commit(stage: Staging) -> None:
    """Make the staged folder the target; SIGINT held off until the swap is done."""
    written = sorted(
        str(p.relative_to(stage.path))
        for p in stage.path.rglob("*")
        if p.is_file() and p.relative_to(stage.path).parts[0] not in stage.carried
    )
    # every name wdanalysis ever wrote here, listed before the swap: a name listed whose
    # file is not (yet) there is harmless, it only says what not to carry over
    manifest = {"tool": "wdanalysis", "files": sorted(set(written) | _listed(stage.target))}
    write_text_atomic(manifest_of(stage.target), json.dumps(manifest, indent=1) + "\n")
    _fsync_dir(stage.path)
    main = threading.current_thread() is threading.main_thread()
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT}) if main else None
    try:
        kill_point("before-commit")
        ready = sibling(stage.target, "wdready")
        os.rename(stage.path, ready)  # the commit point: a whole result from here on
        kill_point("committed")
        _swap(ready, stage.target)
        kill_point("swapped")
    finally:
        if blocked is not None:
            try:
                signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
            except KeyboardInterrupt:
                raise OutputInterrupted(
                    f"{stage.shown or stage.target}: the new result was written whole"
                ) from None


def manifest_of(target: Path) -> Path:
    """``.<name>.wdfiles.json`` beside ``target``: the files wdanalysis wrote into it."""
    return target.parent / f".{target.name}.wdfiles.json"


def _listed(target: Path) -> set[str]:
    try:
        files = json.loads(manifest_of(target).read_bytes()[: 1 << 20]).get("files", [])
        return {str(name) for name in files}
    except (OSError, ValueError, AttributeError):
        return set()


def _swap(ready: Path, target: Path) -> None:
    """``ready`` becomes ``target``; the old folder (if any) goes to the trash, then away."""
    trash = sibling(target, "wdold")
    if target.exists() or target.is_symlink():
        os.rename(target, trash)
        kill_point("between-renames")
    os.rename(ready, target)
    _fsync_dir(target.parent)
    _remove(trash)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    elif path.exists():
        shutil.rmtree(path, ignore_errors=True)
