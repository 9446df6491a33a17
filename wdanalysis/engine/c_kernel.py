"""Optional fused CPU kernel: the per-vector sums ``Σa²``, ``Σa·d``, ``Σd²`` in one pass.

The torch path in :mod:`wdanalysis.engine.decomposition` makes several passes over float64 copies
of every chunk (convert, subtract, three products and sums) and runs at well under 1 GB/s.
This module compiles (once, with the system C compiler, cached per machine) a ~100-line C
kernel that reads the stored bf16/fp16/fp32/fp64 values, widens them to float64, forms
``d = b − a`` in float64 (exact for bf16/fp16 inputs, correctly rounded otherwise) and
accumulates the three sums with float64 fused multiply-adds, all in a single pass: the
precision of the float64 reference path at several GB/s per core.

Nothing here is required: without a C compiler, or with ``WDANALYSIS_NO_CKERNEL=1``,
:func:`load` returns ``None`` and callers use the torch path (same float64 results, several
times slower); :func:`describe` says which backend runs and why, and is recorded by
``inspect`` and in ``compare``'s ``run.json``. ctypes releases the GIL while the kernel
runs, so a reader thread keeps the disk busy meanwhile.

Compiling (once per machine, about a second) is said once on stderr, with the command and
the cache file. ``-march=native`` is kept on purpose: the kernel's AVX2/FMA/F16C paths are
what make it fast, and the cache file is keyed by the CPU's model and flags, so a home
folder shared by different machines never loads a build for another CPU. Where
``-march=native`` does not compile, the build is retried with portable flags;
``WDANALYSIS_CFLAGS`` replaces ``-march=native`` (e.g. ``-mavx2 -mfma`` or ``-O2``). ``CC``
may carry a launcher or flags (``ccache gcc``, ``gcc -m64``): it is split like a shell
would. Kept over a JIT such as numba: numba is not a dependency, and
``benchmarks/bench_kernel.py`` measured it no faster (README, Performance).

:meth:`FusedKernel.accumulate` checks every argument itself (shape, dtype, device,
contiguity) before handing raw pointers to C: a wrong call is a ``ValueError``, never a read
out of bounds.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

from wdanalysis.engine.c_source import SOURCE as _SOURCE

_NAMES = {torch.bfloat16: "bf16", torch.float16: "f16", torch.float32: "f32", torch.float64: "f64"}
_lock = threading.Lock()
_cached: object = False  # False: not tried yet; None: unavailable
_status = "not loaded yet"  # what describe() says: the backend and, without it, why
_log = logging.getLogger(__name__)
NATIVE_FLAGS = ["-march=native"]


class FusedKernel:
    """ctypes bindings of the compiled kernel."""

    def __init__(self, lib: ctypes.CDLL, path: Path):
        self.path = path
        self.dtypes = {dt for dt, name in _NAMES.items() if hasattr(lib, f"wd_rows_{name}")}
        self._fns = {}
        args = [ctypes.c_void_p] * 2 + [ctypes.c_int64] * 4 + [ctypes.c_void_p] * 3
        for dtype in self.dtypes:
            for mode in ("rows", "cols"):
                for suffix in ("", "_d"):
                    fn = getattr(lib, f"wd_{mode}_{_NAMES[dtype]}{suffix}")
                    fn.argtypes, fn.restype = args, None
                    self._fns[(dtype, mode, bool(suffix))] = fn
            fn = getattr(lib, f"wd_proj_{_NAMES[dtype]}")
            fn.argtypes = [ctypes.c_void_p] + [ctypes.c_int64] * 3 + [ctypes.c_void_p]
            fn.argtypes += [ctypes.c_int64, ctypes.c_void_p]
            fn.restype = None
            self._fns[(dtype, "proj")] = fn

    def supports(self, dtype: torch.dtype) -> bool:
        return dtype in self.dtypes

    def accumulate(self, a, b, aa, ad, dd, mode: str, diff: bool) -> None:
        """Add the sums of the 2-D CPU tensors ``a`` and ``b`` into ``aa, ad, dd``.

        ``diff``: ``b`` is the new weight (``d = b − a``, same dtype as ``a``); otherwise
        ``b`` is the float64 update ``d`` itself. ``mode`` ``"rows"``: one vector per row
        (outputs of length ``a.shape[0]``); ``"cols"``: one per column. Rows must be
        contiguous (stride 1 along columns); outputs contiguous float64.
        """
        check_inputs(a, b, (aa, ad, dd), mode, diff, self.dtypes)
        fn = self._fns[(a.dtype, mode, not diff)]
        fn(
            a.data_ptr(),
            b.data_ptr(),
            a.shape[0],
            a.shape[1],
            a.stride(0),
            b.stride(0),
            aa.data_ptr(),
            ad.data_ptr(),
            dd.data_ptr(),
        )

    def project(self, a, packed, out) -> None:
        """Add ``a @ W`` into ``out`` (float64, ``(rows, r8)``), the directions ``W``
        ``(cols, r8)`` given packed as ``(r8 / 8, cols, 8)`` (:func:`pack_directions`)."""
        check_projection(a, packed, out, self.dtypes)
        self._fns[(a.dtype, "proj")](
            a.data_ptr(),
            a.shape[0],
            a.shape[1],
            a.stride(0),
            packed.data_ptr(),
            out.shape[1],
            out.data_ptr(),
        )


def pack_directions(w: torch.Tensor) -> torch.Tensor:
    """``w`` ``(cols, r)`` as the projection kernel reads it: float64 ``(r8 / 8, cols, 8)``,
    ``r8`` the multiple of 8 at or above ``r`` (the padding directions are zero)."""
    cols, r = w.shape
    r8 = -(-r // 8) * 8
    padded = torch.zeros(cols, r8, dtype=torch.float64, device=w.device)
    padded[:, :r] = w
    return padded.reshape(cols, r8 // 8, 8).permute(1, 0, 2).contiguous()


def check_projection(a, packed, out, dtypes) -> None:
    """Refuse, with a ``ValueError``, a projection call the C code would misread."""
    if a.dim() != 2 or a.dtype not in dtypes or a.device.type != "cpu":
        raise ValueError(f"the projection takes a 2-D CPU block in {sorted(map(str, dtypes))}")
    if a.shape[1] > 1 and a.stride(1) != 1 or a.shape[0] > 1 and a.stride(0) < a.shape[1]:
        raise ValueError(f"a's rows must be contiguous, got strides {a.stride()}")
    r8 = out.shape[1] if out.dim() == 2 else -1
    want = (r8 // 8, a.shape[1], 8)
    for name, t, shape in (("packed", packed, want), ("out", out, (a.shape[0], r8))):
        if (
            r8 % 8
            or t.dtype != torch.float64
            or t.device.type != "cpu"
            or tuple(t.shape) != shape
            or not t.is_contiguous()
        ):
            raise ValueError(
                f"the projection's {name} must be contiguous float64 CPU {shape} with a "
                f"multiple of 8 directions, got {t.dtype} {tuple(t.shape)}"
            )


def check_inputs(a, b, outs, mode: str, diff: bool, dtypes) -> None:
    """Refuse, with a ``ValueError`` naming the problem, any call the C code would misread."""
    if mode not in ("rows", "cols"):
        raise ValueError(f"mode must be 'rows' or 'cols', got {mode!r}")
    if a.dim() != 2 or b.dim() != 2 or a.shape != b.shape:
        raise ValueError(
            f"the kernel takes two 2-D blocks of one shape, got {tuple(a.shape)} and "
            f"{tuple(b.shape)}"
        )
    want_b = a.dtype if diff else torch.float64
    if a.dtype not in dtypes or b.dtype != want_b:
        raise ValueError(
            f"the kernel takes a in {sorted(str(d) for d in dtypes)} and b in "
            f"{'the same dtype' if diff else 'float64'}, got {a.dtype} and {b.dtype}"
        )
    for name, t in (("a", a), ("b", b)):
        if t.device.type != "cpu":
            raise ValueError(f"the kernel runs on CPU tensors; {name} is on {t.device}")
        if (t.shape[1] > 1 and t.stride(1) != 1) or (t.shape[0] > 1 and t.stride(0) < t.shape[1]):
            raise ValueError(f"{name}'s rows must be contiguous, got strides {t.stride()}")
    size = a.shape[0] if mode == "rows" else a.shape[1]
    for t in outs:
        if (
            t.dtype != torch.float64
            or t.device.type != "cpu"
            or t.shape != (size,)
            or not t.is_contiguous()
        ):
            raise ValueError(
                f"the kernel's sums must be contiguous float64 CPU vectors of length {size}, "
                f"got {t.dtype} {tuple(t.shape)} on {t.device}"
            )


def _cache_dir() -> Path:
    root = os.environ.get("WDANALYSIS_CACHE") or os.environ.get("XDG_CACHE_HOME")
    base = Path(root) if root else Path.home() / ".cache"
    return base / "wdanalysis" / "kernels"


def _cpu_signature() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
        flags = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
        model = next((ln for ln in text.splitlines() if ln.startswith("model name")), "")
    except OSError:
        flags = model = ""
    return f"{platform.machine()}|{model}|{flags}"


def compiler_command() -> tuple[list[str] | None, str]:
    """The compiler as a command (``CC`` split like a shell would), or ``None`` and why."""
    given = os.environ.get("CC")
    if given:
        words = shlex.split(given)
        if not words or shutil.which(words[0]) is None:
            return None, f"CC={given!r} names no program on PATH"
        return words, f"CC={given!r}"
    found = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if not found:
        return None, "no C compiler found (install gcc or clang, or set CC)"
    return [found], found


def _flags() -> list[list[str]]:
    """Flag sets tried in turn: the native build, then a portable one."""
    given = os.environ.get("WDANALYSIS_CFLAGS")
    return [shlex.split(given)] if given is not None else [NATIVE_FLAGS, []]


def _compile(compiler: list[str], target: Path) -> list[str]:
    """Build the kernel into ``target``; returns the flags that worked."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        src = Path(tmp) / "wdkernel.c"
        src.write_text(_SOURCE)
        out = Path(tmp) / target.name
        base = [*compiler, "-O3", "-shared", "-fPIC", "-fno-fast-math", "-o", str(out), str(src)]
        for attempt, extra in enumerate(_flags()):
            command = " ".join(base[:-3] + extra)
            if attempt == 0:
                _log.warning(
                    "wdanalysis: compiling the fused ΔM/ΔD kernel, once for this CPU, with "
                    "'%s' into %s (WDANALYSIS_NO_CKERNEL=1: use the torch path instead)",
                    command,
                    target,
                )
            else:
                _log.warning("wdanalysis: that failed; retrying with portable flags: '%s'", command)
            done = subprocess.run(base + extra, capture_output=True, timeout=120)
            if done.returncode == 0:
                os.replace(out, target)
                return extra
        said = done.stderr.decode(errors="replace").strip().splitlines()
        raise OSError((said or [f"exit status {done.returncode}"])[-1][:300])


def _fall_back(reason: str) -> None:
    """Use the torch path, and say so once (unless the user asked for it)."""
    global _status
    _status = f"torch (float64; {reason})"
    if "WDANALYSIS_NO_CKERNEL" not in reason:
        _log.warning(
            "wdanalysis: the fused kernel is unavailable (%s); using the torch float64 path "
            "(same results, slower)",
            reason,
        )


def load() -> FusedKernel | None:
    """The compiled kernel, building it on first use; ``None`` when unavailable."""
    global _cached, _status
    with _lock:
        if _cached is not False:
            return _cached  # type: ignore[return-value]
        _cached = None
        if os.environ.get("WDANALYSIS_NO_CKERNEL"):
            _fall_back("WDANALYSIS_NO_CKERNEL is set")
            return None
        compiler, which = compiler_command()
        if compiler is None:
            _fall_back(which)
            return None
        signature = _SOURCE + _cpu_signature() + " ".join(compiler) + repr(_flags())
        key = hashlib.sha256(signature.encode()).hexdigest()[:16]
        target = _cache_dir() / f"wdkernel-{key}.so"
        try:
            if not target.is_file():
                _compile(compiler, target)
            lib = ctypes.CDLL(str(target))
            if lib.wd_abi() != 2:
                _fall_back(f"{target} is a build of another version")
                return None
            _cached = FusedKernel(lib, target)
            _status = f"fused C kernel ({target}, built by {which})"
        except (OSError, subprocess.SubprocessError, AttributeError) as error:
            _fall_back(f"building it with {which} failed: {error}")
            _cached = None
        return _cached


def describe() -> str:
    """Which backend the CPU sums use (loading the kernel if needed), and why."""
    load()
    return _status


def reset() -> None:
    """Forget the loaded kernel, so that the next :func:`load` looks again (tests)."""
    global _cached, _status
    with _lock:
        _cached, _status = False, "not loaded yet"


def describe_backends(used: set[str], device: torch.device) -> str:
    """What computed a run's sums (``used``: ``"fused"``/``"torch"``), for its records."""
    parts = [describe()] if "fused" in used else []
    if "torch" in used or not parts:
        why = describe() if device.type == "cpu" else f"torch on {device}"
        parts.append(why if why.startswith("torch") else f"torch float64 on {device}")
    return " + ".join(parts)
