"""Host memory per rank while loading under ``--fsdp`` (2 CPU ranks, gloo) against one process.

One command::

    python benchmarks/bench_fsdp_memory.py            # BERT of ~330 MB (float32), DoRA
    python benchmarks/bench_fsdp_memory.py --layers 4 # smaller, quicker

It writes a BERT classifier of random weights (hidden 768, ``--layers`` blocks, the
MiniLM tokenizer's 30522-word vocabulary) as ``model.safetensors``, then trains DoRA for 2
steps with the real command line twice: one process, and ``torchrun --nproc_per_node 2 ...
--fsdp``. A wrapper records each process's resident memory after the imports and its peak
(``VmHWM``) when the first training step starts (the model loaded, adapted and sharded,
every local weight touched once: ``from_pretrained`` maps the file, and mapped pages
count only once read) and when the second starts (one step taken, every FSDP unit
all-gathered once). Results (peaks, growth over the post-import baseline, ratios to one
process, the largest difference between the two runs' saved adapters) go to
``benchmarks/results/bench_fsdp_memory.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "bench_fsdp_memory.json"
REPO = Path(__file__).resolve().parents[1]
# glibc's default threshold grows to 32 MiB once a big block is freed, after which freed
# FSDP all-gather buffers stay in the heap and RSS only grows; fixed, they go back to the
# OS. Set for both runs alike.
MMAP_THRESHOLD = 1 << 20
WRAPPER = """
import json, os, sys
def kib(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
import torch, transformers
import transformers.models.bert.modeling_bert  # model code is ~130 MB of RSS by itself
from wdanalysis.train import loop
baseline, calls = kib("VmRSS"), []
real = loop.training_step
def recorded(*args, **kwargs):
    if not calls:  # make every weight resident (from_pretrained maps the file lazily)
        with torch.no_grad():
            for p in args[0].parameters():
                (p.to_local() if hasattr(p, "to_local") else p).sum()
    if len(calls) < 2:  # before step 1 (loaded) and before step 2 (one step taken)
        rank = os.environ.get("RANK", "0")
        path = os.path.join(os.environ["MEM_OUT"], f"rank{rank}.json")
        record = json.load(open(path)) if calls else {"baseline_kib": baseline}
        record["loaded_kib" if not calls else "stepped_kib"] = kib("VmHWM")
        with open(path, "w") as f:
            json.dump(record, f)
    calls.append(1)
    return real(*args, **kwargs)
loop.training_step = recorded
from wdanalysis.cli import main
raise SystemExit(main(sys.argv[1:]))
"""


def write_model(folder: Path, layers: int) -> int:
    """A random BERT classifier saved like ``save_pretrained``; returns its bytes."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from wdanalysis.demo.reproduction import model_path

    tokenizer = AutoTokenizer.from_pretrained(model_path(), local_files_only=True)
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=768,
        num_hidden_layers=layers,
        num_attention_heads=12,
        intermediate_size=3072,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=2,
    )
    torch.manual_seed(0)
    BertForSequenceClassification(config).save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return (folder / "model.safetensors").stat().st_size


def train_args(model: Path, data: Path, out: Path) -> list[str]:
    return [
        *("train", "--method", "dora", "--model", str(model), "--data", str(data)),
        *("--out", str(out), "--max-steps", "2", "--batch-size", "4", "--max-length", "16"),
        *("--target-modules", "query,value", "--device", "cpu", "--no-progress"),
    ]


def run(command: list[str], mem_out: Path) -> None:
    mem_out.mkdir(parents=True)
    env = {**os.environ, "PYTHONPATH": str(REPO), "MEM_OUT": str(mem_out), "OMP_NUM_THREADS": "1"}
    env["MALLOC_MMAP_THRESHOLD_"] = str(MMAP_THRESHOLD)
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(f"failed: {' '.join(command)}\n{done.stderr[-4000:]}")


def adapter_difference(one: Path, two: Path) -> float:
    from safetensors.torch import load_file

    name = "checkpoint-2/adapter_model.safetensors"
    a, b = load_file(str(one / name)), load_file(str(two / name))
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model_bytes = write_model(root / "model", args.layers)
        rows = [{"text": f"a {w} day number {i}", "label": i % 2} for i in range(16) for w in "ab"]
        data = root / "data.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        wrapper = root / "wrapper.py"
        wrapper.write_text(WRAPPER)
        single = train_args(root / "model", data, root / "one")
        run([sys.executable, str(wrapper), *single], root / "mem_one")
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        sharded = train_args(root / "model", data, root / "two") + ["--fsdp"]
        run([*launcher, "--nproc_per_node", "2", str(wrapper), *sharded], root / "mem_two")
        one = json.loads((root / "mem_one" / "rank0.json").read_text())
        ranks = [json.loads((root / "mem_two" / f"rank{r}.json").read_text()) for r in (0, 1)]
        difference = adapter_difference(root / "one", root / "two")

    def mib(kib: int) -> float:
        return round(kib / 1024, 1)

    def part(m: dict, name: str) -> dict:
        grown = {k: m[f"{k}_kib"] - m["baseline_kib"] for k in ("loaded", "stepped")}
        record = {f"{k}_peak_mib": mib(m[f"{k}_kib"]) for k in ("loaded", "stepped")}
        record.update({f"{k}_growth_mib": mib(v) for k, v in grown.items()})
        if name != "one":
            for k, v in grown.items():
                base = one[f"{k}_kib"] - one["baseline_kib"]
                record[f"{k}_growth_over_one_process"] = round(v / base, 3)
        return record

    record = {
        "machine": f"{platform.machine()}, {platform.system()}, python {platform.python_version()}",
        "model": f"BertForSequenceClassification, hidden 768, {args.layers} layers, float32",
        "model_file_mib": round(model_bytes / 2**20, 1),
        "method": "dora on query,value; 2 steps, global batch 4",
        "measure": "VmHWM (peak resident memory) before step 1 (loaded: model read, adapted, "
        "sharded, every local weight touched so that mapped pages count) and before step 2 "
        "(one forward/backward/update taken, FSDP all-gathers included); growth = peak minus "
        "VmRSS after importing torch, transformers, the BERT model code and "
        "wdanalysis.train",
        "malloc_mmap_threshold_bytes": MMAP_THRESHOLD,
        "one_process": part(one, "one"),
        "fsdp_2_ranks": [{"rank": r, **part(m, "rank")} for r, m in enumerate(ranks)],
        "adapter_max_abs_difference_after_training": difference,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
