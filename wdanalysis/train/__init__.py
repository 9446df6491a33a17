"""Training that produces wdanalysis' inputs: full fine-tuning, LoRA and DoRA, writing
what the loaders read. Imports only :mod:`~wdanalysis.storage` and the errors.

``train(TrainConfig(...)) -> RunResult`` writes a Trainer-style run folder with
``checkpoint-N/`` sub-folders (full weights for ``ft``, PEFT-format adapters otherwise).
"""

from wdanalysis.train.config import TrainConfig
from wdanalysis.train.data import Dataset, builtin_tweets, evaluate_accuracy, load_dataset
from wdanalysis.train.inject import (
    AdapterSpec,
    inject_adapters,
    merge_adapters,
    merged_weights,
    select_full_finetune,
)
from wdanalysis.train.layers import DoRALinear, LoRALinear, dora_weight, lora_scaling
from wdanalysis.train.loop import RunResult, train
from wdanalysis.train.model import load_pretrained, load_safetensors_into
from wdanalysis.train.peft_format import adapter_state_dict, load_adapter, save_adapter

__all__ = [
    "AdapterSpec",
    "Dataset",
    "DoRALinear",
    "LoRALinear",
    "RunResult",
    "TrainConfig",
    "adapter_state_dict",
    "builtin_tweets",
    "dora_weight",
    "evaluate_accuracy",
    "inject_adapters",
    "load_adapter",
    "load_dataset",
    "load_pretrained",
    "load_safetensors_into",
    "lora_scaling",
    "merge_adapters",
    "merged_weights",
    "save_adapter",
    "select_full_finetune",
    "train",
]
