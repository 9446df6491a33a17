"""The trainer under ``torchrun``: process group, batch shards, DDP or FSDP2, gathered state.

Started without torchrun, everything here is the one-process case (``World()``) and does
what the single-process trainer always did. Under ``torchrun --nproc_per_node N`` every rank
builds the same model from the same seeds, takes its contiguous 1/N of each *global* batch
(``--batch-size`` stays the global batch, so data order and results match one process),
and the model is wrapped in ``DistributedDataParallel`` or, with ``--fsdp``, sharded with
FSDP2's ``fully_shard``. Only rank 0 writes checkpoints; what it writes is gathered into the
same files one process writes, so a run can resume with another number of processes.

Failures never hang the job: what rank 0 decides alone (the run folder, a checkpoint write)
is broadcast to the other ranks with its outcome, so an error there is raised on every
rank; an error on any other rank makes that process exit non-zero, and torchrun's agent
then stops the others. Collectives time out after ``TIMEOUT`` as a last resort.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from wdanalysis.errors import WDAnalysisError
from wdanalysis.train import checkpoint as ckpt

TIMEOUT = timedelta(minutes=30)  # a checkpoint of a large model may take minutes to write
T = TypeVar("T")


@dataclass(frozen=True)
class World:
    """This process's place in the job; ``World()`` is a single process."""

    size: int = 1
    rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    fsdp: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    return all(name in os.environ for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise WDAnalysisError("--device cuda but no CUDA GPU is visible", hint="use --device cpu")
    return torch.device(name)


def join(device_name: str, fsdp: bool, batch_size: int) -> World:
    """This process's ``World``; under torchrun, start the process group (NCCL or gloo)."""
    device = resolve_device(device_name)
    if not launched_by_torchrun() and not dist.is_initialized():
        if fsdp:
            raise WDAnalysisError(
                "--fsdp shards the model over torchrun's processes",
                hint="launch with: torchrun --nproc_per_node N -m wdanalysis train ... --fsdp",
            )
        return World(device=device)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=TIMEOUT)
    world = World(dist.get_world_size(), dist.get_rank(), device, fsdp)
    if batch_size % world.size:
        raise WDAnalysisError(
            f"--batch-size {batch_size} is the global batch and does not divide over "
            f"{world.size} processes",
            hint=f"use a multiple of {world.size}, or another --nproc_per_node",
        )
    return world


@contextlib.contextmanager
def session() -> Iterator[None]:
    """Tear the process group down when the command ends, also after an error."""
    try:
        yield
    except BaseException:
        if dist.is_initialized():
            dist.destroy_process_group()
        raise
    if dist.is_initialized():
        # Every rank reaches teardown before any leaves: a rank destroying gloo while its
        # peer still finishes has been seen to abort ("terminate called without an active
        # exception") on a loaded 2-core machine.
        dist.barrier()
        dist.destroy_process_group()


def shard(indices: list[int], world: World) -> list[int]:
    """This rank's contiguous share of one global batch."""
    per_rank = len(indices) // world.size
    return indices[world.rank * per_rank : (world.rank + 1) * per_rank]


def all_sum(values: torch.Tensor, world: World) -> torch.Tensor:
    if world.size > 1:
        dist.all_reduce(values)
    return values


def rank_seed(seed: int, world: World) -> int:
    """Rank 0 keeps the single-process seed; other ranks draw their own dropout masks."""
    return seed + 7919 * world.rank


def on_main(world: World, action: Callable[[], T]) -> T:
    """Run ``action`` on rank 0 only; every rank returns its result or raises its error."""
    if world.size == 1:
        return action()
    outcome: list = [None]
    error = None
    if world.is_main:
        try:
            outcome[0] = ("ok", action())
        except BaseException as caught:  # also KeyboardInterrupt: never leave ranks waiting
            error = caught
            outcome[0] = ("error", str(caught) or type(caught).__name__)
    dist.broadcast_object_list(outcome, src=0)
    if error is not None:
        raise error
    status, value = outcome[0]
    if status == "error":
        raise WDAnalysisError(f"rank 0 failed: {value}")
    return value


def _blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks (elements of ``nn.ModuleList``s), outermost only: FSDP units."""
    chosen: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList):
            continue
        if any(name.startswith(f"{outer}.") for outer, _ in chosen):
            continue
        chosen += [(f"{name}.{i}", block) for i, block in enumerate(module)]
    return [block for _, block in chosen]


def wrap(model: nn.Module, world: World) -> nn.Module:
    """Move to this rank's device; DDP over several ranks, or FSDP2 shards with ``fsdp``.

    Called after the adapters are injected. Under FSDP a model built on ``meta`` is sharded
    as it is and filled afterwards, each rank reading its rows, DoRA's magnitude from the
    real base rows (:func:`wdanalysis.train.sharded_load.materialise`): the torchtune
    meta-device pitfall (m from meta or zero weights) is avoided there.
    """
    if world.fsdp:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(world.device.type, (world.size,))
        for block in _blocks(model):
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model
    model.to(world.device)
    if world.size == 1:
        return model
    ids = [world.device.index] if world.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module inside DDP (FSDP2 shards it in place, nothing to unwrap)."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def _options(**extra):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **extra)


def model_state(
    model: nn.Module, world: World, only: Callable[[str, nn.Parameter], bool] | None = None
) -> dict[str, torch.Tensor]:
    """The full state dict (every rank takes part under FSDP; only rank 0 gets it).

    ``only(name, parameter)``: under FSDP gather just those parameters (an adapter run's
    factors, magnitudes and head: megabytes), not the base model rank 0 would otherwise
    have to hold whole at every checkpoint.
    """
    if not world.fsdp:
        return unwrap(model).state_dict()
    if only is not None:
        chosen = [(name, p) for name, p in model.named_parameters() if only(name, p)]
        return {name: _full_tensor(p).detach().cpu() for name, p in chosen}  # all ranks
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_options(cpu_offload=True))


def load_model_state(model: nn.Module, state: dict, world: World, strict: bool) -> None:
    """Load a full (unsharded) state dict; FSDP2 keeps each rank's shard of it."""
    if not world.fsdp:
        unwrap(model).load_state_dict(state, strict=strict)
        return
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    set_model_state_dict(model, state, options=_options(strict=strict))


def _names_in_order(model: nn.Module, optimizer) -> list[str]:
    names = {id(param): name for name, param in model.named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def optimizer_state(model: nn.Module, optimizer, world: World) -> dict:
    """``optimizer.state_dict()`` as one process writes it (parameters numbered in order).

    Under FSDP the sharded state is gathered on rank 0 (keyed by parameter name) and
    renumbered, so any number of processes, sharded or not, can resume from it. Before the
    first step (no state yet) torch's gathering would take a zero-gradient step to create
    the state, which advances Adam's step count and changes later updates: not here.
    """
    if not world.fsdp or not optimizer.state:
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    full = get_optimizer_state_dict(model, optimizer, options=_options(cpu_offload=True))
    if not world.is_main:
        return {}
    index = {name: i for i, name in enumerate(_names_in_order(model, optimizer))}
    return {
        "state": {index[name]: value for name, value in full["state"].items()},
        "param_groups": [
            {**group, "params": [index[name] for name in group["params"]]}
            for group in full["param_groups"]
        ],
    }


def load_optimizer_state(model: nn.Module, optimizer, state: dict, world: World) -> None:
    if not world.fsdp or not state["state"]:  # see optimizer_state on the empty case
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    names = _names_in_order(model, optimizer)
    by_name = {
        "state": {names[i]: value for i, value in state["state"].items()},
        "param_groups": [
            {**group, "params": [names[i] for i in group["params"]]}
            for group in state["param_groups"]
        ],
    }
    set_optimizer_state_dict(model, optimizer, by_name, options=_options())


def _full_tensor(param: torch.Tensor) -> torch.Tensor:
    return param.full_tensor() if hasattr(param, "full_tensor") else param


def gather_state(model: nn.Module, optimizer, world: World, only=None) -> dict:
    """What a checkpoint needs from every rank: full weights (or ``only`` those, see
    :func:`model_state`), optimizer state, RNG states."""
    return {
        "weights": model_state(model, world, only),
        "optimizer": optimizer_state(model, optimizer, world),
        "rng": gather_objects(ckpt.rng_state(), world),
    }


def restore_rng(state: dict, world: World) -> None:
    """Each rank's own RNG state; with another number of ranks, rank 0's (others reseed)."""
    per_rank = state.get("rng_ranks", [state["rng"]])
    if len(per_rank) == world.size:
        ckpt.set_rng_state(per_rank[world.rank])
        return
    ckpt.set_rng_state(per_rank[0])
    if world.rank:
        torch.manual_seed(rank_seed(int(torch.randint(2**31, ())), world))


def gather_objects(value: T, world: World) -> list[T]:
    """``[value of rank 0, value of rank 1, ...]`` on every rank."""
    if world.size == 1:
        return [value]
    values: list = [None] * world.size
    dist.all_gather_object(values, value)
    return values
