"""A short, deterministic pass of the parser fuzzer (``tests/fuzz_parsers.py``).

Each target gets a few dozen hypothesis inputs: every one must parse cleanly or raise a
one-line :class:`WDAnalysisError` naming the file. Run the script itself for a long fuzz.
"""

from __future__ import annotations

import fuzz_parsers
import pytest

EXAMPLES = {
    "safetensors_structured": 80,
    "safetensors_mutated": 80,
    "safetensors_bytes": 40,
    "shard_index": 60,
    "adapter_config": 80,
    "adapter_keys": 40,
    "bin_file": 60,
}


@pytest.mark.parametrize("target", sorted(fuzz_parsers.TARGETS))
def test_parser_fuzz_short(target):
    before = sum(fuzz_parsers.STATS.get(target, {}).values())
    fuzz_parsers.run_target(target, EXAMPLES[target])  # derandomized: same inputs every run
    seen = fuzz_parsers.STATS[target]
    assert sum(seen.values()) - before >= EXAMPLES[target] // 2  # hypothesis really ran
    assert seen.get("clear error", 0) > 0  # the bad inputs were reached and refused


def test_fuzz_targets_are_all_scheduled():
    assert set(EXAMPLES) == set(fuzz_parsers.TARGETS)
