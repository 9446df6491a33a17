"""The two things a checkpoint path can hold, apart from the code that finds them, so that
the format readers (:mod:`wdanalysis.loaders.formats`) can build them without importing
:mod:`wdanalysis.loaders.runs`, which dispatches to those readers."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from wdanalysis.loaders.peft_adapter import Adapter
from wdanalysis.storage.tensor_store import TensorStore

__all__ = [
    "CONV1D_LEAVES",
    "CONV1D_MODEL_TYPES",
    "AdapterCheckpoint",
    "FullModel",
    "conv1d_from_shapes",
]

# Conv1D-style (in, out) weights: GPT-2 family in transformers.
CONV1D_MODEL_TYPES = {
    "gpt2",
    "openai-gpt",
    "imagegpt",
    "decision_transformer",
}
# GPT-2's Conv1D modules store (in, out) weights.
CONV1D_LEAVES = {"c_attn", "c_proj", "c_fc", "q_attn"}
# Of those, the ones with more outputs than inputs (q|k|v; the MLP's up-projection): their
# stored shape says the layout (GPT-2 Conv1D (h, 3h); GPT-BigCode nn.Linear (h + 2d, h)).
_WIDENING_LEAVES = {"c_attn", "c_fc"}


def conv1d_from_shapes(shapes) -> bool | None:
    """The layout of ``c_attn``/``c_fc``-named weights from their shapes (no config.json):
    True for (in, out) Conv1D, False for (out, in) nn.Linear, None when they do not say
    (none of them, square ones, or disagreeing ones); False for a model without such names.
    """
    votes, named = set(), False
    for key, shape in shapes:
        leaf = key.rsplit(".", 2)[-2] if key.count(".") else key
        named = named or leaf in CONV1D_LEAVES
        if leaf in _WIDENING_LEAVES and key.endswith(".weight") and len(shape) == 2:
            if shape[0] != shape[1]:
                votes.add(shape[0] < shape[1])  # stored (in, out) when in < out
    if not named:
        return False
    return votes.pop() if len(votes) == 1 else None


@dataclass
class FullModel:
    """A complete set of weights: a base model or a fully fine-tuned checkpoint."""

    path: Path
    store: TensorStore
    model_type: str | None = None
    step: int | None = None
    kind: str = "full model"
    method: str = "FT"
    _shape_layout: list = field(default_factory=list, init=False, repr=False, compare=False)

    def conv1d_layout(self) -> bool | None:
        """Whether ``c_attn``/``c_proj``/``c_fc``/``q_attn`` are GPT-2 ``Conv1D`` (in, out):
        from ``config.json``'s model type (gpt2 family: yes; gpt_bigcode and every other
        type: nn.Linear), else from the shapes (:func:`conv1d_from_shapes`); None: undecided.
        """
        if self.model_type is not None:
            return self.model_type in CONV1D_MODEL_TYPES
        if not self._shape_layout:  # computed once: a big model has many keys
            shapes = ((k, info.shape) for k, info in self.store.infos.items())
            self._shape_layout.append(conv1d_from_shapes(shapes))
        return self._shape_layout[0]

    def transposed(self, key: str) -> bool:
        leaf = key.rsplit(".", 2)[-2] if key.count(".") else key
        return bool(self.conv1d_layout()) and leaf in CONV1D_LEAVES


@dataclass
class AdapterCheckpoint:
    """An adapter file set; its effective weights need the base model."""

    path: Path
    adapter: Adapter
    step: int | None = None
    kind: str = "adapter"

    @property
    def method(self) -> str:
        return self.adapter.method
