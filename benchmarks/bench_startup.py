"""Start-up time of the command line: ``wdanalysis --help`` and ``compare``/``train``/``demo
--help`` (goal: each < 0.3 s, none importing torch or transformers).

One command::

    python benchmarks/bench_startup.py            # best of 5 fresh interpreters per command
    PYTHONPATH=/path/to/other/checkout python benchmarks/bench_startup.py   # compare trees

For each command it prints the best wall time over ``--repeat`` fresh interpreters, the
cumulative import time of ``wdanalysis`` that ``python -X importtime`` reports, and whether
torch, pandas, scipy, matplotlib or the demo were imported. Results go to
``benchmarks/results/bench_startup.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "bench_startup.json"
COMMANDS = (["--help"], ["compare", "--help"], ["train", "--help"], ["demo", "--help"])
WATCHED = (
    "torch",
    "transformers",
    "pandas",
    "scipy",
    "matplotlib",
    "wdanalysis.demo",
    "wdanalysis.train",
)
_RUN = (
    "import sys\nfrom wdanalysis.cli import main\n"
    "try:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
)


def _wall(argv: list[str], repeat: int, cwd: Path) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        subprocess.run(
            [sys.executable, "-c", _RUN, *argv], capture_output=True, check=True, cwd=cwd
        )
        best = min(best, time.perf_counter() - start)
    return best


def _imports(argv: list[str], cwd: Path) -> tuple[float, list[str]]:
    """Cumulative import seconds of the top-level modules, and the watched ones imported."""
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", _RUN, *argv],
        capture_output=True,
        text=True,
        check=True,
        cwd=cwd,
    )
    total, seen = 0, set()
    for line in done.stderr.splitlines():
        parts = line.split("|")
        if not line.startswith("import time:") or len(parts) != 3 or not parts[1].strip().isdigit():
            continue
        name = parts[2].strip()
        if len(parts[2]) - len(parts[2].lstrip()) == 1:  # not nested: counted once
            total += int(parts[1])
        seen.add(name)
    watched = [w for w in WATCHED if any(m == w or m.startswith(w + ".") for m in seen)]
    return total / 1e6, watched


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    import wdanalysis

    # ``python -c`` puts the working folder first on sys.path: run where the measured
    # checkout is, so that PYTHONPATH=other/checkout measures that one.
    cwd = Path(wdanalysis.__file__).resolve().parents[1]
    results = {
        "package": str(Path(wdanalysis.__file__).parent),
        "machine": f"{platform.machine()}, {platform.system()}, python {platform.python_version()}",
        "commands": [],
    }
    for argv in COMMANDS:
        wall = _wall(argv, args.repeat, cwd)
        imports, watched = _imports(argv, cwd)
        row = {"argv": argv, "best_wall_s": round(wall, 3), "import_s": round(imports, 3)}
        row["imported"] = watched
        results["commands"].append(row)
        print(
            f"wdanalysis {' '.join(argv):<16} best {wall:6.3f} s  imports {imports:6.3f} s  "
            f"heavy: {', '.join(watched) or 'none'}"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
