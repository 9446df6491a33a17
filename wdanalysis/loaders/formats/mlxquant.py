"""Quantized mlx models (``mlx_lm.convert -q``, the usual base of an mlx-lm QLoRA run),
dequantized exactly on read.

mlx's affine quantization stores each quantized ``weight`` as ``uint32`` words holding a
little-endian stream of ``bits``-bit integers ``q`` (any ``bits`` from 2 to 8), with one
``scales`` and one ``biases`` entry per ``group_size`` consecutive inputs:
``w = scales · q + biases``. ``config.json``'s ``quantization`` gives ``group_size``,
``bits`` and ``mode``, with per-module entries for mixed recipes. The weights the adapter
was trained against are computed here in float64 from the stored integers and scales (mlx
itself rounds them to the scales' dtype), so ΔM/ΔD need no dequantized copy on disk. Only
the affine mode is read; ``mxfp4``/``nvfp4``/``mxfp8`` are refused by name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch

from wdanalysis.errors import CheckpointFormatError
from wdanalysis.storage.small_files import read_json
from wdanalysis.storage.tensor_store import TensorInfo, TensorStore

_CHUNK = 1 << 24  # unpacked bits per chunk of rows: bounds the temporary memory
FIX = "dequantize it first: mlx_lm.convert --hf-path QUANTIZED --mlx-path OUT --dequantize"


def packed_weights(store: TensorStore) -> list[str]:
    """``.weight`` keys stored as packed integers beside a ``.scales`` tensor."""
    found = []
    for key in store.keys():
        if key.endswith(".scales"):
            weight = key[: -len(".scales")] + ".weight"
            dtype = store.dtype(weight) if weight in store else torch.float32
            if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
                found.append(weight)
    return found


@dataclass(frozen=True)
class Packing:
    group_size: int
    bits: int
    scales: str
    biases: str


@dataclass
class DequantizedStore(TensorStore):
    """A store whose packed mlx weights read as float64 matrices of their real shape."""

    reads_as_stored: ClassVar[bool] = False  # packed integers on disk, floats on read
    packed: dict[str, Packing] = field(default_factory=dict)
    hidden: dict[str, TensorInfo] = field(default_factory=dict)  # scales and biases

    def get(self, key: str) -> torch.Tensor:
        packing = self.packed.get(key)
        if packing is None:
            return super().get(key)
        return dequantize(
            super().get(key),
            self.read(packing.scales, self.hidden[packing.scales]),
            self.read(packing.biases, self.hidden[packing.biases]),
            packing.group_size,
            packing.bits,
        )


def dequantize(
    q: torch.Tensor, scales: torch.Tensor, biases: torch.Tensor, group_size: int, bits: int
) -> torch.Tensor:
    """``scales · q + biases`` in float64, ``q`` unpacked from little-endian ``uint32``."""
    lead, words = q.shape[:-1], q.shape[-1]
    n_in = scales.shape[-1] * group_size
    raw = q.contiguous().view(torch.uint8).reshape(-1, words * 4)
    scales = scales.to(torch.float64).reshape(raw.shape[0], -1, 1)
    biases = biases.to(torch.float64).reshape(raw.shape[0], -1, 1)
    place = (1 << torch.arange(bits, dtype=torch.int32)).reshape(1, 1, bits)
    shifts = torch.arange(8, dtype=torch.uint8)
    out = torch.empty(raw.shape[0], n_in, dtype=torch.float64)
    step = max(1, _CHUNK // (n_in * bits))
    for start in range(0, raw.shape[0], step):
        rows = raw[start : start + step]
        stream = ((rows.unsqueeze(-1) >> shifts) & 1).reshape(rows.shape[0], -1)
        ints = stream[:, : n_in * bits].reshape(rows.shape[0], n_in, bits).to(torch.int32) * place
        values = ints.sum(-1).to(torch.float64).reshape(rows.shape[0], -1, group_size)
        chunk = values * scales[start : start + step] + biases[start : start + step]
        out[start : start + step] = chunk.reshape(rows.shape[0], n_in)
    return out.reshape(*lead, n_in)


def dequantized(store: TensorStore, folder: Path) -> TensorStore:
    """``store`` with its packed mlx weights presented dequantized (``store`` itself when
    it has none). The packing of each weight comes from ``config.json``."""
    weights = packed_weights(store)
    if not weights:
        return store
    quantization = _quantization(folder, store.infos[weights[0]].file)
    infos = dict(store.infos)
    packed, hidden = {}, {}
    for key in weights:
        module = key[: -len(".weight")]
        packing = _packing(module, quantization, store, folder)
        shape = store.shape(packing.scales)
        infos[key] = TensorInfo(
            (*shape[:-1], shape[-1] * packing.group_size),
            store.dtype(packing.scales),
            store.infos[key].file,
            store.infos[key].name,
        )
        for companion in (packing.scales, packing.biases):
            hidden[companion] = infos.pop(companion)
        packed[key] = packing
    return DequantizedStore(
        store.path,
        f"{store.format}, mlx affine quantized (dequantized on read)",
        infos,
        packed=packed,
        hidden=hidden,
    )


def _quantization(folder: Path, where: Path) -> dict:
    try:
        config = read_json(folder / "config.json")
    except (OSError, ValueError):
        config = {}
    quantization = config.get("quantization") if isinstance(config, dict) else None
    if not isinstance(quantization, dict):
        raise CheckpointFormatError(
            "mlx quantized weights (uint32 .weight beside .scales) without the "
            "'quantization' entry of their config.json",
            where,
            "keep the config.json mlx-lm saved beside the weights, or " + FIX,
        )
    return quantization


def _packing(module: str, quantization: dict, store: TensorStore, folder: Path) -> Packing:
    params = quantization.get(module)
    params = {**quantization, **params} if isinstance(params, dict) else quantization
    group_size, bits = params.get("group_size"), params.get("bits")
    mode = params.get("mode", "affine")
    weight, scales, biases = f"{module}.weight", f"{module}.scales", f"{module}.biases"
    where = store.infos[weight].file
    if mode != "affine" or biases not in store:
        raise CheckpointFormatError(
            f"{module} is mlx {mode} quantized; only the affine mode is read", where, FIX
        )
    if not (isinstance(group_size, int) and isinstance(bits, int) and 2 <= bits <= 8):
        raise CheckpointFormatError(
            f"config.json gives no valid group_size/bits for {module} ({group_size!r}, {bits!r})",
            folder / "config.json",
            FIX,
        )
    q_shape, s_shape = store.shape(weight), store.shape(scales)
    if store.shape(biases) != s_shape or q_shape[-1] * 32 != s_shape[-1] * group_size * bits:
        raise CheckpointFormatError(
            f"{module}: packed weight {list(q_shape)} and scales {list(s_shape)} do not fit "
            f"group_size {group_size}, bits {bits} of config.json",
            where,
            "the config and the weights come from different saves",
        )
    return Packing(group_size, bits, scales, biases)
