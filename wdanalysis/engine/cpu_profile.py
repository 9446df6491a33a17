"""Where the engine's CPU goes: thread CPU seconds and bytes, by path.

The engine times each piece of work with :func:`time.thread_time` (the CPU time of the
thread doing it, so compute threads, the reader threads and the main thread add up to the
process's CPU time, whatever else runs on the machine) and files it under a path:

* ``"base"``: the base's own sums (``Σa²``), per GB of base weights;
* ``"ft"``: stored checkpoints (full fine-tuning, ``modules_to_save``), per GB read;
* ``"lora"`` / ``"dora"``: adapter updates, per GB of the base weights they change;
* ``"tokens"``: trainable-token rows;
* ``"read"``: the reader threads' reads (the kernel's copy out of the page cache), per GB.

Wall-clock ratios on a shared machine move with the other load; core-seconds per GB much
less. ``benchmarks/bench_streaming.py --profile`` prints them (``docs/guides/performance.md``).
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager


class CpuProfile:
    """Thread CPU seconds and bytes, summed per path (thread safe)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.bytes: dict[str, int] = defaultdict(int)
        self._lock = threading.Lock()

    def add(self, path: str, seconds: float, nbytes: int = 0) -> None:
        with self._lock:
            self.seconds[path] += seconds
            self.bytes[path] += nbytes

    @contextmanager
    def timed(self, path: str, nbytes: int = 0) -> Iterator[None]:
        """Add the CPU time the calling thread spends inside the block to ``path`` (and,
        while a :class:`Timeline` records, its wall-clock span)."""
        start, wall = time.thread_time(), time.perf_counter()
        try:
            yield
        finally:
            self.add(path, time.thread_time() - start, nbytes)
            if timeline is not None:
                timeline.record(path, wall, time.perf_counter(), nbytes)

    def per_gb(self) -> dict[str, dict[str, float]]:
        """``{path: {"core_s", "gb", "core_s_per_gb"}}`` (GB = 1e9 bytes)."""
        out = {}
        for path, seconds in sorted(self.seconds.items()):
            gb = self.bytes.get(path, 0) / 1e9
            out[path] = {
                "core_s": seconds,
                "gb": gb,
                "core_s_per_gb": seconds / gb if gb else float("nan"),
            }
        return out


def one_torch_thread(device) -> int | None:
    """Set torch's intra-op threads to 1 for an engine run on CPU; returns the number to
    restore (``None``: nothing changed).

    The engine's parallelism is its own workers (and the C kernel); its torch operations
    are small per-block ones, for which torch's OpenMP pool only wakes threads that then
    spin: measured on the busy 2-core VM, one worker with torch's 2 threads took 15-21 s
    and 4.2-5.7 core-s where one thread took 5.9 s and 1.8 core-s.
    """
    import torch

    threads = torch.get_num_threads()
    if getattr(device, "type", str(device)) != "cpu" or threads == 1:
        return None
    torch.set_num_threads(1)
    return threads


@contextmanager
def caller_threads(threads: int | None) -> Iterator[None]:
    """Run the block with torch's intra-op threads back at the caller's ``threads`` (the
    number :func:`one_torch_thread` returned; ``None``: nothing was changed).

    For a whole-matrix merge that reproduces another library's float32 computation (PEFT's
    PiSSA/OLoRA/KaSA init recomputed by an SVD or QR, C3A's FFT, PSOFT's SVD, …): MKL's
    float32 SVD, QR and FFT round differently with 1 and 2 threads (a few 1e-7 of the
    result), so the engine's own choice of one thread must not change what is reproduced.
    With the caller's setting, the merge is PEFT's own under the same settings (bit for bit
    the training process's where it ran on this machine with the same thread count).
    """
    if threads is None:
        yield
        return
    import torch

    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(1)


def restore_torch_threads(threads: int | None) -> None:
    if threads is not None:
        import torch

        torch.set_num_threads(threads)


class Timeline:
    """Wall-clock spans by thread (read, wait, compute by path), for finding where a run's
    time goes; recorded only while :data:`timeline` is set (the benchmark's ``--timeline``).
    """

    def __init__(self) -> None:
        self.origin = time.perf_counter()
        self.events: list[tuple[str, str, float, float, int]] = []
        self._lock = threading.Lock()

    def record(self, kind: str, start: float, end: float, nbytes: int = 0) -> None:
        """One span of the calling thread, ``start``/``end`` from :func:`time.perf_counter`."""
        name = threading.current_thread().name
        with self._lock:
            self.events.append((name, kind, start - self.origin, end - self.origin, nbytes))

    def busy(self) -> dict[str, dict[str, float]]:
        """Seconds of wall clock per thread and kind (spans of one kind do not overlap
        within a thread)."""
        out: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        for name, kind, start, end, _ in self.events:
            out[name][kind] += end - start
        return {name: dict(kinds) for name, kinds in out.items()}


#: set to a :class:`Timeline` to record the spans of the next engine runs (None: off)
timeline: Timeline | None = None

#: the profile of the engine run that finished last in this process (benchmarks read it)
last: CpuProfile | None = None
