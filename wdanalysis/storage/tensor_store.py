"""Lazy, read-only access to the tensors of a checkpoint, whatever files hold them.

A :class:`TensorStore` lists keys, shapes and dtypes from file headers alone and reads one
tensor at a time (safetensors through mmap, ``.bin`` through ``torch.load(mmap=True,
weights_only=True)``), so the analysis never holds two whole state dicts in memory.
"""

from __future__ import annotations

import pickle
import re
import struct
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
from safetensors import SafetensorError, safe_open

from wdanalysis.errors import CheckpointFormatError, IncompleteCheckpointError
from wdanalysis.storage.safetensors_refusal import first_line, refusal
from wdanalysis.storage.small_files import read_json, regular_file

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
    "F8_E4M3FNUZ": getattr(torch, "float8_e4m3fnuz", None),
    "F8_E5M2FNUZ": getattr(torch, "float8_e5m2fnuz", None),
    "F6_E2M3": None,
    "F6_E3M2": None,
    "F4": None,
}
MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit


@dataclass(frozen=True)
class TensorInfo:
    shape: tuple[int, ...]
    dtype: torch.dtype | str
    file: Path
    name: str | None = None  # the key inside ``file`` when the store renames it


def real_key(info: TensorInfo, key: str) -> str:
    """The tensor's key inside its file (stores may prefix keys, e.g. pipelines)."""
    return info.name or key


def read_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """Keys, shapes and dtypes of a safetensors file, without reading any tensor data.

    The safetensors library itself decides what is a valid file (``safe_open`` parses and
    validates the header: JSON types, dtypes, offsets covering the data exactly), so we
    accept exactly what it accepts. When it refuses,
    :mod:`wdanalysis.storage.safetensors_refusal` names the tensor and the problem in plain
    words where it can; the library's reason otherwise.
    """
    size, header_len = _header_bounds(path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            infos = {}
            for key in handle.keys():
                view = handle.get_slice(key)
                dtype_name = view.get_dtype()
                dtype = SAFETENSORS_DTYPES.get(dtype_name) or dtype_name
                infos[key] = TensorInfo(tuple(view.get_shape()), dtype, path)
            return infos
    except SafetensorError as error:
        raise refusal(path, error, size, header_len) from None
    except OSError as error:
        raise CheckpointFormatError(
            f"cannot read file: {error.strerror}", path, "check the path and its permissions"
        ) from None


def _header_bounds(path: Path) -> tuple[int, int]:
    """File size and declared header length; the clearest messages for files cut short."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            prefix = handle.read(8)
    except OSError as error:
        raise CheckpointFormatError(
            f"cannot read file: {error.strerror}", path, "check the path and its permissions"
        ) from None
    if len(prefix) < 8:
        raise IncompleteCheckpointError(
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
    return size, header_len


@dataclass
class TensorStore:
    """Keys → tensors of one checkpoint (one file, or shards), read lazily one at a time.

    Satisfies :class:`~wdanalysis.storage.store_protocol.WeightStore`, as do the subclasses
    that present another store's tensors transformed (renamed, dequantized, split).
    """

    # Whether ``get`` returns each tensor exactly as its file stores it, so that a part of
    # it can be read from the file alone (``get_slice``). Subclasses that transform on
    # read set it to False.
    reads_as_stored: ClassVar[bool] = True

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
        return self.read(key, self.infos[key])

    def get_slice(self, key: str, index: int) -> torch.Tensor:
        """``get(key)[index]``, reading only that part of the file where the format allows.

        A safetensors slice reads one expert of a stacked ``(experts, out, in)`` weight
        without the whole stack; ``.bin`` files and stores that transform on read
        (``reads_as_stored`` False) read the whole tensor and index it.
        """
        info = self.infos[key]
        if info.file.suffix != ".safetensors" or not self.reads_as_stored:
            return self.get(key)[index]
        try:
            with safe_open(str(info.file), framework="pt", device="cpu") as handle:
                return handle.get_slice(real_key(info, key))[index]
        except (SafetensorError, OSError, RuntimeError) as error:
            raise CheckpointFormatError(
                f"cannot read tensor {key!r}: {first_line(error)}", info.file
            ) from None

    def read(self, key: str, info: TensorInfo) -> torch.Tensor:
        """The tensor ``info`` locates (``key``: this store's name for it)."""
        if info.file.suffix == ".safetensors":
            return self._get_safetensors(real_key(info, key), info.file)
        return self._get_bin(real_key(info, key), info.file)

    def _get_safetensors(self, key: str, file: Path) -> torch.Tensor:
        try:
            handle = self._handles.get(file)
            if handle is None:
                handle = self._handles[file] = safe_open(str(file), framework="pt", device="cpu")
            return handle.get_tensor(key)
        except (SafetensorError, OSError, RuntimeError) as error:
            raise CheckpointFormatError(
                f"cannot read tensor {key!r}: {first_line(error)}", file
            ) from None

    def _get_bin(self, key: str, file: Path) -> torch.Tensor:
        if self._bin_cache is None or self._bin_cache[0] != file:
            self._bin_cache = (file, load_torch_state_dict(file))
        return self._bin_cache[1][key]

    def close(self) -> None:
        self._handles.clear()
        self._bin_cache = None


# --------------------------------------------------------------------------------- .bin files


def load_torch_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Load a ``torch.save`` state dict safely: never executes pickled code.

    ``weights_only=True`` restricts unpickling to tensors and plain containers; ``mmap``
    keeps the tensors on disk until touched (zip-format files only; legacy files fall back).
    """
    try:
        obj = _torch_load(path, mmap=zipfile.is_zipfile(path))
    except Exception as error:  # noqa: BLE001 - untrusted bytes: any failure is the file's
        danger = pickle_danger(error)
        if danger:
            raise CheckpointFormatError(
                "refusing to load: the pickle holds objects other than tensors, which could "
                f"run code (weights_only=True rejected {danger})",
                path,
                "if you trust its source, convert it to safetensors in an isolated environment",
            ) from None
        reason = first_line(error).split(". ")[0][:160]
        raise CheckpointFormatError(
            f"corrupt, truncated or not a torch state dict ({error.__class__.__name__}: {reason})",
            path,
            "the download or save was cut short; re-download or re-save the file",
        ) from None
    return _unwrap_state_dict(obj, path)


# What ``weights_only=True`` says when a pickle names code, in every torch we support:
# 2.3-2.5 "Unsupported global: GLOBAL os.system was not an allowed global by default",
# 2.6+ "Trying to load unsupported GLOBAL os.system whose module os is blocked", and the
# other refusals of the restricted unpickler ("Unsupported class …", "Unsupported operand
# …", "Trying to call reduce for unrecognized function …"), all under "Weights only load
# failed" since 2.4.
_GLOBAL = re.compile(r"GLOBAL\s+([\w.]+)")
_UNSAFE = re.compile(
    r"(Unsupported (?:class|operand|global)[^\n.]*|Trying to (?:call reduce|load unsupported)"
    r"[^\n.]*|Weights only load failed)"
)


def pickle_danger(error: BaseException) -> str | None:
    """What in the pickle ``weights_only=True`` refused (``"the global os.system"``), or
    ``None`` when the error is not that refusal (a corrupt or truncated file)."""
    if not isinstance(error, pickle.UnpicklingError):
        return None
    text = str(error)
    found = _GLOBAL.search(text)
    if found:
        return f"the global {found.group(1)}"
    found = _UNSAFE.search(text)
    if found is None:
        return None
    detail = [line for line in text.splitlines() if _UNSAFE.search(line)]
    return " ".join((detail[-1] if detail else found.group(0)).split())[:160]


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
    """One ``.safetensors`` or ``.bin``/``.pt``/``.pth`` file (a regular file: a FIFO, a
    device or a link loop is refused in one line, never opened)."""
    try:
        regular_file(path)
    except FileNotFoundError:
        raise CheckpointFormatError("no such file", path) from None
    except OSError as error:
        raise CheckpointFormatError(
            f"cannot read file: {error.strerror}", path, "check the path and its permissions"
        ) from None
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
        weight_map = read_json(index_file)["weight_map"]
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
        raise IncompleteCheckpointError(
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
