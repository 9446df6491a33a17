"""Named moments at which a test may kill the process (``kill -9``), to prove that output
folders survive it: ``WDANALYSIS_TEST_KILL_AT=<point>[:<n>]`` sends SIGKILL to this
process the ``n``-th time (default 1st) ``point`` is reached. Unset, it costs one lookup."""

from __future__ import annotations

import os
import signal

_SEEN: dict[str, int] = {}


def kill_point(point: str) -> None:
    """SIGKILL this process here when ``WDANALYSIS_TEST_KILL_AT`` names ``point``."""
    wanted = os.environ.get("WDANALYSIS_TEST_KILL_AT")
    if not wanted:
        return
    name, _, count = wanted.partition(":")
    if name != point:
        return
    _SEEN[point] = _SEEN.get(point, 0) + 1
    if _SEEN[point] == int(count or 1):
        os.kill(os.getpid(), signal.SIGKILL)
