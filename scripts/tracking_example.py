"""Draw ``figures/tracking_example.png``: ΔM/ΔD trajectories from live tracking, no checkpoint.

Trains the demo model (all-MiniLM-L6-v2) with the bundled trainer for FT, LoRA and DoRA,
``--track-every 2`` and no saved checkpoint, then plots the three tracking tables::

    python scripts/tracking_example.py [--steps 30] [--out figures/tracking_example.png]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import pandas as pd

from wdanalysis.atomic import save_figure_atomic
from wdanalysis.cli import main as cli
from wdanalysis.demo import model_path
from wdanalysis.plotting import plot_trajectories
from wdanalysis.report import read_table

LR = {"ft": "5e-5", "lora": "1e-3", "dora": "1e-3"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--every", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("figures/tracking_example.png"))
    args = parser.parse_args()
    tables = []
    with tempfile.TemporaryDirectory(prefix="tracking_example_") as tmp:
        for method in ("ft", "lora", "dora"):
            run = Path(tmp) / method.upper().replace("ORA", "oRA")
            argv = ["train", "--method", method, "--model", str(model_path()), "--out", str(run)]
            argv += ["--data", "builtin:tweets", "--max-steps", str(args.steps), "--lr", LR[method]]
            argv += ["--batch-size", "8", "--track-every", str(args.every), "--no-progress"]
            if cli(argv) != 0:
                raise SystemExit(f"training {method} failed")
            tables.append(read_table(run / "tracking.csv"))
    deltas = pd.concat(tables, ignore_index=True)
    figure = plot_trajectories(deltas, module="query", figsize=(9, 4.2))
    figure.suptitle(f"live tracking (query), every {args.every} steps, no checkpoint saved")
    save_figure_atomic(figure, args.out, dpi=80)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
