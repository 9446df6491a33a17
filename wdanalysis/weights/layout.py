"""Which base weights are stored (in, out) rather than PyTorch's (out, in).

The decomposition's "output" axis is a row of an ``nn.Linear`` weight but a column of GPT-2's
``Conv1D`` and of an embedding table (PEFT's view, :mod:`wdanalysis.loaders.layer_shapes`).
:func:`stored_transposed` is the one rule ``compare`` and live tracking both apply.

A weight's layout is a fact of the base model, the same for every run compared with it, so
it is decided per weight, in this order:

1. ``--fan-in-fan-out yes|no`` (``fan_in_fan_out=``), when the user says;
2. embeddings are (in, out) for PEFT, conv kernels never;
3. ``config.json``'s ``model_type``: the GPT-2 family's ``c_attn``/``c_proj``/``c_fc``/
   ``q_attn`` are ``Conv1D``; GPT-BigCode (StarCoder), Qwen-1 and every other type use
   ``nn.Linear`` under those names. PEFT itself follows the module's class, not the
   adapter's ``fan_in_fan_out`` (it corrects the flag with a warning), and so do we;
4. without a config, the shapes of ``c_attn``/``c_fc`` (they widen: (h, 3h) stored is a
   Conv1D, (h + 2·d, h) a Linear), :func:`wdanalysis.loaders.checkpoint_kinds.conv1d_from_shapes`;
5. still undecided: the adapters of the runs, each only for the weights it adapts — the
   shapes of its factors for a non-square weight (``lora_A`` is (r, in)), its own
   ``fan_in_fan_out`` for a square one. One run's flag never touches the weights it does
   not adapt; runs that disagree on one weight are refused.

A ``c_*`` weight whose layout none of these decides is refused in one line.
"""

from __future__ import annotations

from wdanalysis.errors import CheckpointFormatError
from wdanalysis.loaders.checkpoint_kinds import CONV1D_LEAVES, AdapterCheckpoint, FullModel
from wdanalysis.loaders.key_alignment import KeyAligner
from wdanalysis.loaders.layer_shapes import is_embedding_name
from wdanalysis.loaders.runs import Run

__all__ = ["stored_transposed"]

_FORCE = "pass --fan-in-fan-out yes (GPT-2 Conv1D) or no (nn.Linear), or put config.json beside"


def stored_transposed(
    base: FullModel, runs: list[Run], fan_in_fan_out: bool | None, aligner: KeyAligner
):
    """``key → bool``: whether the base stores ``key`` (in, out). Embeddings always (PEFT's
    view, see :mod:`wdanalysis.loaders.layer_shapes`), conv kernels never; else the order
    of the module docstring. Raises at once when an adapted weight cannot be decided."""
    rule = _linear_layout(base, runs, fan_in_fan_out, aligner)
    embeddings = {k for k, info in base.store.infos.items() if is_embedding_name(k, info.shape)}
    for ckpt in (c for run in runs for c in run.checkpoints):
        if isinstance(ckpt, AdapterCheckpoint):
            adapted = (m.name for m in ckpt.adapter.modules.values() if m.embedding)
            embeddings.update(filter(None, (aligner.find(n + ".weight") for n in adapted)))
    infos = base.store.infos
    in_out = getattr(base.store, "in_out", frozenset())  # stacked experts stored (in, out)
    return lambda key: (
        key in embeddings
        or key in in_out
        or (key in infos and len(infos[key].shape) == 2 and rule(key))
    )


def _leaf(key: str) -> str:
    return key.rsplit(".", 2)[-2] if key.count(".") else key


def _linear_layout(base: FullModel, runs: list[Run], fan_in_fan_out, aligner: KeyAligner):
    if fan_in_fan_out is not None:
        return lambda key: fan_in_fan_out
    if base.model_type is not None:
        return base.transposed
    decided = base.conv1d_layout()  # from the shapes, when they say
    votes = _adapter_votes(base, runs, aligner)

    def rule(key: str) -> bool:
        named = _leaf(key) in CONV1D_LEAVES
        if named and decided is not None:
            return decided
        if key in votes:
            return votes[key]
        if named:
            raise CheckpointFormatError(
                f"cannot tell whether {key!r} is a GPT-2 Conv1D (in, out) or an nn.Linear "
                f"(out, in) weight: no config.json model_type, and the shapes of the "
                f"c_attn/c_fc weights do not say",
                base.path,
                f"{_FORCE} the weights",
            )
        return False

    return rule


def _adapter_votes(base: FullModel, runs: list[Run], aligner: KeyAligner) -> dict[str, bool]:
    """Per adapted weight, the layout its adapter implies; refuses runs that disagree."""
    votes: dict[str, tuple[bool, str]] = {}
    for run in runs:
        for ckpt in run.checkpoints:
            if not isinstance(ckpt, AdapterCheckpoint):
                continue
            for key, says in _layouts_said(ckpt, base, aligner):
                earlier = votes.setdefault(key, (says, run.name))
                if earlier[0] != says:
                    raise CheckpointFormatError(
                        f"runs {earlier[1]!r} and {run.name!r} disagree on the layout of "
                        f"{key!r} ({'(in, out)' if earlier[0] else '(out, in)'} against "
                        f"{'(in, out)' if says else '(out, in)'})",
                        ckpt.path,
                        f"{_FORCE} the base",
                    )
    return {key: says for key, (says, _) in votes.items()}


def _layouts_said(ckpt: AdapterCheckpoint, base: FullModel, aligner: KeyAligner):
    """(base key, stored (in, out)?) for the weights this adapter adapts with factors."""
    adapter = ckpt.adapter
    for module in adapter.modules.values():
        if module.embedding or not (module.lora_a and module.lora_b):
            continue
        key = aligner.find(module.name + ".weight")
        info = base.store.infos.get(key) if key else None
        if info is None or len(info.shape) != 2:
            continue
        rows, cols = info.shape
        r_in = adapter.store.shape(module.lora_a)[-1]  # lora_A: (r, in)
        out_r = adapter.store.shape(module.lora_b)[0]  # lora_B: (out, r)
        if rows != cols:
            if (out_r, r_in) in ((rows, cols), (cols, rows)):
                yield key, (out_r, r_in) == (cols, rows)
            continue  # factors that fit neither: refused when the adapter is bound
        yield key, bool(adapter.config.fan_in_fan_out)
