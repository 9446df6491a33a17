"""Lazy, read-only access to the tensors of a checkpoint, whatever files hold them.

A :class:`TensorStore` lists keys, shapes and dtypes from file headers alone and reads one
tensor at a time (safetensors through mmap, ``.bin`` through ``torch.load(mmap=True,
weights_only=True)``), so the analysis never holds two whole state dicts in memory.
"""

from __future__ import annotations

import json
import pickle
import struct
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from wdanalysis.errors import CheckpointFormatError

SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": getattr(torch, "float8_e4m3fn", None),
    "F8_E5M2": getattr(torch, "float8_e5m2", None),
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit


@dataclass(frozen=True)
class TensorInfo:
    shape: tuple[int, ...]
    dtype: torch.dtype | str
    file: Path


def read_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """Parse and validate a safetensors header without reading any tensor data.

    Catches what ``safe_open`` reports obscurely or not at all: files shorter than their
    header says, non-JSON headers, and tensors whose byte ranges run past the end.
    """
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise CheckpointFormatError(
                    f"not a safetensors file: only {size} bytes, too short for a header", path
                )
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > min(MAX_HEADER_BYTES, size - 8):
                raise CheckpointFormatError(
                    f"corrupt or truncated safetensors: header claims {header_len} bytes "
                    f"but the file holds {size} bytes",
                    path,
                    "re-download or re-save the file",
                )
            raw = handle.read(header_len)
    except OSError as error:
        raise CheckpointFormatError(f"cannot read file: {error.strerror}", path) from None
    try:
        header = json.loads(raw)
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
    except (UnicodeDecodeError, ValueError) as error:
        raise CheckpointFormatError(
            f"corrupt safetensors header ({error.__class__.__name__})", path
        ) from None
    return _tensor_infos(header, path, data_bytes=size - 8 - header_len)


def _tensor_infos(header: dict, path: Path, data_bytes: int) -> dict[str, TensorInfo]:
    infos: dict[str, TensorInfo] = {}
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        try:
            dtype_name = entry["dtype"]
            shape = tuple(int(n) for n in entry["shape"])
            begin, end = (int(n) for n in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointFormatError(
                f"corrupt safetensors header: malformed entry for {key!r}", path
            ) from None
        if not 0 <= begin <= end or any(n < 0 for n in shape):
            raise CheckpointFormatError(
                f"corrupt safetensors header: bad offsets or shape for {key!r}", path
            )
        if end > data_bytes:
            raise CheckpointFormatError(
                f"truncated safetensors: tensor {key!r} ends at byte {end} but only "
                f"{data_bytes} data bytes are present",
                path,
                "the download or save was cut short; fetch the file again",
            )
        infos[key] = TensorInfo(shape, SAFETENSORS_DTYPES.get(dtype_name) or dtype_name, path)
    return infos


@dataclass
class TensorStore:
    """Keys → tensors of one checkpoint (one file, or shards), read lazily one at a time."""

    path: Path
    format: str
    infos: dict[str, TensorInfo]
    _handles: dict[Path, object] = field(default_factory=dict, repr=False)
    _bin_cache: tuple[Path, dict] | None = field(default=None, repr=False)

    def keys(self) -> list[str]:
        return list(self.infos)

    def __contains__(self, key: str) -> bool:
        return key in self.infos

    def shape(self, key: str) -> tuple[int, ...]:
        return self.infos[key].shape

    def dtype(self, key: str) -> torch.dtype | str:
        return self.infos[key].dtype

    def dtypes(self) -> set[str]:
        return {str(info.dtype).replace("torch.", "") for info in self.infos.values()}

    def get(self, key: str) -> torch.Tensor:
        info = self.infos[key]
        if info.file.suffix == ".safetensors":
            return self._get_safetensors(key, info.file)
        return self._get_bin(key, info.file)

    def _get_safetensors(self, key: str, file: Path) -> torch.Tensor:
        try:
            handle = self._handles.get(file)
            if handle is None:
                handle = self._handles[file] = safe_open(str(file), framework="pt", device="cpu")
            return handle.get_tensor(key)
        except (SafetensorError, OSError, RuntimeError) as error:
            raise CheckpointFormatError(
                f"cannot read tensor {key!r}: {_first_line(error)}", file
            ) from None

    def _get_bin(self, key: str, file: Path) -> torch.Tensor:
        if self._bin_cache is None or self._bin_cache[0] != file:
            self._bin_cache = (file, load_torch_state_dict(file))
        return self._bin_cache[1][key]

    def close(self) -> None:
        self._handles.clear()
        self._bin_cache = None


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else error.__class__.__name__


# --------------------------------------------------------------------------------- .bin files


def load_torch_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Load a ``torch.save`` state dict safely: never executes pickled code.

    ``weights_only=True`` restricts unpickling to tensors and plain containers; ``mmap``
    keeps the tensors on disk until touched (zip-format files only; legacy files fall back).
    """
    try:
        obj = _torch_load(path, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as error:
        raise CheckpointFormatError(
            "refusing to load: the pickle holds objects other than tensors "
            f"(weights_only=True rejected it: {_first_line(error)[:120]})",
            path,
            "convert it to safetensors in a trusted environment",
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as error:
        raise CheckpointFormatError(
            f"corrupt or truncated torch file ({_first_line(error)[:160]})", path
        ) from None
    return _unwrap_state_dict(obj, path)


def _torch_load(path: Path, mmap: bool):
    return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)


def _unwrap_state_dict(obj, path: Path) -> dict[str, torch.Tensor]:
    for wrapper in ("state_dict", "model", "module"):
        if isinstance(obj, dict) and wrapper in obj and isinstance(obj[wrapper], dict):
            obj = obj[wrapper]
    if not isinstance(obj, dict):
        raise CheckpointFormatError(
            f"expected a state dict (a dict of tensors), found {type(obj).__name__}", path
        )
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointFormatError("the file holds no tensors", path)
    return tensors


def _bin_infos(path: Path) -> dict[str, TensorInfo]:
    state = load_torch_state_dict(path)
    return {k: TensorInfo(tuple(v.shape), v.dtype, path) for k, v in state.items()}


# ------------------------------------------------------------------------------- opening


def open_tensor_file(path: Path) -> TensorStore:
    """One ``.safetensors`` or ``.bin``/``.pt``/``.pth`` file."""
    if not path.is_file():
        raise CheckpointFormatError("no such file", path)
    if path.suffix == ".safetensors":
        return TensorStore(path, "safetensors", read_safetensors_header(path))
    if path.suffix in {".bin", ".pt", ".pth", ".ckpt"}:
        return TensorStore(path, "torch (.bin)", _bin_infos(path))
    raise CheckpointFormatError(
        f"unknown weight file type {path.suffix!r}", path, "expected .safetensors or .bin"
    )


def open_sharded(index_file: Path) -> TensorStore:
    """Shards listed by a ``*.index.json`` weight map; every listed shard must be present."""
    try:
        weight_map = json.loads(index_file.read_text())["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError
    except (OSError, ValueError, KeyError, TypeError):
        raise CheckpointFormatError(
            "malformed shard index: expected JSON with a 'weight_map' object", index_file
        ) from None
    folder = index_file.parent
    shard_names = sorted(set(weight_map.values()))
    missing = [name for name in shard_names if not (folder / name).is_file()]
    if missing:
        raise CheckpointFormatError(
            f"shard {missing[0]} listed in the index is missing"
            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""),
            index_file,
            "the download is incomplete",
        )
    per_shard = {name: open_tensor_file(folder / name).infos for name in shard_names}
    infos = _merge_shards(per_shard.items(), index_file)
    for key, name in weight_map.items():
        if key not in per_shard[name]:
            raise CheckpointFormatError(
                f"key {key!r} is listed in the index but shard {name} lacks it", index_file
            )
    kind = "sharded safetensors" if shard_names[0].endswith(".safetensors") else "sharded .bin"
    return TensorStore(index_file, f"{kind} ({len(shard_names)} shards)", infos)


def open_shard_files(files: list[Path], folder: Path) -> TensorStore:
    """Several weight files in one folder without an index (read headers, merge)."""
    if len(files) == 1:
        store = open_tensor_file(files[0])
        return store
    infos = _merge_shards(((f.name, open_tensor_file(f).infos) for f in files), folder)
    return TensorStore(folder, f"sharded safetensors ({len(files)} shards, no index)", infos)


def _merge_shards(
    shards: Iterable[tuple[str, dict[str, TensorInfo]]], where: Path
) -> dict[str, TensorInfo]:
    merged: dict[str, TensorInfo] = {}
    for name, infos in shards:
        for key, info in infos.items():
            if key in merged:
                raise CheckpointFormatError(
                    f"duplicate key {key!r} in shards {merged[key].file.name} and {name}", where
                )
            merged[key] = info
    return merged
