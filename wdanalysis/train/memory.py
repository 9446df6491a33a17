"""Training memory of a DoRA layer stack, with and without the Sec. 4.3 norm detach.

On CPU the honest, allocator-independent figure is the number of bytes autograd keeps
alive for backward (``saved_tensors_hooks``): that is what the detach removes, one
(out, in) matrix V + ΔV per layer plus its low-rank factors' graph. On CUDA the peak
allocation over forward + backward is measured as well.
"""

from __future__ import annotations

import torch
from torch import nn

from wdanalysis.train.layers import DoRALinear


def layer_stack(layers: int, width: int, r: int, detach_norm: bool) -> nn.Sequential:
    torch.manual_seed(0)
    blocks = []
    for _ in range(layers):
        blocks += [
            DoRALinear(nn.Linear(width, width), r=r, alpha=2 * r, detach_norm=detach_norm),
            nn.GELU(),
        ]
    return nn.Sequential(*blocks)


def saved_tensor_bytes(
    detach_norm: bool,
    layers: int = 8,
    width: int = 1024,
    tokens: int = 512,
    r: int = 8,
    device: str = "cpu",
) -> int:
    """Bytes of distinct tensors saved for backward by one forward pass of the stack."""
    model = layer_stack(layers, width, r, detach_norm).to(device)
    x = torch.randn(tokens, width, device=device)
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if not isinstance(tensor, nn.Parameter) and not _is_parameter(model, tensor):
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = model(x).square().mean()
    loss.backward()
    return sum(storages.values())


def _is_parameter(model: nn.Module, tensor: torch.Tensor) -> bool:
    """Parameters are resident anyway; count only what training adds on top."""
    pointer = tensor.untyped_storage().data_ptr()
    return any(p.untyped_storage().data_ptr() == pointer for p in model.parameters())


def cuda_peak_bytes(
    detach_norm: bool, layers: int = 8, width: int = 1024, tokens: int = 512, r: int = 8
) -> int:
    """Peak CUDA allocation of forward + backward, minus what the model itself holds."""
    model = layer_stack(layers, width, r, detach_norm).cuda()
    x = torch.randn(tokens, width, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated()
    model(x).square().mean().backward()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - start
