"""Why the safetensors library refused a file, in one line a user can act on.

The library decides validity
(:func:`wdanalysis.storage.tensor_store.read_safetensors_header` accepts exactly what
``safe_open`` accepts); when it refuses, this names the tensor and the problem (bad dtype,
shape, offsets, overlaps, a truncated file) where the header lets us, and falls back to the
library's own reason.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from safetensors import SafetensorError

from wdanalysis.errors import CheckpointFormatError, IncompleteCheckpointError

# Bits per element of every safetensors dtype, to check each tensor's byte range.
DTYPE_BITS = {
    **dict.fromkeys(("F64", "I64", "U64", "C64"), 64),
    **dict.fromkeys(("F32", "I32", "U32"), 32),
    **dict.fromkeys(("F16", "BF16", "I16", "U16"), 16),
    **dict.fromkeys(("F8_E4M3", "F8_E5M2", "F8_E8M0", "I8", "U8", "BOOL"), 8),
    **dict.fromkeys(("F8_E4M3FNUZ", "F8_E5M2FNUZ"), 8),
    **dict.fromkeys(("F6_E2M3", "F6_E3M2"), 6),
    "F4": 4,
}
_REFETCH = "the file is damaged or not safetensors; re-download or re-save it"


def refusal(path: Path, error: SafetensorError, size: int, header_len: int):
    """The one-line error for a file the safetensors library refused."""
    try:
        with open(path, "rb") as handle:
            handle.seek(8)
            header = json.loads(handle.read(header_len))
        _explain_refusal(header, path, data_bytes=size - 8 - header_len)
    except CheckpointFormatError as explained:
        return explained
    except (OSError, ValueError, RecursionError):  # not JSON: the library's reason says why
        pass
    reason = first_line(error).replace("Error while deserializing header: ", "")
    reason = re.sub(r", expected one of .*? at line", " at line", reason)[:200]
    return CheckpointFormatError(f"corrupt safetensors header: {reason}", path, _REFETCH)


def _explain_refusal(header, path: Path, data_bytes: int) -> None:
    """Raise the plainest true reason a refused header is wrong (dtype, shape, byte range,
    tensors not covering the data exactly); return if none of these is the reason."""
    if not isinstance(header, dict):
        return
    ranges: list[tuple[int, int, str]] = []
    for key, entry in header.items():
        if key == "__metadata__":
            if entry is not None and not (
                isinstance(entry, dict) and all(isinstance(v, str) for v in entry.values())
            ):
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
            raise IncompleteCheckpointError(
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
    _check_contiguous(sorted(ranges), data_bytes, path)


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


def first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else error.__class__.__name__
