"""Peak memory of ``compare`` where whole matrices used to be built: a bf16
``modules_to_save`` ``lm_head`` of 128k × 4096 beside a 7B-shaped layer.

One command::

    python benchmarks/bench_memory.py                      # this checkout
    python benchmarks/bench_memory.py --before /work/main  # and another checkout, to compare

It writes under ``--workdir`` a bf16 base (``lm_head`` ``(128000, 4096)``, ``q_proj`` and
``v_proj`` ``(4096, 4096)``, ``gate_proj``/``up_proj`` ``(11008, 4096)``, ``down_proj``
``(4096, 11008)``: 1.4 GB), a full fine-tuned checkpoint of the same shapes, and a PEFT
adapter (LoRA r = 16 on q/v, ``lm_head`` in ``modules_to_save``: 1.05 GB of it). Each case
runs ``compare`` on every one of these weights in a fresh subprocess, whose peak RSS is its
``VmHWM`` (``ru_maxrss`` alike; anonymous and file-backed RSS sampled every 20 ms as in
``bench_streaming.py``): FT alone, the adapter alone, both together. The goal is < 1 GiB,
as for everything else the engine streams. Two more cases compare a full fine-tuned
mixture-of-experts stack ``(8, 11008, 4096)`` (one stored row per expert: 361 MB in
float64) with its base, with the fused kernel and with the torch path.
Results: ``benchmarks/results/bench_memory.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
from bench_streaming import RssSampler, write_safetensors

RESULTS = Path(__file__).resolve().parent / "results" / "bench_memory.json"
SHAPES = {
    "lm_head.weight": (128000, 4096),
    "model.layers.0.self_attn.q_proj.weight": (4096, 4096),
    "model.layers.0.self_attn.v_proj.weight": (4096, 4096),
    "model.layers.0.mlp.gate_proj.weight": (11008, 4096),
    "model.layers.0.mlp.up_proj.weight": (11008, 4096),
    "model.layers.0.mlp.down_proj.weight": (4096, 11008),
}
MODULES = ["lm_head", "q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"]
CASES = {
    "ft": ["ft"],
    "adapter": ["adapter"],
    "ft+adapter": ["ft", "adapter"],
    "ft experts": ["ft-experts"],
    "ft experts, torch path": ["ft-experts"],  # WDANALYSIS_NO_CKERNEL=1: float64 torch sums
}
EXPERTS = ("model.layers.0.block_sparse_moe.switch_mlp.gate_proj.weight", (8, 11008, 4096))
RANK = 16


def _randn(shape, seed: int, std: float = 0.02) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=gen) * std).to(torch.bfloat16)


def _moved(shape, seed: int) -> torch.Tensor:
    w = _randn(shape, seed).float()
    return (w + _randn(shape, seed + 100, 0.002).float()).to(torch.bfloat16)


def generate(work: Path) -> None:
    """The base, the FT checkpoint and the adapter (skipped when already there)."""
    if not (work / "ft-experts" / "model.safetensors").is_file():
        for name, make in (("base-experts", _randn), ("ft-experts", _moved)):
            key, shape = EXPERTS
            items = [(key, shape, torch.bfloat16, lambda f=make: f(EXPERTS[1], 50))]
            write_safetensors(work / name / "model.safetensors", items)
    if (work / "adapter" / "adapter_model.safetensors").is_file():
        return
    config = json.dumps({"model_type": "llama", "hidden_size": 4096, "num_hidden_layers": 1})
    for name, make in (("base", _randn), ("ft", _moved)):
        items = [
            (key, shape, torch.bfloat16, lambda s=shape, i=i, f=make: f(s, i))
            for i, (key, shape) in enumerate(SHAPES.items())
        ]
        write_safetensors(work / name / "model.safetensors", items)
        (work / name / "config.json").write_text(config)
    prefix = "base_model.model."
    items = [
        (
            prefix + "lm_head.weight",
            SHAPES["lm_head.weight"],
            torch.bfloat16,
            lambda: _moved(SHAPES["lm_head.weight"], 0),
        )
    ]
    for i, leaf in enumerate(("q_proj", "v_proj")):
        out, inp = SHAPES[f"model.layers.0.self_attn.{leaf}.weight"]
        stem = f"{prefix}model.layers.0.self_attn.{leaf}"
        items += [
            (
                stem + ".lora_A.weight",
                (RANK, inp),
                torch.float32,
                lambda i=i, n=inp: _randn((RANK, n), 10 + i).float(),
            ),
            (
                stem + ".lora_B.weight",
                (out, RANK),
                torch.float32,
                lambda i=i, n=out: _randn((n, RANK), 20 + i).float(),
            ),
        ]
    write_safetensors(work / "adapter" / "adapter_model.safetensors", items)
    adapter_config = {
        "peft_type": "LORA",
        "r": RANK,
        "lora_alpha": 2 * RANK,
        "target_modules": ["q_proj", "v_proj"],
        "modules_to_save": ["lm_head"],
        "base_model_name_or_path": str(work / "base"),
    }
    (work / "adapter" / "adapter_config.json").write_text(json.dumps(adapter_config))


def run_child(work: Path, case: str) -> None:
    from wdanalysis import compare

    sampler = RssSampler()
    start = time.perf_counter()
    experts = case.startswith("ft experts")
    table = compare(
        work / ("base-experts" if experts else "base"),
        [work / r for r in CASES[case]],
        modules=["gate_proj"] if experts else MODULES,
        progress=False,
    )
    seconds = time.perf_counter() - start
    peak = sampler.stop()
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    result = {
        "rows": len(table),
        "seconds": seconds,
        "ru_maxrss": maxrss,
        **peak,
        "backend": table.attrs.get("backend", "not recorded"),
    }
    print("RESULT " + json.dumps(result))


def measure(work: Path, case: str, pythonpath: str) -> dict:
    env = {**os.environ, "PYTHONPATH": pythonpath}
    if "torch path" in case:
        env["WDANALYSIS_NO_CKERNEL"] = "1"
    cmd = [sys.executable, __file__, "--child", case, "--workdir", str(work)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    line = next((ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if done.returncode or line is None:
        return {"error": (done.stderr.strip().splitlines() or ["no output"])[-1]}
    return json.loads(line[len("RESULT ") :])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/wdanalysis-bench-memory"))
    parser.add_argument("--before", help="another checkout to measure too (its root folder)")
    parser.add_argument("--child", choices=sorted(CASES))
    args = parser.parse_args()
    if args.child:
        return run_child(args.workdir, args.child)
    generate(args.workdir)
    here = str(Path(__file__).resolve().parent.parent)
    trees = {"this checkout": here, **({"before": args.before} if args.before else {})}
    results = {"shapes": {k: list(v) for k, v in SHAPES.items()}, "goal_bytes": 1 << 30}
    for tree, path in trees.items():
        results[tree] = {}
        for case in CASES:
            res = results[tree][case] = measure(args.workdir, case, path)
            peak = res.get("VmHWM")
            text = f"{peak / 2**20:7.0f} MiB peak RSS, {res['seconds']:.1f} s" if peak else res
            print(f"{tree:<14} {case:<23} {text}")
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
