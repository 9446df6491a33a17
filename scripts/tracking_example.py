"""Draw ``figures/tracking_example.png``: ΔM/ΔD trajectories from live tracking, no checkpoint.

Trains the demo model (all-MiniLM-L6-v2) with the bundled trainer for FT, LoRA and DoRA,
``--track-every 2`` and no saved checkpoint, then plots the three tracking tables::

    python scripts/tracking_example.py [--steps 30] [--out figures/tracking_example.png]
    python scripts/tracking_example.py --tiny   # a 4-layer, 64-wide BERT: seconds, not minutes
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import pandas as pd

from wdanalysis.cli import main as cli
from wdanalysis.demo.reproduction import model_path
from wdanalysis.plots.figures import plot_trajectories
from wdanalysis.storage.atomic_write import save_figure_atomic
from wdanalysis.table.schema import read_table

LR = {"ft": "5e-5", "lora": "1e-3", "dora": "1e-3"}


def _tiny_bert(folder: Path) -> Path:
    """A small randomly initialised BERT with the demo model's tokenizer."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    tokenizer = AutoTokenizer.from_pretrained(model_path())
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=128,
        num_labels=2,
    )
    BertForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--every", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("figures/tracking_example.png"))
    parser.add_argument("--tiny", action="store_true", help="a small BERT instead of MiniLM")
    args = parser.parse_args()
    tables = []
    with tempfile.TemporaryDirectory(prefix="tracking_example_") as tmp:
        model = _tiny_bert(Path(tmp) / "tiny") if args.tiny else model_path()
        for method in ("ft", "lora", "dora"):
            run = Path(tmp) / method.upper().replace("ORA", "oRA")
            argv = ["train", "--method", method, "--model", str(model), "--out", str(run)]
            argv += ["--data", "builtin:tweets", "--max-steps", str(args.steps), "--lr", LR[method]]
            argv += ["--batch-size", "8", "--track-every", str(args.every), "--no-progress"]
            if cli(argv) != 0:
                raise SystemExit(f"training {method} failed")
            tables.append(read_table(run / "tracking.csv"))
    deltas = pd.concat(tables, ignore_index=True)
    figure = plot_trajectories(deltas, module="query", figsize=(9, 4.2))
    name = "a 4-layer BERT" if args.tiny else "all-MiniLM-L6-v2"
    figure.suptitle(f"live tracking of {name} (query), every {args.every} steps, no checkpoint")
    save_figure_atomic(figure, args.out, dpi=80)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
