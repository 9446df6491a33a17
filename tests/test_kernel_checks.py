"""The fused kernel checks its inputs in every branch, says when it compiles or falls back,
and the backend that ran is recorded (``table.attrs``, ``inspect``)."""

from __future__ import annotations

import logging

import pytest
import torch

from wdanalysis.engine import c_kernel as kernel
from wdanalysis.engine.decomposition import accumulate_sums

HAS_KERNEL = kernel.load() is not None
needs_kernel = pytest.mark.skipif(not HAS_KERNEL, reason="no C compiler for the fused kernel")


@pytest.fixture
def fresh_kernel(monkeypatch, tmp_path):
    """A kernel looked up again, built into an empty cache; the usual one restored after."""
    monkeypatch.setenv("WDANALYSIS_CACHE", str(tmp_path))
    kernel.reset()
    yield
    kernel.reset()


@pytest.mark.parametrize("backend", ["auto", "torch"] + (["fused"] if HAS_KERNEL else []))
def test_promotion_branch_checks_shapes(backend):
    """(4, 8) bf16 against (2, 8) fp32 used to read past ``b`` and return 3e34."""
    a = torch.randn(4, 8).to(torch.bfloat16)
    b = torch.randn(2, 8)
    sums = torch.zeros(3, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"\(4, 8\) and \(2, 8\)"):
        accumulate_sums(a, b, sums, "rows", True, backend)
    assert not sums.any()


def test_sums_of_the_wrong_size_are_refused():
    a = torch.randn(4, 8)
    with pytest.raises(ValueError, match=r"shape \(3, 8\)"):
        accumulate_sums(a, a.clone(), torch.zeros(3, 4, dtype=torch.float64), "cols")


@needs_kernel
@pytest.mark.parametrize(
    ("a", "b", "outs", "words"),
    [
        (torch.ones(4, 8), torch.ones(4, 6), 4, "one shape"),
        (torch.ones(4, 8), torch.ones(4, 8, dtype=torch.float64), 4, "same dtype"),
        (torch.ones(4, 8, dtype=torch.int32), torch.ones(4, 8, dtype=torch.int32), 4, "dtype"),
        (torch.ones(8, 4).T, torch.ones(8, 4).T, 4, "contiguous"),
        (torch.ones(4, 8), torch.ones(4, 8), 3, "length 4"),
        (torch.ones(4, 8, device="meta"), torch.ones(4, 8), 4, "CPU tensors"),
    ],
)
def test_kernel_refuses_what_c_would_misread(a, b, outs, words):
    out = [torch.zeros(outs, dtype=torch.float64) for _ in range(3)]
    with pytest.raises(ValueError, match=words):
        kernel.load().accumulate(a, b, *out, "rows", True)


@needs_kernel
def test_update_must_be_float64():
    a = torch.ones(4, 8)
    out = [torch.zeros(4, dtype=torch.float64) for _ in range(3)]
    with pytest.raises(ValueError, match="float64"):
        kernel.load().accumulate(a, torch.ones(4, 8), *out, "rows", False)


@needs_kernel
def test_compiling_is_said_once_with_a_launcher_in_cc(fresh_kernel, monkeypatch, caplog):
    """``CC="env gcc"`` (a launcher, like ccache) is split like a shell would, not refused."""
    compiler = kernel.compiler_command()[0][0]
    monkeypatch.setenv("CC", f"env {compiler}")
    monkeypatch.setenv("WDANALYSIS_CFLAGS", "-O2")  # portable: no -march=native
    with caplog.at_level(logging.WARNING, logger=kernel.__name__):
        assert kernel.load() is not None
        assert kernel.load() is not None
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 1 and "compiling" in said[0] and "-O2" in said[0]
    assert "-march=native" not in said[0]
    assert "fused C kernel" in kernel.describe() and "env" in kernel.describe()


def test_missing_compiler_falls_back_and_says_why(fresh_kernel, monkeypatch, caplog):
    monkeypatch.setenv("CC", "no-such-compiler-xyz -m64")
    with caplog.at_level(logging.WARNING, logger=kernel.__name__):
        assert kernel.load() is None
    assert "names no program" in caplog.text and "torch" in caplog.text
    assert kernel.describe().startswith("torch")
    a = torch.randn(3, 5)
    sums = torch.zeros(3, 3, dtype=torch.float64)
    assert accumulate_sums(a, a * 2, sums, "rows") == "torch"
    assert torch.allclose(sums[2], (a.double() ** 2).sum(1))


def test_no_ckernel_is_quiet_and_recorded(fresh_kernel, monkeypatch, caplog):
    monkeypatch.setenv("WDANALYSIS_NO_CKERNEL", "1")
    with caplog.at_level(logging.WARNING, logger=kernel.__name__):
        assert kernel.load() is None
    assert not caplog.records
    assert "WDANALYSIS_NO_CKERNEL" in kernel.describe()


@needs_kernel
def test_failed_build_falls_back_and_says_why(fresh_kernel, monkeypatch, caplog):
    monkeypatch.setenv("WDANALYSIS_CFLAGS", "-fno-such-flag-wdanalysis")
    with caplog.at_level(logging.WARNING, logger=kernel.__name__):
        assert kernel.load() is None
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 2 and "compiling" in said[0]
    assert "building it with" in said[1] and "torch" in said[1]
    assert "no-such-flag" in kernel.describe()
