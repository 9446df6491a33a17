"""Train the dose study's main cell (paper dose, 500 steps: ``DemoSettings(seed=S)``) and keep
its checkpoints, for the decay-corrected Figure 2 (issue 36).

Each (seed, method) trains into ``OUT/paper_steps500_seedS/METHOD`` with the demo's
``train_one`` (its checkpoints carry ``decay_shrink.json``); a run whose ``accuracy.json``
exists is skipped, so the script resumes per run. Then ``python scripts/decay_figure.py OUT``
analyses whatever finished.

    OMP_NUM_THREADS=1 nice -n 10 python scripts/decay_train_main_cell.py runs/decay \
        --seeds 0 2 --methods ft dora lora
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from wdanalysis.demo.reproduction import ACCURACY_FILE, DemoSettings, train_one


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 5111])
    parser.add_argument("--methods", nargs="+", default=["ft", "dora", "lora"])
    args = parser.parse_args()
    for seed in args.seeds:
        for method in args.methods:
            run_dir = args.out / f"paper_steps500_seed{seed}" / method
            if (run_dir / ACCURACY_FILE).is_file():
                print(f"seed {seed} {method}: done already")
                continue
            started = time.perf_counter()
            train_one(run_dir, DemoSettings(seed=seed), method, progress=False)
            print(
                f"seed {seed} {method}: {(time.perf_counter() - started) / 60:.1f} min", flush=True
            )


if __name__ == "__main__":
    main()
