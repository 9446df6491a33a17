"""Where the engine's CPU goes: thread CPU seconds and bytes, by path.

The engine times each piece of work with :func:`time.thread_time` (the CPU time of the
thread doing it, so compute threads, the reader thread and the main thread add up to the
process's CPU time, whatever else runs on the machine) and files it under a path:

* ``"base"``: the base's own sums (``Σa²``), per GB of base weights;
* ``"ft"``: stored checkpoints (full fine-tuning, ``modules_to_save``), per GB read;
* ``"lora"`` / ``"dora"``: adapter updates, per GB of the base weights they change;
* ``"tokens"``: trainable-token rows;
* ``"read"``: the reader thread's reads (the kernel's copy out of the page cache), per GB.

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
        """Add the CPU time the calling thread spends inside the block to ``path``."""
        start = time.thread_time()
        try:
            yield
        finally:
            self.add(path, time.thread_time() - start, nbytes)

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


#: the profile of the engine run that finished last in this process (benchmarks read it)
last: CpuProfile | None = None
