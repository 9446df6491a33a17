"""Lazy, read-only access to the tensors of a checkpoint, whatever files hold them.

A :class:`TensorStore` lists keys, shapes and dtypes from file headers alone and reads one
tensor at a time (safetensors through mmap, ``.bin`` through ``torch.load(mmap=True,
weights_only=True)``), so the analysis never holds two whole state dicts in memory.
"""

from __future__ import annotations

import json
import math
import pickle
import re
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
    # Known to safetensors, rarely in weights: kept as names when this torch lacks them.
    "U64": getattr(torch, "uint64", None),
    "U32": getattr(torch, "uint32", None),
    "U16": getattr(torch, "uint16", None),
    "C64": torch.complex64,
    "F8_E8M0": getattr(torch, "float8_e8m0fnu", None),
    "F6_E2M3": None,
    "F6_E3M2": None,
    "F4": None,
}
# Bits per element of every safetensors dtype, to check each tensor's byte range.
DTYPE_BITS = {
    **dict.fromkeys(("F64", "I64", "U64", "C64"), 64),
    **dict.fromkeys(("F32", "I32", "U32"), 32),
    **dict.fromkeys(("F16", "BF16", "I16", "U16"), 16),
    **dict.fromkeys(("F8_E4M3", "F8_E5M2", "F8_E8M0", "I8", "U8", "BOOL"), 8),
    **dict.fromkeys(("F6_E2M3", "F6_E3M2"), 6),
    "F4": 4,
}
_REFETCH = "the file is damaged or not safetensors; re-download or re-save it"
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
                    f"not a safetensors file: only {size} bytes, too short for a header",
                    path,
                    "the file is empty or was cut short; re-download or re-save it",
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
        raise CheckpointFormatError(
            f"cannot read file: {error.strerror}", path, "check the path and its permissions"
        ) from None
    try:
        header = json.loads(raw)
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
    except (UnicodeDecodeError, ValueError) as error:
        raise CheckpointFormatError(
            f"corrupt safetensors header ({error.__class__.__name__})", path, _REFETCH
        ) from None
    return _tensor_infos(header, path, data_bytes=size - 8 - header_len)


def _tensor_infos(header: dict, path: Path, data_bytes: int) -> dict[str, TensorInfo]:
    """Check every entry as ``safe_open`` will (dtype, shape, byte range, contiguous data
    covering the file exactly), so a bad file fails here, by name, before any analysis."""
    infos: dict[str, TensorInfo] = {}
    ranges: list[tuple[int, int, str]] = []
    for key, entry in header.items():
        if key == "__metadata__":
            if not isinstance(entry, dict) or not all(isinstance(v, str) for v in entry.values()):
                raise CheckpointFormatError(
                    "corrupt safetensors header: __metadata__ must map names to strings",
                    path,
                    _REFETCH,
                )
            continue
        dtype_name, shape, offsets = _entry_fields(entry)
        if dtype_name is None:
            raise CheckpointFormatError(
                f"corrupt safetensors header: malformed entry for {key!r}", path, _REFETCH
            )
        if dtype_name not in DTYPE_BITS:
            raise CheckpointFormatError(
                f"corrupt safetensors header: unknown dtype {dtype_name!r} for {key!r}",
                path,
                _REFETCH,
            )
        begin, end = offsets
        if not 0 <= begin <= end:
            raise CheckpointFormatError(
                f"corrupt safetensors header: bad data_offsets {list(offsets)} for {key!r}",
                path,
                _REFETCH,
            )
        if end > data_bytes:
            raise CheckpointFormatError(
                f"truncated safetensors: tensor {key!r} ends at byte {end} but only "
                f"{data_bytes} data bytes are present",
                path,
                "the download or save was cut short; fetch the file again",
            )
        bits = math.prod(shape) * DTYPE_BITS[dtype_name]
        if bits % 8 or bits // 8 != end - begin:
            raise CheckpointFormatError(
                f"corrupt safetensors header: tensor {key!r} of shape {list(shape)} and dtype "
                f"{dtype_name} needs {bits / 8:g} bytes but its data_offsets span "
                f"{end - begin}",
                path,
                _REFETCH,
            )
        ranges.append((begin, end, key))
        infos[key] = TensorInfo(shape, SAFETENSORS_DTYPES.get(dtype_name) or dtype_name, path)
    _check_contiguous(sorted(ranges), data_bytes, path)
    return infos


def _entry_fields(entry) -> tuple[str | None, tuple[int, ...], tuple[int, int]]:
    """``(dtype, shape, (begin, end))`` of one header entry; dtype ``None`` if malformed."""

    def is_int(n) -> bool:
        return isinstance(n, int) and not isinstance(n, bool)

    if not isinstance(entry, dict):
        return None, (), (0, 0)
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if (
        not isinstance(dtype, str)
        or not isinstance(shape, list)
        or not all(is_int(n) and n >= 0 for n in shape)
        or not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(is_int(n) for n in offsets)
    ):
        return None, (), (0, 0)
    return dtype, tuple(shape), (offsets[0], offsets[1])


def _check_contiguous(ranges: list[tuple[int, int, str]], data_bytes: int, path: Path) -> None:
    position = 0
    for begin, end, key in ranges:
        if begin != position:
            what = "overlaps another tensor" if begin < position else "leaves a gap before it"
            raise CheckpointFormatError(
                f"corrupt safetensors header: tensor {key!r} {what} (data_offsets "
                f"[{begin}, {end}])",
                path,
                _REFETCH,
            )
        position = end
    if position != data_bytes:
        raise CheckpointFormatError(
            f"corrupt safetensors: {data_bytes - position} bytes after the last tensor",
            path,
            _REFETCH,
        )


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
    except Exception as error:  # noqa: BLE001 - untrusted bytes: any failure is the file's
        found = re.search(r"Unsupported global: GLOBAL \S+", str(error))
        if isinstance(error, pickle.UnpicklingError) and found:
            raise CheckpointFormatError(
                "refusing to load: the pickle holds objects other than tensors, which could "
                f"run code (weights_only=True rejected it: {found.group(0)})",
                path,
                "if you trust its source, convert it to safetensors in an isolated environment",
            ) from None
        reason = _first_line(error).split(". ")[0][:160]
        raise CheckpointFormatError(
            f"corrupt, truncated or not a torch state dict ({error.__class__.__name__}: {reason})",
            path,
            "the download or save was cut short; re-download or re-save the file",
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
            f"expected a state dict (a dict of tensors), found {type(obj).__name__}",
            path,
            "save model.state_dict(), or convert the checkpoint to safetensors",
        )
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointFormatError(
            "the file holds no tensors", path, "save model.state_dict(), not other objects"
        )
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
            "malformed shard index: expected JSON with a 'weight_map' object",
            index_file,
            "re-download the index file or re-save the model",
        ) from None
    if not weight_map:
        raise CheckpointFormatError(
            "shard index lists no weights (empty weight_map)",
            index_file,
            "re-download the index file or re-save the model",
        )
    for key, name in weight_map.items():
        if not isinstance(name, str) or Path(name).name != name or name in {"", ".", ".."}:
            raise CheckpointFormatError(
                f"malformed shard index: weight_map gives {name!r} for {key!r}, not the file "
                "name of a shard beside the index",
                index_file,
                "re-download the index file or re-save the model",
            )
    folder = index_file.parent
    shard_names = sorted(set(weight_map.values()))
    missing = [name for name in shard_names if not (folder / name).is_file()]
    if missing:
        raise CheckpointFormatError(
            f"shard {missing[0]} listed in the index is missing"
            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""),
            index_file,
            "the download is incomplete; download the missing shard(s) again",
        )
    per_shard = {name: open_tensor_file(folder / name).infos for name in shard_names}
    infos = _merge_shards(per_shard.items(), index_file)
    for key, name in weight_map.items():
        if key not in per_shard[name]:
            raise CheckpointFormatError(
                f"key {key!r} is listed in the index but shard {name} lacks it",
                index_file,
                "index and shards come from different saves; re-download or re-save them",
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
                    f"duplicate key {key!r} in shards {merged[key].file.name} and {name}",
                    where,
                    "shards of two different saves are mixed; remove the stray files or "
                    "re-download the model",
                )
            merged[key] = info
    return merged
