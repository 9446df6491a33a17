"""The adapter sums without the update formed (``engine.adapter_sums``), the projection
kernel behind them, and the per-path CPU profile.

The reference forms ``W' = W0 + L@R`` in numpy ``longdouble`` and takes
``1 − cos = ½‖a/‖a‖ − b/‖b‖‖²`` per vector: nothing of the QR/projection rewriting.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from wdanalysis.engine import adapter_sums, cpu_profile
from wdanalysis.engine import c_kernel as kernel
from wdanalysis.engine.decomposition import accumulate_sums, change_from_sums

FUSED = kernel.load()


def reference(w0: torch.Tensor, left: torch.Tensor, right: torch.Tensor, mode: str):
    """ΔM and ΔD of ``w0 + left @ right`` in longdouble, vectors along rows or columns."""
    a = w0.double().numpy().astype(np.longdouble)
    d = left.numpy().astype(np.longdouble) @ right.numpy().astype(np.longdouble)
    b = a + d
    if mode == "cols":
        a, b = a.T, b.T
    na, nb = np.sqrt((a * a).sum(1)), np.sqrt((b * b).sum(1))
    one_minus_cos = 0.5 * ((a / na[:, None] - b / nb[:, None]) ** 2).sum(1)
    return float(np.abs(nb - na).mean()), float(one_minus_cos.mean())


def engine_like(w0, left, right, mode, block_rows=7):
    """The sums as the engine accumulates them: base blocks, the low-rank job, finish."""
    n_vec = w0.shape[0] if mode == "rows" else w0.shape[1]
    base = torch.zeros(3, n_vec, dtype=torch.float64)
    sums = torch.zeros(3, n_vec, dtype=torch.float64)
    job = adapter_sums.LowRankSums(left, right, mode)
    for start in range(0, w0.shape[0], block_rows):
        a = w0[start : start + block_rows]
        target = base[:, start : start + a.shape[0]] if mode == "rows" else base
        accumulate_sums(a, a, target, mode, True)
        job.add_block(a, start, sums)
    job.finish(sums, base[0])
    return change_from_sums(*sums)


def factors(rows, cols, r, seed, dtype=torch.bfloat16):
    gen = torch.Generator().manual_seed(seed)
    w0 = (torch.randn(rows, cols, generator=gen, dtype=torch.float64) * 0.02).to(dtype)
    left = torch.randn(rows, r, generator=gen, dtype=torch.float64) * 0.01
    right = torch.randn(r, cols, generator=gen, dtype=torch.float64) * 0.01
    return w0, left, right


def rel(x: float, y: float) -> float:
    return abs(x - y) / abs(y)


@pytest.mark.parametrize("mode", ["rows", "cols"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("r", [1, 5, 16, 19])
def test_low_rank_sums_match_the_formed_update(mode, dtype, r):
    w0, left, right = factors(45, 301, r, seed=r)  # non-square, rows not a multiple of 6
    left = left if mode == "rows" else left[:, :r]
    w0 = w0.to(dtype)
    dm, dd = reference(w0, left, right, mode)
    got = engine_like(w0, left, right, mode)
    assert rel(got.delta_d, dd) <= 1e-9 and rel(got.delta_m, dm) <= 1e-9


@pytest.mark.parametrize("mode", ["rows", "cols"])
@pytest.mark.parametrize("stretch", [0.0, 1e-2])
def test_tiny_turn_under_a_magnitude_change(mode, stretch):
    """1 − cos ≈ 1e-8 per vector, the update mostly along the base (PiSSA-like factors
    whose directions contain the base's rows): ΔD and ΔM to 1e-6."""
    gen = torch.Generator().manual_seed(7)
    rows, cols, extra = 12, 300, 4
    w0 = torch.randn(rows, cols, generator=gen, dtype=torch.float64) * 0.02
    if mode == "cols":
        w0 = w0.T.contiguous()  # vectors are the stored columns: the same 12 vectors
    noise = torch.randn(extra, cols, generator=gen, dtype=torch.float64) * 0.02
    right = torch.cat([w0 if mode == "rows" else w0.T, noise])  # (r, vector length)
    coef = torch.cat([stretch * torch.eye(rows), torch.zeros(rows, extra)], dim=1)
    coef = coef + 6e-5 * torch.randn(rows, rows + extra, generator=gen, dtype=torch.float64)
    left, right = (coef, right) if mode == "rows" else (right.T, coef.T)
    dm, dd = reference(w0, left, right, mode)
    assert 3e-9 < dd < 3e-8
    got = engine_like(w0, left.contiguous(), right.contiguous(), mode)
    assert rel(got.delta_d, dd) <= 1e-6 and rel(got.delta_m, dm) <= 1e-6


def test_ill_conditioned_factors_keep_the_norm():
    """A rank-2r update whose halves almost cancel (``B'A' − B₀A₀`` after little training):
    ‖d‖² through the QR is as accurate as forming d (the Gram form ``B (A Aᵀ) Bᵀ`` is off
    by ~6e-8 here), and ΔM/ΔD stay at 1e-6."""
    gen = torch.Generator().manual_seed(3)
    w0, left, right = factors(30, 200, 4, seed=3, dtype=torch.float32)
    right2 = torch.cat([right, right + 1e-8 * torch.randn(right.shape, generator=gen)])
    left2 = torch.cat([left * 1e3, -left * 1e3 * (1 + 1e-4)], dim=1)
    d = left2.numpy().astype(np.longdouble) @ right2.numpy().astype(np.longdouble)
    norms = torch.from_numpy((d * d).sum(1).astype(np.float64))
    job = adapter_sums.LowRankSums(left2, right2, "rows")
    assert ((job.dd - norms).abs() / norms).max() <= 1e-9
    dm, dd = reference(w0, left2, right2, "rows")
    got = engine_like(w0, left2, right2, "rows")
    assert rel(got.delta_d, dd) <= 1e-6 and rel(got.delta_m, dm) <= 1e-6


@pytest.mark.skipif(FUSED is None, reason="no C compiler")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(1, 1), (6, 255), (13, 257), (37, 1000)])
def test_projection_kernel_matches_torch(dtype, shape):
    if not FUSED.supports(dtype):
        pytest.skip(f"kernel built without {dtype}")
    gen = torch.Generator().manual_seed(1)
    wide = torch.randn(shape[0], shape[1] + 3, generator=gen).to(dtype)
    a = wide[:, : shape[1]]  # rows strided: lda > cols
    w = torch.randn(shape[1], 11, generator=gen, dtype=torch.float64)
    out = torch.full((shape[0], 16), 0.5, dtype=torch.float64)  # adds into what is there
    FUSED.project(a, kernel.pack_directions(w), out)
    want = a.double() @ w
    assert torch.allclose(out[:, :11] - 0.5, want, rtol=1e-12, atol=1e-12)
    assert torch.equal(out[:, 11:], torch.full((shape[0], 5), 0.5, dtype=torch.float64))


@pytest.mark.skipif(FUSED is None, reason="no C compiler")
def test_projection_kernel_refuses_what_it_would_misread():
    a = torch.zeros(4, 10, dtype=torch.bfloat16)
    packed = kernel.pack_directions(torch.zeros(10, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="packed"):
        FUSED.project(a, packed[:, :5], torch.zeros(4, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match="out"):
        FUSED.project(a, packed, torch.zeros(3, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match="contiguous"):
        FUSED.project(a.T, packed, torch.zeros(10, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match="2-D"):
        FUSED.project(a.long(), packed, torch.zeros(4, 8, dtype=torch.float64))


def test_torch_projection_gives_the_kernels_numbers(monkeypatch):
    w0, left, right = factors(20, 130, 6, seed=9)
    fused = engine_like(w0, left, right, "rows")
    monkeypatch.setattr(kernel, "load", lambda: None)
    plain = engine_like(w0, left, right, "rows")
    assert rel(plain.delta_d, fused.delta_d) <= 1e-12
    assert rel(plain.delta_m, fused.delta_m) <= 1e-12


def test_cpu_profile_sums_per_path():
    profile = cpu_profile.CpuProfile()
    with profile.timed("ft", 2_000_000_000):
        sum(i * i for i in range(20000))
    profile.add("read", 0.5, 1_000_000_000)
    table = profile.per_gb()
    assert table["read"] == {"core_s": 0.5, "gb": 1.0, "core_s_per_gb": 0.5}
    assert table["ft"]["gb"] == 2.0 and table["ft"]["core_s"] > 0


def test_engine_profile_counts_the_bytes_and_restores_torch_threads(tmp_path):
    import json

    from safetensors.torch import save_file

    from wdanalysis import compare

    gen = torch.Generator().manual_seed(0)
    key = "model.layers.0.self_attn.q_proj.weight"
    base = {key: torch.randn(48, 40, generator=gen).bfloat16()}
    for name, state in (("base", base), ("ft", {key: base[key] * 1.01})):
        (tmp_path / name).mkdir()
        save_file(state, str(tmp_path / name / "model.safetensors"))
        (tmp_path / name / "config.json").write_text(json.dumps({"model_type": "llama"}))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        compare(tmp_path / "base", tmp_path / "ft", progress=False)
        assert torch.get_num_threads() == 2  # one torch thread during the run only
    finally:
        torch.set_num_threads(before)
    table = cpu_profile.last.per_gb()
    assert round(table["ft"]["gb"] * 1e9) == 48 * 40 * 2 == round(table["base"]["gb"] * 1e9)
    assert round(table["read"]["gb"] * 1e9) == 2 * 48 * 40 * 2  # base and checkpoint
