"""torchtune's own adapter files: ``adapter_model.pt`` (``epoch_N/``) or ``adapter_N.pt``.

Keys use torchtune's module names (``layers.0.attn.q_proj.lora_a.weight``,
``….lora_b.weight``, DoRA ``….magnitude``), mapped here to Hugging Face names as torchtune's
``convert_weights`` maps them. For Llama-family models torchtune stores q/k rows in Meta's
rotary order and permutes them when it writes HF weights; this loader applies the same
permutation to ``lora_b`` *and* to the DoRA magnitude of q/k (torchtune's own PEFT export
permutes only ``lora_b``). The rank and alpha come from the ``adapter_config.json`` that
torchtune writes beside the file, the head counts from the copied ``config.json``.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from wdanalysis.errors import AdapterMismatchError, CheckpointFormatError
from wdanalysis.loaders.formats.foreign import (
    ForeignAdapter,
    ForeignModule,
    ViewStore,
    check_rank,
    lora_view,
    plain_config,
)
from wdanalysis.loaders.peft_adapter import read_adapter_config
from wdanalysis.storage.small_files import read_json
from wdanalysis.storage.tensor_store import open_tensor_file

WEIGHT_FILE = "adapter_model.pt"
STEP_FILE = re.compile(r"^adapter_(\d+)\.pt$")
_TO_HF = (  # torchtune module path → HF module path (torchtune's _FROM_HF, inverted)
    (re.compile(r"^layers\.(\d+)\.attn\.(q_proj|k_proj|v_proj)$"), r"model.layers.\1.self_attn.\2"),
    (re.compile(r"^layers\.(\d+)\.attn\.output_proj$"), r"model.layers.\1.self_attn.o_proj"),
    (re.compile(r"^layers\.(\d+)\.mlp\.w1$"), r"model.layers.\1.mlp.gate_proj"),
    (re.compile(r"^layers\.(\d+)\.mlp\.w3$"), r"model.layers.\1.mlp.up_proj"),
    (re.compile(r"^layers\.(\d+)\.mlp\.w2$"), r"model.layers.\1.mlp.down_proj"),
    (re.compile(r"^output$"), "lm_head"),
)
_ROLES = ((".lora_a.weight", "down"), (".lora_b.weight", "up"), (".magnitude", "dora"))
# Model types whose HF export permutes q/k rows (torchtune's default tune_to_hf), and those
# exported without a permutation.
PERMUTED = {"llama", "mistral", "gemma", "gemma2"}
NOT_PERMUTED = {"qwen2", "qwen3"}


def is_torchtune_keys(keys: list[str]) -> bool:
    return any(re.match(r"^layers\.\d+\..*\.lora_a\.weight$", k) for k in keys)


def step_files(folder: Path) -> list[tuple[int, Path]]:
    found = []
    for child in folder.iterdir() if folder.is_dir() else ():
        match = STEP_FILE.match(child.name)
        if match and child.is_file():
            found.append((int(match.group(1)), child))
    return sorted(found)


def hf_name(name: str) -> str | None:
    for pattern, replacement in _TO_HF:
        if pattern.match(name):
            return pattern.sub(replacement, name)
    return None


def open_torchtune(path: Path, step: int | None, full_weights_beside: bool = False):
    from wdanalysis.loaders.checkpoint_kinds import AdapterCheckpoint

    config_file = path.parent / "adapter_config.json"
    if not config_file.is_file():
        raise CheckpointFormatError(
            "torchtune adapter without adapter_config.json: its rank and alpha are unknown",
            path,
            "torchtune writes adapter_config.json beside it; copy it there",
        )
    config = read_adapter_config(config_file)
    source = open_tensor_file(path)
    store = ViewStore.over(source, source.format)
    parts: dict[str, dict[str, str]] = {}
    for key in source.keys():
        role = next(((s, r) for s, r in _ROLES if key.endswith(s)), None)
        if role is None:
            raise CheckpointFormatError(
                f"unexpected tensor {key!r} in a torchtune adapter (expected lora_a, lora_b, "
                "magnitude)",
                path,
            )
        parts.setdefault(key[: -len(role[0])], {})[role[1]] = key
    heads = _head_counts(path.parent)
    modules = {}
    for tune_name, found in parts.items():
        name = hf_name(tune_name)
        if name is None:
            raise CheckpointFormatError(
                f"torchtune module {tune_name!r} has no known Hugging Face name", path
            )
        modules[name] = _module(name, found, store, config, heads, path)
    notes = (
        ["rows of q/k reordered from torchtune's (Meta) order to HF order"]
        if any(name.endswith(("q_proj", "k_proj")) for name in modules)
        and heads
        and heads[0] in PERMUTED
        else []
    )
    if full_weights_beside:
        notes.append(
            "the folder also holds merged full weights; the adapter was read (it is exact)"
        )
    rule = "alpha/sqrt(r)" if config.use_rslora else "alpha/r"
    layout = plain_config("torchtune")
    layout.raw = config.raw  # base_model_name_or_path, for ``compare auto``
    adapter = ForeignAdapter(
        path,
        store,
        layout,
        modules,
        ecosystem="torchtune",
        scaling_note=f"{rule}, r = {config.r}, alpha = {config.lora_alpha:g} from "
        "adapter_config.json",
        notes=notes,
    )
    return AdapterCheckpoint(path, adapter, step)


def _module(name, found, store: ViewStore, config, heads, path: Path) -> ForeignModule:
    module = ForeignModule(name)
    leaf = name.rsplit(".", 1)[-1]
    permute = _permutation(leaf, heads, path)
    if "down" in found or "up" in found:
        if not ("down" in found and "up" in found):
            raise AdapterMismatchError(f"{name} has only one of lora_a/lora_b", path)
        lora_view(store, module, found["down"], found["up"], False, False)
        rank = check_rank(store, module, path)
        module.rank, module.scaling = config.rank_and_scaling(name, rank, path)
        if permute:
            real, fn = store.views[module.lora_b]
            store.views[module.lora_b] = (real, lambda t, f=fn: permute(f(t)))
    if "dora" in found:
        size = store.source.shape(found["dora"])[0]
        module.magnitude = store.add(
            name + ".lora_magnitude_vector",
            found["dora"],
            (size,),
            (lambda t: permute(t.reshape(-1, 1)).reshape(-1)) if permute else torch.flatten,
        )
    return module


def _head_counts(folder: Path) -> tuple[str, int, int, int | None] | None:
    try:
        config = read_json(folder / "config.json")
        heads = int(config["num_attention_heads"])
        kv = int(config.get("num_key_value_heads") or heads)
        head_dim = config.get("head_dim") or int(config["hidden_size"]) // heads
        return str(config.get("model_type", "")), heads, kv, int(head_dim)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _permutation(leaf: str, heads, path: Path):
    if leaf not in ("q_proj", "k_proj"):
        return None
    if heads is None:
        raise CheckpointFormatError(
            "torchtune q/k adapters need the model's config.json (head counts) beside them "
            "to reorder their rows to Hugging Face order",
            path,
            "torchtune copies config.json into each epoch folder; copy it there",
        )
    model_type, n_heads, n_kv, head_dim = heads
    if model_type in NOT_PERMUTED:
        return None
    if model_type not in PERMUTED:
        raise CheckpointFormatError(
            f"torchtune q/k adapters of model_type {model_type!r}: row order unknown",
            path,
            "analyse torchtune's adapter_model.safetensors (PEFT format) instead",
        )
    n = n_heads if leaf == "q_proj" else n_kv

    def to_hf(t: torch.Tensor) -> torch.Tensor:
        rows = t.shape[0]
        return t.reshape(n, head_dim // 2, 2, -1).transpose(1, 2).reshape(rows, -1)

    return to_hf
