"""The per-vector sums ``Σa², Σa·d, Σd²`` of one block: fused C kernel vs numba vs torch.

One command::

    python benchmarks/bench_kernel.py          # numba timed only where it is importable

Times (best of ``--repeat``) the three float64 one-pass implementations on a bf16 and an
fp32 (4096 × 4096) block, vectors along rows, ``d = b − a``: the C kernel of
:mod:`wdanalysis.engine.c_kernel`, an equivalent numba ``@njit`` loop (bf16 widened by
shifting its bits, as the C code does), and the torch float64 path. It checks that all
three agree to 1e-9 relative (summation orders differ) and writes
``benchmarks/results/bench_kernel.json``. It decides whether the C kernel is kept: numba
would replace it only if it were as fast.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from wdanalysis.engine import c_kernel
from wdanalysis.engine.decomposition import accumulate_sums

RESULTS = Path(__file__).resolve().parent / "results" / "bench_kernel.json"


def _numba_kernel():
    try:
        import numba
    except ImportError:
        return None, None

    @numba.njit(cache=False, fastmath=False)
    def rows_f32(a, b, out):
        for i in range(a.shape[0]):
            s0 = s1 = s2 = 0.0
            for j in range(a.shape[1]):
                x = np.float64(a[i, j])
                d = np.float64(b[i, j]) - x
                s0 += x * x
                s1 += x * d
                s2 += d * d
            out[0, i] += s0
            out[1, i] += s1
            out[2, i] += s2

    @numba.njit(cache=False, fastmath=False)
    def rows_bf16(a, b, out):  # a, b: uint16 bit patterns
        row_a = np.empty(a.shape[1], np.uint32)
        row_b = np.empty(a.shape[1], np.uint32)
        for i in range(a.shape[0]):
            for j in range(a.shape[1]):
                row_a[j] = np.uint32(a[i, j]) << 16
                row_b[j] = np.uint32(b[i, j]) << 16
            fa, fb = row_a.view(np.float32), row_b.view(np.float32)
            s0 = s1 = s2 = 0.0
            for j in range(a.shape[1]):
                x = np.float64(fa[j])
                d = np.float64(fb[j]) - x
                s0 += x * x
                s1 += x * d
                s2 += d * d
            out[0, i] += s0
            out[1, i] += s1
            out[2, i] += s2

    return numba.__version__, {torch.float32: rows_f32, torch.bfloat16: rows_bf16}


def _best(fn, repeat: int) -> float:
    fn()  # warm-up (numba compiles here)
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)  # one core each: the engine runs one kernel per worker
    numba_version, numba_fns = _numba_kernel()
    results = {"cpu": platform.processor() or platform.machine(), "numba": numba_version}
    results["c_kernel"] = c_kernel.describe()
    for dtype in (torch.bfloat16, torch.float32):
        gen = torch.Generator().manual_seed(0)
        a = torch.randn(args.size, args.size, generator=gen).to(dtype)
        b = (a.float() + 1e-3 * torch.randn(a.shape, generator=gen)).to(dtype)
        gb = 2 * a.numel() * a.element_size() / 1e9
        sums = {}
        timings = {}

        def run(backend, dtype=dtype, a=a, b=b, sums=sums):
            sums[backend] = torch.zeros(3, a.shape[0], dtype=torch.float64)
            accumulate_sums(a, b, sums[backend], "rows", True, backend)

        timings["torch"] = _best(lambda: run("torch"), args.repeat)
        if c_kernel.load() is not None:
            timings["fused C"] = _best(lambda: run("fused"), args.repeat)
        if numba_fns is not None:
            raw = (lambda t: t.view(torch.uint16).numpy()) if dtype == torch.bfloat16 else None
            na, nb = (raw(a), raw(b)) if raw else (a.numpy(), b.numpy())

            def run_numba(na=na, nb=nb, fn=numba_fns[dtype], sums=sums):
                sums["numba"] = torch.zeros(3, na.shape[0], dtype=torch.float64)
                fn(na, nb, sums["numba"].numpy())

            timings["numba"] = _best(run_numba, args.repeat)
        for name, got in sums.items():
            assert torch.allclose(got, sums["torch"], rtol=1e-9, atol=0), name
        name = str(dtype).replace("torch.", "")
        results[name] = {k: {"seconds": t, "GB_per_s": gb / t} for k, t in timings.items()}
        print(name, {k: f"{gb / t:.2f} GB/s" for k, t in timings.items()})
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
