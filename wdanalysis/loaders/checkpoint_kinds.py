"""The two things a checkpoint path can hold, apart from the code that finds them, so that
the format readers (:mod:`wdanalysis.loaders.formats`) can build them without importing
:mod:`wdanalysis.loaders.runs`, which dispatches to those readers."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from wdanalysis.loaders.peft_adapter import Adapter
from wdanalysis.storage.tensor_store import TensorStore

__all__ = ["CONV1D_LEAVES", "CONV1D_MODEL_TYPES", "AdapterCheckpoint", "FullModel"]

# Conv1D-style (in, out) weights: GPT-2 family in transformers.
CONV1D_MODEL_TYPES = {
    "gpt2",
    "openai-gpt",
    "imagegpt",
    "decision_transformer",
    "gpt_bigcode_conv1d",
}
# GPT-2's Conv1D modules store (in, out) weights.
CONV1D_LEAVES = {"c_attn", "c_proj", "c_fc", "q_attn"}


@dataclass
class FullModel:
    """A complete set of weights: a base model or a fully fine-tuned checkpoint."""

    path: Path
    store: TensorStore
    model_type: str | None = None
    step: int | None = None
    kind: str = "full model"
    method: str = "FT"

    def conv1d_layout(self) -> bool:
        if self.model_type is not None:
            return self.model_type in CONV1D_MODEL_TYPES
        return any(k.endswith(".attn.c_attn.weight") for k in self.store.keys())

    def transposed(self, key: str) -> bool:
        leaf = key.rsplit(".", 2)[-2] if key.count(".") else key
        return self.conv1d_layout() and leaf in CONV1D_LEAVES


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
