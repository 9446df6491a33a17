"""FSDP2 from the meta device: every rank reads only its shard of the base model.

The torchtitan/torchtune recipe. Under ``--fsdp`` the model is built with its stored
weights on ``meta`` (:func:`~wdanalysis.train.model.load_pretrained` with ``empty``: real
buffers, a new head and the adapter factors drawn for real, so the random init is one
process's), adapters are injected, ``fully_shard`` cuts every parameter into dimension-0
chunks, and :func:`materialise` allocates each rank's chunks and fills them straight from
the safetensors files, one ``pread`` of just those rows per tensor
(:func:`wdanalysis.storage.row_reader.read_rows`). No rank ever holds the whole model.

DoRA's magnitude m = ||W0||_c (B = 0 at initialisation) is computed from the real base
rows: for ``nn.Linear`` the (out, in) weight and m are chunked alike over the output
rows, so each rank computes the norms of its own rows, exactly as one process does; for
GPT-2 ``Conv1D`` the weight is (in, out) and its rows are input features, so each rank
sums the squares of its rows and one ``all_reduce`` completes the norms.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from wdanalysis.errors import CheckpointFormatError
from wdanalysis.storage.hub_cache import resolve_model_path
from wdanalysis.storage.row_reader import Extent, read_rows, safetensors_layout
from wdanalysis.train.inject import adapter_layers, unwrap_key
from wdanalysis.train.layers import DoRALinear, is_conv1d, row_norm
from wdanalysis.train.model import safetensors_files, stored_key


def has_meta_parameters(model: nn.Module) -> bool:
    return any(p.device.type == "meta" for p in model.parameters())


def local_part(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's chunk of an FSDP2 parameter (a ``DTensor``), or the tensor itself."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def chunk_start(rows: int, rank: int, size: int) -> int:
    """First row of ``rank``'s chunk when FSDP2 cuts ``rows`` with ``torch.chunk``."""
    per_rank = -(-rows // size)
    return min(rank * per_rank, rows)


@torch.no_grad()
def materialise(model: nn.Module, model_dir: str | Path, device: torch.device) -> None:
    """Allocate every meta parameter's local chunk on ``device`` and fill it from disk.

    Call after ``fully_shard``. What was already real (buffers, a new head, adapter
    factors) is kept as it was.
    """
    if not has_meta_parameters(model):
        return
    rank, size = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    kept = {
        name: local_part(p).detach().clone()
        for name, p in model.named_parameters()
        if p.device.type != "meta"
    }
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    magnitudes = {f"{name}.lora_magnitude_vector" for name in dora_layers(model)}
    layout = _layout(resolve_model_path(model_dir))
    model.to_empty(device=device)
    for name, param in model.named_parameters():
        local = local_part(param)
        if name in kept:
            local.copy_(kept[name])
        elif name not in magnitudes:
            extent = _extent(model, name, layout, model_dir)
            start = chunk_start(extent.shape[0], rank, size) if param is not local else 0
            local.copy_(read_rows(extent, start, local.shape[0]))
    for name, buffer in model.named_buffers():
        buffer.copy_(buffers[name])
    for layer in dora_layers(model).values():
        fill_magnitude(layer, rank, size)


def dora_layers(model: nn.Module) -> dict[str, DoRALinear]:
    return {n: m for n, m in adapter_layers(model).items() if isinstance(m, DoRALinear)}


def fill_magnitude(layer: DoRALinear, rank: int, size: int) -> None:
    """m = ||W0 + s B A||_c with B = 0 (initialisation): the norms of the real base rows."""
    weight = local_part(layer.base_layer.weight)
    magnitude = local_part(layer.lora_magnitude_vector)
    if not is_conv1d(layer.base_layer):  # (out, in): this rank's rows are its m entries
        magnitude.copy_(row_norm(weight).to(magnitude.dtype))
        return
    squares = weight.to(torch.float64).square().sum(dim=0)  # (out,) partial over in-rows
    if size > 1:
        dist.all_reduce(squares)
    start = chunk_start(squares.shape[0], rank, size)
    magnitude.copy_(squares.sqrt()[start : start + magnitude.shape[0]].to(magnitude.dtype))


def _layout(model_dir: Path) -> dict[str, Extent]:
    layout: dict[str, Extent] = {}
    for path in safetensors_files(model_dir):
        layout.update(safetensors_layout(path))
    return layout


def _extent(model: nn.Module, name: str, layout: dict[str, Extent], model_dir) -> Extent:
    key = stored_key(model, unwrap_key(name), layout)
    if key is None:
        raise CheckpointFormatError(
            f"--fsdp: parameter {unwrap_key(name)!r} is not in the safetensors files "
            "(or not in a dtype read by rows: F32, F16, BF16, F64)",
            path=model_dir,
            hint="re-save the model with save_pretrained(..., safe_serialization=True)",
        )
    return layout[key]
