"""FP8 weights (``F8_E4M3``, ``F8_E5M2``) with their scales, dequantized exactly on read.

Every FP8 checkpoint format in use stores the quantized values ``q`` and a float scale
that multiplies them: ``W[i, j] = q[i, j] · s[i // b0, j // b1]`` for a block of
``b0 × b1`` entries per scale (a scale of shape ``(ceil(out / b0), ceil(in / b1))``, edge
blocks partial). The layouts, as ``config.json``'s ``quantization_config`` names them:

* DeepSeek-V3/R1 and transformers' ``FineGrainedFP8Config`` (``quant_method: fp8`` with
  ``weight_block_size``, 128×128): ``weight_scale_inv`` per block (multiplied, despite its
  name, as DeepSeek's ``weight_dequant`` and transformers do); without a block size, one
  scale for the tensor;
* compressed-tensors ``format: float-quantized`` (or ``naive-quantized``): ``weight_scale``
  per ``strategy`` of the config group: ``tensor``, ``channel`` (one per output row),
  ``group`` (``group_size`` inputs) or ``block`` (``block_structure``);
* FBGEMM (``quant_method: fbgemm_fp8``): ``weight_scale`` per output row;
* no ``quantization_config``: a scale that can mean one thing only (one for the tensor, or
  one per output row) is read; a block scale needs its block size and is refused.

``q · s`` is formed in float64, where it is exact (an FP8 value has at most 4 significant
bits, a float32 scale 24). The weight is read one block of rows at a time
(:class:`~wdanalysis.storage.row_blocks.RowBlocks`), so the engine's memory stays bounded.
Scales and the activations' ``input_scale`` are companions, never analysed as weights. An
FP8 tensor whose scale is missing, or whose scale does not fit the layout the config gives,
is refused in one line when it is selected (:meth:`Fp8Store.refusal`).
"""

from __future__ import annotations

import functools
import json
import math
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch

from wdanalysis.errors import CheckpointFormatError
from wdanalysis.storage.row_blocks import RowBlocks
from wdanalysis.storage.row_reader import Extent, open_for_reading, read_at, read_error
from wdanalysis.storage.tensor_store import TensorInfo, TensorStore, real_key

FP8_NAMES = {
    getattr(torch, attr): name
    for attr, name in (
        ("float8_e4m3fn", "F8_E4M3"),
        ("float8_e5m2", "F8_E5M2"),
        ("float8_e4m3fnuz", "F8_E4M3FNUZ"),
        ("float8_e5m2fnuz", "F8_E5M2FNUZ"),
    )
    if hasattr(torch, attr)
}
SCALE_SUFFIXES = ("_scale_inv", "_scale")  # the weight's key + suffix
# Companions that concern activations, not the weight: hidden, never read.
_ACTIVATION_SUFFIXES = (".input_scale", ".input_scale_ub", ".input_zero_point")
_READABLE_SCALES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
_E8M0 = getattr(torch, "float8_e8m0fnu", None)
FIX = "dequantize it with the library that wrote it and save the result in bf16/fp32"


def is_fp8(dtype) -> bool:
    return dtype in FP8_NAMES


@dataclass(frozen=True)
class Scaling:
    """How one FP8 weight is read: its scale tensor and the block each scale covers."""

    scale: str  # key of the scale tensor
    block: tuple[int, int]  # (rows, cols) of the weight per scale entry
    layout: str  # "block 128×128", "per output channel", "per tensor", …


@dataclass
class Fp8Store(TensorStore):
    """A store whose FP8 weights read as float64 matrices, dequantized with their scales."""

    reads_as_stored: ClassVar[bool] = False  # FP8 values on disk, float64 on read
    scaled: dict[str, Scaling] = field(default_factory=dict)
    stored: dict[str, TensorInfo] = field(default_factory=dict)  # FP8 weights as on disk
    hidden: dict[str, TensorInfo] = field(default_factory=dict)  # scales, input scales
    refused: dict[str, CheckpointFormatError] = field(default_factory=dict)
    extents: dict[str, Extent] = field(default_factory=dict)  # FP8 bytes in safetensors
    method: str = ""  # what the config says, for inspect

    def refusal(self, key: str) -> CheckpointFormatError | None:
        """Why ``key`` cannot be read (an FP8 weight without a scale it understands)."""
        return self.refused.get(key)

    def dtypes(self) -> set[str]:
        infos = {**self.infos, **self.stored}
        return {str(i.dtype).replace("torch.", "") for i in infos.values()}

    def get(self, key: str) -> torch.Tensor:
        if key in self.refused:
            raise self.refused[key]
        if key not in self.scaled:
            return super().get(key)
        rows = self.stored[key].shape[0] if self.stored[key].shape else 1
        return self._rows(key, 0, rows)

    def row_blocks(self, key: str) -> RowBlocks | None:
        """The FP8 weight ``key`` read a block of rows at a time (``None``: another key)."""
        if key not in self.scaled:
            return None
        return RowBlocks(self.stored[key].shape, lambda start, stop: self._rows(key, start, stop))

    def _rows(self, key: str, start: int, stop: int) -> torch.Tensor:
        """Stored rows ``start:stop`` of the FP8 weight ``key``, dequantized in float64."""
        info, scaling = self.stored[key], self.scaled[key]
        q = self._stored_rows(key, info, start, stop)
        scale = self.read(scaling.scale, self.hidden[scaling.scale]).to(torch.float64)
        return dequantize_rows(q, scale, scaling.block, start, info.shape)

    def _stored_rows(self, key: str, info: TensorInfo, start: int, stop: int) -> torch.Tensor:
        """The FP8 rows as stored: one positioned read of their bytes (safetensors, no
        mapping that would stay in memory), else from the tensor the file format loads."""
        extent = self.extents.get(key)
        if extent is None:
            return self.read(key, info)[start:stop]
        rows = info.shape[0] if info.shape else 1
        row_bytes = extent.nbytes // max(rows, 1)
        out = torch.empty((stop - start) * row_bytes, dtype=torch.uint8)
        try:
            with open_for_reading(extent.file) as handle:
                read_at(handle, memoryview(out.numpy()), extent.offset + start * row_bytes)
        except OSError as error:
            raise read_error(key, extent, error) from None
        return out.view(extent.dtype).reshape(stop - start, *info.shape[1:])

    def describe(self) -> dict:
        """For ``inspect``: which weights are FP8 and how their scales are read."""
        layouts = sorted({s.layout for s in self.scaled.values()})
        kinds = sorted({FP8_NAMES[self.stored[k].dtype] for k in self.stored})
        info = {
            "fp8": f"{len(self.stored)} {'/'.join(kinds)} tensors ({self.method}): "
            f"W = fp8 · scale, {'; '.join(layouts) or 'none readable'}, "
            "dequantized exactly to float64 on read",
        }
        if self.refused:
            info["fp8_refused"] = f"{len(self.refused)}: {next(iter(self.refused.values()))}"
        return info


def dequantize_rows(q, scale, block, start: int, shape) -> torch.Tensor:
    """``q · s`` in float64 for stored rows ``start:start+len(q)`` of a weight of ``shape``,
    each entry of the 2-D ``scale`` covering a ``block`` of the weight (edge blocks partial)."""
    values = q.to(torch.float64)  # a new tensor: scaled in place below
    if scale.numel() == 1:
        return values.mul_(scale.reshape(()))
    b0, b1 = block
    scale = scale.reshape(-(-shape[0] // b0), -(-shape[1] // b1))
    rows = scale[torch.arange(start, start + values.shape[0]) // b0]  # (n, column blocks)
    full = shape[1] // b1  # whole column blocks; a last partial one after them
    values[:, : full * b1].unflatten(1, (full, b1)).mul_(rows[:, :full, None])
    if full * b1 < shape[1]:
        values[:, full * b1 :].mul_(rows[:, full:])
    return values


# ------------------------------------------------------------------------------ opening


def dequantized(store: TensorStore, folder: Path) -> TensorStore:
    """``store`` with its FP8 tensors presented dequantized (``store`` itself when it has
    none); how each scale is read comes from ``folder``'s ``config.json``."""
    fp8 = [k for k in store.keys() if is_fp8(store.dtype(k))]
    if not fp8 or type(store) is not TensorStore:  # another view's FP8: refused as quantized
        return store
    config_file = folder / "config.json"
    method, layouts = _config_layouts(config_file)
    infos = dict(store.infos)
    result = Fp8Store(store.path, f"{store.format}, FP8 (dequantized on read)", infos)
    result.method = method
    for key in fp8:
        result.stored[key] = info = infos[key]
        companions = _companions(store, key)
        for name in companions:
            result.hidden[name] = infos.pop(name)
        try:
            result.scaled[key] = _scaling(store, key, companions, layouts, method)
        except CheckpointFormatError as error:
            result.refused[key] = error
            continue
        infos[key] = TensorInfo(info.shape, torch.float64, info.file, info.name)
        extent = _extent(info, key)
        if extent is not None:
            result.extents[key] = extent
    return result


def _extent(info: TensorInfo, key: str) -> Extent | None:
    """Where the FP8 tensor's bytes lie in its safetensors file (header parsed once)."""
    if info.file.suffix != ".safetensors":
        return None
    try:
        start, header = _header(info.file, info.file.stat().st_mtime_ns)
        begin, end = header[real_key(info, key)]["data_offsets"]
    except (OSError, ValueError, KeyError, TypeError):
        return None  # read through the file format instead
    return Extent(info.file, start + begin, end - begin, info.dtype, info.shape)


@functools.lru_cache(maxsize=64)
def _header(file: Path, _mtime: int) -> tuple[int, dict]:
    with open(file, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        return 8 + length, json.loads(handle.read(length))


def _companions(store: TensorStore, key: str) -> list[str]:
    """The tensors saved for ``key``'s quantization: its scales and input scales."""
    module = key[: -len(".weight")] if key.endswith(".weight") else None
    names = [key + suffix for suffix in (*SCALE_SUFFIXES, "_zero_point")]
    if module is not None:
        names += [module + suffix for suffix in _ACTIVATION_SUFFIXES]
    return [name for name in names if name in store]


def _scaling(store: TensorStore, key: str, companions, layouts, method: str) -> Scaling:
    where = store.infos[key].file
    scales = [key + s for s in SCALE_SUFFIXES if key + s in companions]
    kind = FP8_NAMES[store.dtype(key)]
    if not scales:
        raise CheckpointFormatError(
            f"{kind} tensor {key!r} has no scale (no {key.rsplit('.', 1)[-1]}_scale_inv or "
            "_scale tensor beside it), so its values cannot be known",
            where,
            FIX,
        )
    if len(scales) > 1:
        raise CheckpointFormatError(
            f"{kind} tensor {key!r} has both {scales[0]!r} and {scales[1]!r}: which one "
            "scales it is not known",
            where,
            FIX,
        )
    _check_zero_point(store, key, where)
    scale = scales[0]
    dtype = store.dtype(scale)
    if dtype not in _READABLE_SCALES and (_E8M0 is None or dtype != _E8M0):
        raise CheckpointFormatError(
            f"scale {scale!r} of {key!r} has dtype {str(dtype).replace('torch.', '')}, not a "
            "float scale this reader knows",
            where,
            FIX,
        )
    if isinstance(layouts, str):  # the config says why none is read
        raise CheckpointFormatError(f"{kind} tensor {key!r}: {layouts}", where, FIX)
    return _fit(key, store.shape(key), scale, store.shape(scale), layouts, method, where)


def _check_zero_point(store: TensorStore, key: str, where: Path) -> None:
    """A zero point (asymmetric quantization) is read only when it is zero everywhere."""
    name = key + "_zero_point"
    if name in store and bool(store.get(name).to(torch.float64).abs().max() > 0):
        raise CheckpointFormatError(
            f"{name!r} is not zero: asymmetric FP8 quantization is not read", where, FIX
        )


def _fit(key, shape, scale, scale_shape, layouts, method, where) -> Scaling:
    """The one layout of ``layouts`` that ``scale_shape`` fits, as a block size."""
    numel = math.prod(scale_shape)
    if numel == 1 and ("tensor" in [lay[0] for lay in layouts] or len(shape) != 2):
        return Scaling(scale, (0, 0), f"per tensor ({scale.rsplit('.', 1)[-1]})")
    if len(shape) != 2:
        raise CheckpointFormatError(
            f"FP8 tensor {key!r} of shape {list(shape)} has a scale of shape "
            f"{list(scale_shape)}: only one scale per tensor is read for tensors that are "
            "not matrices",
            where,
            FIX,
        )
    out, n_in = shape
    fits = {}
    for name, b0, b1 in layouts:
        b0, b1 = {"tensor": (out, n_in), "channel": (1, n_in)}.get(name, (b0, b1))
        grid = (-(-out // b0), -(-n_in // b1))
        if tuple(scale_shape) == grid or (name == "channel" and tuple(scale_shape) == (out,)):
            fits[(min(b0, out), min(b1, n_in))] = _layout_name(name, b0, b1)
    if len(fits) == 1:
        ((block, layout),) = fits.items()
        return Scaling(scale, block, f"{layout} ({scale.rsplit('.', 1)[-1]})")
    wanted = ", ".join(_layout_name(*lay) for lay in layouts)
    problem = "fits several layouts" if fits else "fits none of the layouts"
    raise CheckpointFormatError(
        f"scale {scale!r} of shape {list(scale_shape)} for the weight of shape {list(shape)} "
        f"{problem} {method} allows ({wanted})",
        where,
        FIX,
    )


def _layout_name(name: str, b0: int, b1: int) -> str:
    return {
        "tensor": "per tensor",
        "channel": "per output channel",
        "group": f"per group of {b1} inputs",
        "block": f"block {b0}×{b1}",
    }[name]


def _config_layouts(config_file: Path) -> tuple[str, list | str]:
    """``(the method as the config names it, the layouts it allows)``; the layouts are a
    string (the reason) when the config names a method whose FP8 weights are not read."""
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError):
        config = {}
    config = config if isinstance(config, dict) else {}
    quant = config.get("quantization_config") or config.get("compression_config")
    if not isinstance(quant, dict):
        return "no quantization_config: scale read by its shape", [
            ("tensor", 0, 0),
            ("channel", 0, 0),
        ]
    method = str(quant.get("quant_method", ""))
    if method == "fp8":
        size = quant.get("weight_block_size")
        if size is None:
            return "quant_method fp8, per tensor", [("tensor", 0, 0)]
        if _is_block(size):
            return f"quant_method fp8, weight_block_size {list(size)}", [("block", *size)]
        return method, f"config.json's weight_block_size {size!r} is not two positive integers"
    if method == "fbgemm_fp8":
        return "quant_method fbgemm_fp8", [("channel", 0, 0)]
    if method == "compressed-tensors":
        return _compressed_tensors(quant)
    return method, f"quant_method {method!r} of config.json is not a FP8 format this reader knows"


def _compressed_tensors(quant: dict) -> tuple[str, list | str]:
    """The layouts of compressed-tensors' FP8 config groups (8-bit float weights)."""
    fmt = quant.get("format")
    method = f"compressed-tensors, format {fmt}"
    if fmt not in ("float-quantized", "naive-quantized"):
        return method, f"compressed-tensors format {fmt!r} is not read for FP8 weights"
    layouts = []
    groups = quant.get("config_groups")
    for group in (groups or {}).values() if isinstance(groups, dict) else ():
        weights = group.get("weights") if isinstance(group, dict) else None
        if not isinstance(weights, dict):
            continue
        if weights.get("type") != "float" or weights.get("num_bits") != 8:
            continue
        strategy = weights.get("strategy")
        if strategy in ("tensor", "channel"):
            layouts.append((strategy, 0, 0))
        elif strategy == "group" and _is_block([1, weights.get("group_size")]):
            layouts.append(("group", 1, weights["group_size"]))
        elif strategy == "block" and _is_block(weights.get("block_structure")):
            layouts.append(("block", *weights["block_structure"]))
        else:
            return method, f"compressed-tensors weight strategy {strategy!r} is not read"
    if not layouts:
        return method, "its config_groups declare no 8-bit float weights"
    return method, layouts


def _is_block(size) -> bool:
    return (
        isinstance(size, (list, tuple))
        and len(size) == 2
        and all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in size)
    )
