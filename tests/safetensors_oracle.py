"""The safetensors library as the oracle for our safetensors reading (differential checks).

:func:`check_against_library` writes nothing: given a file, it asks the library
(``safe_open`` for the header, its ``get_tensor`` — what ``load_file`` calls — for
the values) and our
:func:`~wdanalysis.storage.tensor_store.open_tensor_file`, and asserts that

* a file the library opens, we open, with the same keys, shapes and dtypes;
* every tensor the library loads, we read with identical bytes, through
  :meth:`TensorStore.get` and through the streaming engine's ``pread`` byte ranges;
* a tensor the library cannot load (e.g. a dtype torch lacks) is a one-line error for us;
* a file the library refuses, we refuse with a one-line ``WDAnalysisError`` naming it.

Used by ``tests/fuzz_parsers.py`` (every safetensors fuzz input) and
``tests/test_safetensors_differential.py`` (a corpus of hand-made headers).
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open

from wdanalysis.errors import WDAnalysisError
from wdanalysis.storage import row_reader as reader
from wdanalysis.storage.tensor_store import open_tensor_file


def library_verdict(path: Path) -> tuple[bool, dict[str, torch.Tensor | None]]:
    """(does ``safe_open`` accept the file, each tensor as the library loads it or None).

    ``safetensors.torch.load_file`` is ``safe_open`` + ``get_tensor`` for every key; here
    per key, so that one tensor torch cannot hold (e.g. ``F6_E2M3``) spoils only itself.
    """
    values: dict[str, torch.Tensor | None] = {}
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            for key in handle.keys():
                try:
                    values[key] = handle.get_tensor(key)
                except Exception:  # noqa: BLE001 - header fine, a tensor torch cannot hold
                    values[key] = None
    except Exception:  # noqa: BLE001 - the oracle: any refusal counts
        return False, {}
    return True, values


def same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bytes (NaN payloads and signed zeros included)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    as_bytes = [t.contiguous().reshape(-1).view(torch.uint8) for t in (a, b)]
    return torch.equal(*as_bytes)


def _one_line_error(error: WDAnalysisError, path: Path) -> None:
    text = str(error)
    assert "\n" not in text, f"multi-line message: {text!r}"
    assert str(path) in text or path.name in text, f"message does not name the file: {text}"


def _read_extent(extent) -> torch.Tensor:
    """The tensor's bytes as the streaming engine reads them (its reader thread)."""
    request = (extent.file, extent.offset, extent.nbytes)
    pool = reader.Reader(iter([request]), 1, max(1, extent.nbytes), pin=False)
    try:
        buf, error = pool.get()
        assert error is None, f"the engine's reader failed: {error}"
        flat = buf[: extent.nbytes].clone()
    finally:
        pool.close()
    return flat.view(extent.dtype).reshape(extent.shape)


def check_against_library(path: Path) -> str:
    """Assert our reading agrees with the library's; returns ``"accepted"``/``"refused"``."""
    reader._layouts.clear()  # the same path is rewritten within one timestamp tick
    accepted, values = library_verdict(path)
    try:
        store = open_tensor_file(path)
    except WDAnalysisError as error:
        _one_line_error(error, path)
        assert not accepted, f"the safetensors library opens {path.name} but we refused: {error}"
        return "refused"
    assert accepted, f"the safetensors library refuses {path.name} but we opened it"
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            expected = {k: tuple(handle.get_slice(k).get_shape()) for k in handle.keys()}
        assert {k: store.shape(k) for k in store.keys()} == expected
        for key in store.keys():
            try:
                got = store.get(key)
            except WDAnalysisError as error:
                _one_line_error(error, path)
                assert values[key] is None, f"the library loads {key!r} but we failed: {error}"
                continue
            assert values[key] is not None, f"the library cannot load {key!r} but we read it"
            assert same_tensor(got, values[key]), f"{key!r}: values differ from the library's"
            if isinstance(store.dtype(key), torch.dtype):  # else a name, e.g. F4 (packed x2)
                assert store.dtype(key) == got.dtype
            extent = reader.extent_of(store, key)
            if extent is not None:  # the engine's pread path reads the same bytes
                assert same_tensor(_read_extent(extent), values[key]), f"{key!r}: pread differs"
    finally:
        store.close()
    return "accepted"
