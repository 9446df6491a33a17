"""Mixture-of-experts weights stacked ``(num_experts, out, in)``, analysed one expert at a time.

mlx-lm keeps the experts of a mixture-of-experts block in one ``SwitchLinear`` weight of
shape ``(num_experts, out, in)`` (``model.layers.1.block_sparse_moe.switch_mlp.gate_proj.weight``)
and its ``LoRASwitchLinear`` adapter one factor pair per expert. Each expert's ``(out, in)``
matrix is a weight matrix of its own, with its own ΔM/ΔD: the analysis gets one row per
expert. To that end the stacked base weight is presented as one virtual ``(out, in)`` key
per expert, named as Hugging Face names per-expert weights (``experts.<e>`` before the leaf:
``…switch_mlp.experts.3.gate_proj.weight``), so the table's ``layer`` and ``module`` columns
stay those of the stacked weight and ``--modules gate_proj`` selects every expert.

Only stacks that an adapter adapts are split (a 3-D weight can also be a convolution kernel,
which is not); full fine-tuned checkpoints that hold the same stack are split alike.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from wdanalysis.errors import AdapterMismatchError, CheckpointFormatError
from wdanalysis.loaders.checkpoint_kinds import AdapterCheckpoint, FullModel
from wdanalysis.loaders.formats.foreign import ForeignModule
from wdanalysis.loaders.key_alignment import KeyAligner
from wdanalysis.storage.tensor_store import TensorInfo, TensorStore


def expert_name(path: str, expert: int) -> str:
    """``a.switch_mlp.gate_proj`` → ``a.switch_mlp.experts.<expert>.gate_proj``."""
    head, _, leaf = path.rpartition(".")
    return f"{head}.experts.{expert}.{leaf}" if head else f"experts.{expert}.{leaf}"


def expert_key(key: str, expert: int) -> str:
    """The virtual key of one expert of a stacked ``….weight``."""
    return expert_name(key[: -len(".weight")], expert) + ".weight"


@dataclass
class ExpertStore(TensorStore):
    """A store in which some ``(num_experts, out, in)`` tensors are presented as one
    ``(out, in)`` key per expert; every other key is passed through unchanged. An expert
    is read alone (a safetensors slice), not the whole stack."""

    reads_as_stored: ClassVar[bool] = False  # an expert is a part of a stored tensor
    source: TensorStore | None = None
    experts: dict[str, tuple[str, int]] = field(default_factory=dict)
    in_out: frozenset[str] = frozenset()  # virtual keys stored (in, out) (gpt-oss experts)

    @classmethod
    def split(
        cls,
        source: TensorStore,
        stacks: set[str],
        namer: Callable[[str, int], str] = expert_key,
        in_out: bool = False,
    ) -> ExpertStore:
        """``source`` with each key of ``stacks`` presented as one key per expert, named
        by ``namer(key, expert)``; ``in_out``: the experts are stored (in, out)."""
        infos: dict[str, TensorInfo] = {}
        experts: dict[str, tuple[str, int]] = {}
        for key, info in source.infos.items():
            if key not in stacks:
                infos[key] = info
                continue
            for e in range(info.shape[0]):
                virtual = namer(key, e)
                if virtual in source.infos:
                    raise CheckpointFormatError(
                        f"cannot present {key!r} per expert: {virtual!r} already exists",
                        info.file,
                    )
                # no ``name``: the virtual key has no extent of its own in the file
                infos[virtual] = TensorInfo(tuple(info.shape[1:]), info.dtype, info.file)
                experts[virtual] = (key, e)
        transposed = frozenset(experts) if in_out else frozenset()
        if isinstance(source, ExpertStore):  # already split: one level, not nested
            experts = {**{k: v for k, v in source.experts.items() if k in infos}, **experts}
            transposed |= source.in_out
            source = source.source
        return cls(
            source.path,
            source.format,
            infos,
            source=source,
            experts=experts,
            in_out=transposed,
        )

    def get(self, key: str) -> torch.Tensor:
        if key not in self.experts:
            return self.source.get(key)
        real, e = self.experts[key]
        # a slice of the file, unless the source is .bin or transforms on read (mlx dequant)
        return self.source.get_slice(real, e)

    def close(self) -> None:
        self.source.close()


def split_experts(base: FullModel, runs: list) -> None:
    """Present every stacked expert weight that a run's adapter adapts per expert, in the
    base and in the runs' full checkpoints."""
    modules = [
        (ckpt.adapter, module)
        for run in runs
        for ckpt in run.checkpoints
        if isinstance(ckpt, AdapterCheckpoint)
        for module in ckpt.adapter.modules.values()
        if isinstance(module, ForeignModule) and module.experts
    ]
    if not modules:
        return
    aligner = KeyAligner(base.store.keys())
    stacks: set[str] = set()
    for adapter, module in modules:
        key = aligner.find(module.stacked + ".weight")
        if key is None:
            continue  # binding reports the module as matching no base weight
        shape = base.store.shape(key)
        if len(shape) != 3 or shape[0] != module.experts:
            raise AdapterMismatchError(
                f"{module.stacked}: mixture-of-experts factors for {module.experts} experts "
                f"do not fit the base weight {key!r} {list(shape)} (expected "
                f"[{module.experts}, out, in])",
                adapter.path,
                "this adapter was trained on a model of another size",
            )
        stacks.add(key)
    if not stacks:
        return
    for ckpt in (c for run in runs for c in run.checkpoints if isinstance(c, FullModel)):
        mapping = aligner.map_keys(ckpt.store.keys())  # base key → checkpoint key
        own = {
            mapping[k]
            for k in stacks
            if k in mapping and ckpt.store.shape(mapping[k]) == base.store.shape(k)
        }
        if own:
            ckpt.store = ExpertStore.split(ckpt.store, own)
    base.store = ExpertStore.split(base.store, stacks)
