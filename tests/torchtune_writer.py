"""Writes a torchtune LoRA/DoRA run with torchtune's own modules and checkpointer.

Run as a separate process by ``tests/test_eco_torchtune.py``: torchtune 0.6's ``__init__``
needs torchao, whose presence PEFT refuses below 0.16 while torchtune needs ≤ 0.14, so the
venv has no torchao. None of the code used here (``lora_llama2``, ``DoRALinear``,
``FullModelHFCheckpointer``, ``get_merged_lora_ckpt``) calls torchao (it is for QLoRA's
NF4), so this process stands in an empty ``torchao`` package to let torchtune import.

Usage: ``python torchtune_writer.py ROOT lora|dora``. Writes ``ROOT/base`` (HF format),
``ROOT/out/epoch_{0,1}`` (torchtune's own save) and ``ROOT/reference_{0,1}.safetensors``
(the float64 merged weights from ``get_merged_lora_ckpt``, in HF names).
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import json
import sys
import types
from pathlib import Path

import torch
import torch.export  # noqa: F401 - imported before the stub, as torch expects


class _Anything:
    def __init__(self, *args, **kwargs):
        pass

    def __call__(self, *args, **kwargs):
        return _Anything()

    def __getattr__(self, name):
        return _Anything()


class _EmptyTorchao(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path, target=None):
        if name == "torchao" or name.startswith("torchao."):
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):
        module = types.ModuleType(spec.name)
        module.__path__ = []

        def attribute(name):
            if name.startswith("__"):
                raise AttributeError(name)
            return _Anything

        module.__getattr__ = attribute
        return module

    def exec_module(self, module):
        pass


sys.meta_path.insert(0, _EmptyTorchao())

from safetensors.torch import save_file  # noqa: E402
from torchtune.models import convert_weights  # noqa: E402
from torchtune.models.llama2 import lora_llama2  # noqa: E402
from torchtune.modules.peft import (  # noqa: E402
    get_adapter_state_dict,
    get_lora_module_names,
    get_merged_lora_ckpt,
)
from torchtune.training import FullModelHFCheckpointer  # noqa: E402

HEADS, KV_HEADS, DIM, RANK, ALPHA = 4, 2, 16, 2, 3.0
ATTN = ["q_proj", "k_proj", "v_proj"]
HF_CONFIG = {
    "model_type": "llama",
    "num_attention_heads": HEADS,
    "num_key_value_heads": KV_HEADS,
    "hidden_size": DIM,
    "num_hidden_layers": 2,
}


def main(root: Path, use_dora: bool) -> None:
    torch.manual_seed(0)
    model = lora_llama2(
        lora_attn_modules=ATTN,
        apply_lora_to_mlp=True,
        vocab_size=32,
        num_layers=2,
        num_heads=HEADS,
        num_kv_heads=KV_HEADS,
        embed_dim=DIM,
        max_seq_len=16,
        intermediate_dim=24,
        lora_rank=RANK,
        lora_alpha=ALPHA,
        use_dora=use_dora,
    )
    state = model.state_dict()
    base = {k: v for k, v in state.items() if "lora_" not in k and "magnitude" not in k}
    (root / "base").mkdir(parents=True)
    hf = convert_weights.tune_to_hf(base, num_heads=HEADS, num_kv_heads=KV_HEADS, dim=DIM)
    save_file({k: v.contiguous() for k, v in hf.items()}, str(root / "base" / "model.safetensors"))
    (root / "base" / "config.json").write_text(json.dumps(HF_CONFIG))

    checkpointer = FullModelHFCheckpointer(
        checkpoint_dir=str(root / "base"),
        checkpoint_files=["model.safetensors"],
        model_type="LLAMA2",
        output_dir=str(root / "out"),
    )
    loaded = checkpointer.load_checkpoint()["model"]
    model.load_state_dict(loaded, strict=False)
    for module in model.modules():  # as the recipes do once the base is loaded
        if hasattr(module, "initialize_dora_magnitude"):
            module.initialize_dora_magnitude()
    gen = torch.Generator().manual_seed(1)
    for epoch in (0, 1):
        with torch.no_grad():  # "training": move every adapter parameter
            for name, p in model.named_parameters():
                if "lora_b" in name:
                    p.copy_(0.1 * torch.randn(p.shape, generator=gen))
                elif "magnitude" in name:
                    p.mul_(1 + 0.1 * torch.randn(p.shape, generator=gen))
        state = {k: v.clone() for k, v in model.state_dict().items()}
        adapter = get_adapter_state_dict(state)
        f64 = {k: v.double() for k, v in state.items()}
        reference = get_merged_lora_ckpt(f64, RANK, ALPHA)
        save_file(
            convert_weights.tune_to_hf(reference, num_heads=HEADS, num_kv_heads=KV_HEADS, dim=DIM),
            str(root / f"reference_{epoch}.safetensors"),
        )
        checkpointer.save_checkpoint(
            {
                "model": get_merged_lora_ckpt(state, RANK, ALPHA),
                "adapter": adapter,
                "adapter_config": {
                    "r": RANK,
                    "lora_alpha": ALPHA,
                    "target_modules": get_lora_module_names(ATTN, True, False),
                    "peft_type": "LORA",
                },
            },
            epoch=epoch,
        )


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2] == "dora")
