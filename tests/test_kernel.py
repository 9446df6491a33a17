"""Accuracy pin of the ΔM/ΔD kernel and of the streaming engine.

The reference is written differently from the kernel: numpy ``longdouble`` (80-bit on
x86), ``1 − cos = ½‖a/‖a‖ − b/‖b‖‖²`` per vector, no use of ``d = b − a``.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from wdanalysis import compare
from wdanalysis.engine import c_kernel as kernel
from wdanalysis.engine import streaming
from wdanalysis.engine.decomposition import decomposition_change

BACKENDS = ["torch"] + (["fused"] if kernel.load() is not None else [])
DTYPES = [torch.bfloat16, torch.float16, torch.float32, torch.float64]


def reference(w0: torch.Tensor, wt: torch.Tensor, axis: str, transposed: bool = False):
    """ΔM, ΔD, zero-norm count in longdouble, vectors along the requested axis."""
    a = w0.double().numpy().astype(np.longdouble)
    b = wt.double().numpy().astype(np.longdouble)
    if transposed:
        a, b = a.T, b.T
    if axis == "in":
        a, b = a.T, b.T
    na = np.sqrt((a * a).sum(axis=1))
    nb = np.sqrt((b * b).sum(axis=1))
    ok = (na > 0) & (nb > 0)
    ua = a[ok] / na[ok, None]
    ub = b[ok] / nb[ok, None]
    one_minus_cos = 0.5 * ((ua - ub) ** 2).sum(axis=1)
    return np.abs(nb - na).mean(), one_minus_cos.mean(), int((~ok).sum())


def tiny_turn(shape, dtype, target: float, seed: int, stretch: float = 0.0):
    """(w0, wt) in ``dtype`` whose per-row 1−cos is about ``target`` (down to 1e-8).

    ``stretch`` adds a pure magnitude change ``wt ≈ (1+stretch)·w0``: the case where the
    update is mostly parallel to w0 and naive formulas cancel catastrophically.
    """
    gen = torch.Generator().manual_seed(seed)
    w0 = (torch.randn(shape, generator=gen, dtype=torch.float64) * 0.02).to(dtype)
    base = w0.double()
    noise = torch.randn(shape, generator=gen, dtype=torch.float64)
    noise -= (noise * base).sum(1, keepdim=True) / (base * base).sum(1, keepdim=True) * base
    scale = (2 * target) ** 0.5 * base.norm(dim=1, keepdim=True) / noise.norm(dim=1, keepdim=True)
    wt = ((1 + stretch) * base + scale * noise).to(dtype)
    return w0, wt


def rel(actual: float, expected: float) -> float:
    return abs(actual - expected) / abs(expected)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("axis", ["out", "in"])
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("target", [1e-8, 1e-6, 1e-3])
def test_matches_longdouble_reference(backend, dtype, axis, transposed, target):
    shape = (37, 1500)  # non-square, so a wrong axis cannot pass
    w0, wt = tiny_turn(shape, torch.float64, target, seed=1)
    if transposed:
        w0, wt = w0.T.contiguous(), wt.T.contiguous()
    w0, wt = w0.to(dtype), wt.to(dtype)  # axis "in": the random turn moves columns too
    dm, dd, zero = reference(w0, wt, axis, transposed)
    if dd == 0 or (axis == "out" and dd < 1e-9 and dtype in (torch.bfloat16, torch.float16)):
        pytest.skip("the low-precision storage rounded this update away")
    got = decomposition_change(w0, wt, axis, transposed, backend=backend)
    assert got.zero_norm_vectors == zero == 0
    assert rel(got.delta_d, float(dd)) <= 1e-6
    assert rel(got.delta_m, float(dm)) <= 1e-6


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("stretch", [1e-3, 1e-2])
def test_magnitude_change_does_not_swamp_a_tiny_turn(backend, dtype, stretch):
    """ΔD = 1e-8 under a 1% magnitude change: ‖d‖² − Δm² cancels 1e4-fold here."""
    w0, wt = tiny_turn((24, 3000), dtype, 1e-8, seed=2, stretch=stretch)
    dm, dd, _ = reference(w0, wt, "out")
    got = decomposition_change(w0, wt, "out", backend=backend)
    assert 3e-9 < dd < 3e-8
    assert rel(got.delta_d, float(dd)) <= 1e-6
    assert rel(got.delta_m, float(dm)) <= 1e-6


def test_naive_float32_formula_fails_where_the_kernel_holds():
    """Documents why the kernel exists: naive f32 ``1 − a·b/(‖a‖‖b‖)`` is far off at 1e-8."""
    w0, wt = tiny_turn((64, 4096), torch.bfloat16, 1e-8, seed=3)
    _, dd, _ = reference(w0, wt, "out")
    a, b = w0.float(), wt.float()
    naive = (1 - (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))).mean().item()
    assert rel(naive, float(dd)) > 1e-2
    assert rel(decomposition_change(w0, wt).delta_d, float(dd)) <= 1e-6


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("axis", ["out", "in"])
def test_zero_norm_vectors_are_counted_not_nan(backend, axis):
    w0, wt = tiny_turn((6, 50), torch.float32, 1e-4, seed=4)
    w0[2] = 0  # a zero row of the base
    wt[4] = 0  # a row the fine-tune zeroed
    w0[:, 7] = 0  # a zero column of the base (zero vector on axis "in")
    dm, dd, zero = reference(w0, wt, axis)
    got = decomposition_change(w0, wt, axis, backend=backend)
    assert np.isfinite(got.delta_d) and np.isfinite(got.delta_m)
    assert got.zero_norm_vectors == zero > 0
    assert rel(got.delta_d, float(dd)) <= 1e-6 and rel(got.delta_m, float(dm)) <= 1e-6


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    rows=st.integers(1, 40),
    cols=st.integers(1, 300),
    dtype=st.sampled_from(DTYPES),
    scale=st.sampled_from([1e-3, 1.0, 1e3]),
    step=st.floats(1e-4, 0.3),
    axis=st.sampled_from(["out", "in"]),
    transposed=st.booleans(),
    backend=st.sampled_from(BACKENDS),
    seed=st.integers(0, 2**31 - 1),
)
def test_property_random_matrices(rows, cols, dtype, scale, step, axis, transposed, backend, seed):
    gen = torch.Generator().manual_seed(seed)
    w0 = (torch.randn(rows, cols, generator=gen, dtype=torch.float64) * scale).to(dtype)
    wt = (w0.double() + step * scale * torch.randn(rows, cols, generator=gen)).to(dtype)
    got = decomposition_change(w0, wt, axis, transposed, backend=backend)
    dm, dd, zero = reference(w0, wt, axis, transposed)
    assert got.zero_norm_vectors == zero
    assert np.isfinite(got.delta_m)
    assert np.isfinite(got.delta_d) or zero == got.n_vectors
    if dd > 0:
        assert abs(got.delta_d - float(dd)) <= 1e-6 * float(dd) + 1e-15
    assert abs(got.delta_m - float(dm)) <= 1e-6 * float(dm) + 1e-12 * scale


# ------------------------------------------------------------------- the streaming engine


def _write_model(folder, state):
    folder.mkdir(parents=True)
    save_file(state, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))


def _write_adapter(folder, factors, r, alpha, dora):
    folder.mkdir(parents=True)
    tensors = {}
    for key, (a, b, m) in factors.items():
        prefix = "base_model.model." + key.removesuffix(".weight")
        tensors[prefix + ".lora_A.weight"] = a
        tensors[prefix + ".lora_B.weight"] = b
        if dora:
            tensors[prefix + ".lora_magnitude_vector"] = m
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "r": r, "lora_alpha": alpha, "use_dora": dora}
    (folder / "adapter_config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("axis", ["out", "in"])
@pytest.mark.parametrize("workers", [1, 2])
def test_streaming_engine_matches_whole_matrix_reference(tmp_path, monkeypatch, axis, workers):
    """Tiny blocks (many per matrix), several runs and adapters: same numbers as the
    whole-matrix float64 path, for full checkpoints, LoRA and DoRA."""
    monkeypatch.setattr(streaming, "MEMORY_BUDGET", 1 << 15)
    monkeypatch.setattr(streaming, "MAX_BLOCK", 1 << 12)
    monkeypatch.setattr(streaming, "MIN_BLOCK", 1 << 10)
    gen = torch.Generator().manual_seed(5)
    shapes = {"q_proj": (48, 40), "v_proj": (24, 40), "up_proj": (96, 40), "down_proj": (40, 96)}
    base = {
        f"model.layers.{i}.{'self_attn' if n in ('q_proj', 'v_proj') else 'mlp'}.{n}.weight": (
            torch.randn(s, generator=gen) * 0.05
        ).to(torch.bfloat16)
        for i in range(2)
        for n, s in shapes.items()
    }
    _write_model(tmp_path / "base", base)
    expected = {}
    for step in (10, 20):
        ft = {
            k: (v.double() + 1e-3 * torch.randn(v.shape, generator=gen)).to(v.dtype)
            for k, v in base.items()
        }
        _write_model(tmp_path / "ft" / f"checkpoint-{step}", ft)
        for k in base:
            expected[("ft", step, k)] = decomposition_change(base[k], ft[k], axis, backend="torch")
    r, alpha = 4, 8
    for dora in (False, True):
        factors = {}
        for k, w in base.items():
            if "v_proj" in k:
                continue  # left unadapted: ΔM = ΔD = 0
            a = torch.randn(r, w.shape[1], generator=gen) * 0.01
            b = torch.randn(w.shape[0], r, generator=gen) * 0.01
            v = w.double() + (alpha / r) * (b.double() @ a.double())
            m = (v.norm(dim=1) * (1 + 0.01 * torch.randn(w.shape[0], generator=gen))).float()
            wt = v if not dora else m.double()[:, None] * v / v.norm(dim=1, keepdim=True)
            factors[k] = (a, b, m)
            expected[("dora" if dora else "lora", None, k)] = decomposition_change(
                base[k], wt, axis, backend="torch"
            )
        _write_adapter(tmp_path / ("dora" if dora else "lora"), factors, r, alpha, dora)
    runs = [tmp_path / "ft", tmp_path / "lora", tmp_path / "dora"]
    table = compare(
        tmp_path / "base", runs, modules=list(shapes), axis=axis, progress=False, workers=workers
    )
    assert len(table) == 2 * len(base) + 2 * len(base)
    for row in table.itertuples():
        step = None if row.run != "ft" else int(row.step)
        want = expected.get((row.run, step, row.parameter))
        if want is None:  # unadapted module
            assert row.delta_m == 0 and row.delta_d == 0
            continue
        assert rel(row.delta_d, want.delta_d) <= 1e-9, (row.run, row.parameter)
        assert rel(row.delta_m, want.delta_m) <= 1e-9, (row.run, row.parameter)
