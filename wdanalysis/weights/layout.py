"""Which base weights are stored (in, out) rather than PyTorch's (out, in).

The decomposition's "output" axis is a row of an ``nn.Linear`` weight but a column of GPT-2's
``Conv1D`` and of an embedding table (PEFT's view, :mod:`wdanalysis.loaders.layer_shapes`).
:func:`stored_transposed` is the one rule ``compare`` and live tracking both apply.
"""

from __future__ import annotations

from wdanalysis.loaders.checkpoint_kinds import AdapterCheckpoint, FullModel
from wdanalysis.loaders.key_alignment import KeyAligner
from wdanalysis.loaders.layer_shapes import is_embedding_name
from wdanalysis.loaders.runs import Run

__all__ = ["stored_transposed"]


def stored_transposed(
    base: FullModel, runs: list[Run], fan_in_fan_out: bool | None, aligner: KeyAligner
):
    """Which base keys are stored (in, out): embeddings always (PEFT's view, see
    :mod:`wdanalysis.loaders.layer_shapes`), conv kernels never; else the explicit choice, adapter
    configs, or the base."""
    rule = _linear_layout(base, runs, fan_in_fan_out)
    embeddings = {k for k, info in base.store.infos.items() if is_embedding_name(k, info.shape)}
    for ckpt in (c for run in runs for c in run.checkpoints):
        if isinstance(ckpt, AdapterCheckpoint):
            adapted = (m.name for m in ckpt.adapter.modules.values() if m.embedding)
            embeddings.update(filter(None, (aligner.find(n + ".weight") for n in adapted)))
    infos = base.store.infos
    return lambda key: (
        key in embeddings or (key in infos and len(infos[key].shape) == 2 and rule(key))
    )


def _linear_layout(base: FullModel, runs: list[Run], fan_in_fan_out: bool | None):
    if fan_in_fan_out is not None:
        return lambda key: fan_in_fan_out
    adapters_say = any(
        isinstance(c, AdapterCheckpoint) and c.adapter.config.fan_in_fan_out
        for run in runs
        for c in run.checkpoints
    )
    if adapters_say:
        return lambda key: True
    return base.transposed
