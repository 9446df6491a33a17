"""What the ranks of a sharded training (FSDP2, DeepSpeed ZeRO-3) agree on while tracking.

Reading a sharded weight whole is a collective call (``DTensor.full_tensor()``, ZeRO-3's
gather): every rank must make the same calls in the same order, or the job hangs. So under
sharding every rank runs the tracker on the same gathered tensors (the same numbers, in
the same order) and rank 0 alone writes. Decisions that could differ between ranks (a
file only rank 0 can read, a write that failed) are agreed on here before the next
collective call: the steps already in the table come from rank 0, and tracking goes on
only while every rank says it can.
"""

from __future__ import annotations

import torch

__all__ = ["all_agree", "distributed", "from_first", "rank"]


def distributed() -> bool:
    """Whether this process is one of several in an initialised process group."""
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return torch.distributed.get_rank() if distributed() else 0


def all_agree(flag: bool, device: torch.device) -> bool:
    """``True`` on every rank when ``flag`` is true on every rank (collective)."""
    if not distributed():
        return flag
    if torch.distributed.get_backend() == "nccl" and device.type != "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    vote = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    torch.distributed.all_reduce(vote, op=torch.distributed.ReduceOp.MIN)
    return bool(vote.item())


def from_first(value):
    """Rank 0's ``value`` on every rank (collective; any picklable value)."""
    if not distributed():
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]
