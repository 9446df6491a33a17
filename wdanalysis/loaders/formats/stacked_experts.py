"""gpt-oss's stacked experts, presented per expert, and PEFT's LoRA on them (``ParamWrapper``).

transformers saves gpt-oss's experts as two 3-D parameters without ``.weight``:
``mlp.experts.gate_up_proj`` ``(experts, hidden, 2·intermediate)`` and ``mlp.experts.down_proj``
``(experts, intermediate, hidden)``, used as ``x @ W[e]`` (``GptOssExperts.forward``): each
expert's matrix is stored (in, out). Each is presented as one key per expert,
``mlp.experts.<e>.gate_up_proj.weight`` (stored (in, out), so the analysis transposes it to
(out, in)) and ``mlp.experts.<e>.down_proj.weight``; the gate/up interleave of
``gate_up_proj`` is split by :mod:`wdanalysis.weights.fused_rules`. An expert is read alone
(a safetensors slice), never the whole stack in float64.

PEFT adapts such parameters with ``target_parameters`` (``lora.ParamWrapper``): per wrapped
parameter one ``lora_A`` ``(r·experts, in)`` and one ``lora_B`` ``(out, r·experts)`` saved
under the module's name, each further parameter of the same module one ``base_layer.`` deeper.
PEFT's ``get_delta_weight`` (``_did_swap_in_out_features`` False: gpt-oss marks its experts
``is_transposed``) reshapes ``A`` to ``(experts, r, in)`` and ``B`` to ``(out, r, experts)``
and merges ``einsum("o r e, e r i -> e i o") · s``: expert ``e``'s update is
``s · B[:, e::E] @ A[e·r:(e+1)·r]``, an ordinary LoRA pair per expert, which is what is
presented here (the factor slices are tiny). Which parameter a wrapper adapts is read from
its factors' shapes, never from the nesting order; an adapter on a parameter that the base
does not store stacked, or whose shape fits none or several, is refused in one line.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from wdanalysis.errors import AdapterMismatchError
from wdanalysis.loaders.checkpoint_kinds import AdapterCheckpoint, FullModel
from wdanalysis.loaders.formats.moe import ExpertStore
from wdanalysis.loaders.key_alignment import KeyAligner
from wdanalysis.loaders.peft_adapter import AdapterModule
from wdanalysis.storage.tensor_store import TensorInfo, TensorStore

#: model types whose stacked expert parameters are stored (experts, in, out), by leaf.
STACKED_IN_OUT = {"gpt_oss": ("gate_up_proj", "down_proj")}
_WRAPPED = ".base_layer"


def stacked_keys(store: TensorStore, model_type: str | None) -> set[str]:
    """The stacked ``(experts, in, out)`` parameters of a model of ``model_type``."""
    leaves = STACKED_IN_OUT.get(model_type or "", ())
    return {
        key
        for key, info in store.infos.items()
        if len(info.shape) == 3 and key.rsplit(".", 1)[-1] in leaves and ".experts" in key
    }


def expert_key(key: str, expert: int) -> str:
    """``a.mlp.experts.gate_up_proj`` → ``a.mlp.experts.<expert>.gate_up_proj.weight``."""
    head, _, leaf = key.rpartition(".")
    return f"{head}.{expert}.{leaf}.weight"


def present_stacked(base: FullModel, runs: list) -> None:
    """Present the base's stacked experts per expert, in the base and in the runs' full
    checkpoints, and the runs' PEFT ``ParamWrapper`` factors per expert alike."""
    stacks = stacked_keys(base.store, base.model_type)
    shapes = {key: tuple(base.store.shape(key)) for key in stacks}
    aligner = KeyAligner(base.store.keys())
    for ckpt in (c for run in runs for c in run.checkpoints):
        if isinstance(ckpt, FullModel) and stacks:
            mapping = aligner.map_keys(ckpt.store.keys())  # base key → checkpoint key
            own = {mapping[k] for k in stacks if k in mapping}
            if own:
                ckpt.store = ExpertStore.split(ckpt.store, own, expert_key, in_out=True)
        elif isinstance(ckpt, AdapterCheckpoint) and wrapped_parameters(ckpt.adapter):
            _present_factors(ckpt.adapter, shapes, aligner)
    if stacks:
        base.store = ExpertStore.split(base.store, stacks, expert_key, in_out=True)


def wrapped_parameters(adapter) -> list[str]:
    """A PEFT LoRA config's ``target_parameters`` other than ``….weight`` ones."""
    raw = getattr(adapter.config, "raw", None) or {}
    params = raw.get("target_parameters") or []
    params = params if isinstance(params, list) else [params]
    return [p for p in params if isinstance(p, str) and not p.endswith("weight")]


def _present_factors(adapter, stacks: dict[str, tuple], aligner: KeyAligner) -> None:
    """Replace the adapter's ``ParamWrapper`` modules by one LoRA module per expert."""
    targets = wrapped_parameters(adapter)
    for target in targets:
        if not any(key == target or key.endswith("." + target) for key in stacks):
            raise AdapterMismatchError(
                f"target_parameters {target!r}: LoRA on a raw parameter is read only on "
                "stacked experts stored as gpt-oss stores them ((experts, in, out)), which "
                "this base does not hold",
                adapter.path,
                "merge it with PEFT (merge_and_unload) and analyse the full model",
            )
    virtual: dict[str, tuple[str, slice | tuple]] = {}
    for name, module in list(adapter.modules.items()):
        root = name
        while root.endswith(_WRAPPED):
            root = root[: -len(_WRAPPED)]
        if not (module.lora_a and module.lora_b) or aligner.find(name + ".weight"):
            continue  # an ordinary module (q_proj, …) of the same adapter
        candidates = {key: shape for key, shape in stacks.items() if _same(_head(key), root)}
        if not candidates:
            continue  # binding refuses it: it matches no base weight
        key, shape = _wrapped_by(adapter, module, candidates)
        if not any(key == t or key.endswith("." + t) for t in targets):
            raise AdapterMismatchError(
                f"{name}: its factors fit {key!r}, which target_parameters does not name",
                adapter.path,
                "pass the base model this adapter was trained on",
            )
        if module.magnitude or module.diag or module.blocks or adapter.config.base_init:
            raise AdapterMismatchError(
                f"{name}: a LoRA variant on the stacked parameter {key!r} is not read "
                "(PEFT's ParamWrapper merges plain LoRA only)",
                adapter.path,
            )
        del adapter.modules[name]  # lora_B.bias, if any, changes only the experts' bias
        for e in range(shape[0]):
            _add_expert(adapter, module, key, e, shape[0], virtual)
    adapter.store = FactorStore.wrap(adapter.store, virtual)


def _head(key: str) -> str:
    return key.rpartition(".")[0]


def _same(path: str, root: str) -> bool:
    """The same module, whatever prefix one of the two names kept (``model.`` …)."""
    return path == root or path.endswith("." + root) or root.endswith("." + path)


def _wrapped_by(adapter, module: AdapterModule, candidates: dict[str, tuple]):
    """The one stacked parameter ``(E, in, out)`` whose shape the factors fit."""
    a_rows, a_in = adapter.store.shape(module.lora_a)
    b_out, b_cols = adapter.store.shape(module.lora_b)
    fits = [
        (key, shape)
        for key, shape in candidates.items()
        if a_in == shape[1] and b_out == shape[2] and a_rows == b_cols and a_rows % shape[0] == 0
    ]
    if len(fits) != 1:
        found = ", ".join(f"{k} {list(s)}" for k, s in candidates.items())
        raise AdapterMismatchError(
            f"{module.name}: ParamWrapper factors lora_A {[a_rows, a_in]}, lora_B "
            f"{[b_out, b_cols]} fit {'none' if not fits else 'several'} of the stacked "
            f"parameters {found} ((experts, in, out), r·experts factor rows)",
            adapter.path,
            "pass the base model this adapter was trained on",
        )
    return fits[0]


def _add_expert(adapter, module, key: str, e: int, experts: int, virtual) -> None:
    """Expert ``e``'s pair: ``A[e·r:(e+1)·r]`` and ``B[:, e::experts]`` (PEFT's reshape)."""
    name = expert_key(_adapter_path(module.name, key), e)[: -len(".weight")]
    if name in adapter.modules:
        raise AdapterMismatchError(f"{name}: adapted both per expert and stacked", adapter.path)
    r = adapter.store.shape(module.lora_a)[0] // experts
    a_key, b_key = f"{name}.lora_A.weight", f"{name}.lora_B.weight"
    virtual[a_key] = (module.lora_a, slice(e * r, (e + 1) * r))
    virtual[b_key] = (module.lora_b, (slice(None), slice(e, None, experts)))
    # keyed by the expert's name (bound to its base key); named ``<module>.<parameter>``,
    # which rank_pattern/alpha_pattern are matched against, as PEFT matches them
    stacked = _adapter_path(module.name, key)
    adapter.modules[name] = AdapterModule(stacked, lora_a=a_key, lora_b=b_key)


def _adapter_path(name: str, key: str) -> str:
    """The stacked parameter under the adapter's own module prefix (bound like the rest)."""
    root = name
    while root.endswith(_WRAPPED):
        root = root[: -len(_WRAPPED)]
    return f"{root}.{key.rpartition('.')[2]}"


@dataclass
class FactorStore(TensorStore):
    """An adapter store with some keys presented as slices of stored factors."""

    reads_as_stored: ClassVar[bool] = False
    source: TensorStore | None = None
    slices: dict[str, tuple[str, object]] = field(default_factory=dict)

    @classmethod
    def wrap(cls, source: TensorStore, slices: dict) -> FactorStore:
        infos = dict(source.infos)
        for key, (real, index) in slices.items():
            info = source.infos[real]
            shape = tuple(torch.empty(info.shape, device="meta")[index].shape)
            infos[key] = TensorInfo(shape, info.dtype, info.file)
        return cls(source.path, source.format, infos, source=source, slices=slices)

    def get(self, key: str) -> torch.Tensor:
        if key not in self.slices:
            return self.source.get(key)
        real, index = self.slices[key]
        return self.source.get(real)[index].contiguous()

    def close(self) -> None:
        self.source.close()
