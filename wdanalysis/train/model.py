"""Load a pretrained model and tokenizer from a local folder or the local hub cache (safetensors
only; nothing is ever downloaded)."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from wdanalysis.errors import CheckpointFormatError, WDAnalysisError
from wdanalysis.storage.hub_cache import resolve_model_path
from wdanalysis.storage.small_files import read_json
from wdanalysis.storage.tensor_store import read_safetensors_header
from wdanalysis.train.data import CAUSAL_LM, CLASSIFICATION

HEAD_NAMES = ("classifier", "score")  # what PEFT's SEQ_CLS task saves in full


def safetensors_files(model_dir: Path) -> list[Path]:
    """``model.safetensors`` or the shards listed in ``model.safetensors.index.json``."""
    single = model_dir / "model.safetensors"
    if single.is_file():
        return [single]
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(read_json(index)["weight_map"].values()))
        return [model_dir / shard for shard in shards]
    raise CheckpointFormatError(
        "no model.safetensors (or sharded index) in the model folder",
        path=model_dir,
        hint="save the model with save_pretrained(..., safe_serialization=True)",
    )


def load_safetensors_into(module: nn.Module, model_dir: str | Path) -> None:
    """Load safetensors weights (a local folder or a cached hub id) into any ``nn.Module``
    with matching keys."""
    state = {}
    for path in safetensors_files(resolve_model_path(model_dir)):
        state.update(load_file(str(path)))
    missing, unexpected = module.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointFormatError(
            f"weights do not fit the module: {len(missing)} missing (e.g. {missing[:2]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:2]})",
            path=model_dir,
        )


@contextlib.contextmanager
def _quiet_transformers():
    """The 'newly initialised classifier' notice is expected here, not a user problem."""
    from transformers.utils import logging

    level, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(level)
        if bars:
            logging.enable_progress_bar()


def load_pretrained(
    model_dir: str | Path, kind: str, num_labels: int | None = None, empty: bool = False
):
    """(model, tokenizer) from a local folder with ``transformers`` Auto classes.

    ``model_dir`` may be a hub id ``org/name[@revision]`` already in the local Hugging Face
    cache (:mod:`wdanalysis.storage.hub_cache`; never downloaded). The caller seeds torch
    first: a newly initialised classification head is drawn from the global RNG, and every
    method must start from the same head.

    ``empty``: the stored weights stay on the ``meta`` device (buffers and a new head are
    real, drawn as ``from_pretrained`` draws them) for :mod:`wdanalysis.train.sharded_load`
    to fill shard by shard. A model with tied weights is loaded in full instead.
    """
    model_dir = resolve_model_path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise WDAnalysisError("not a model folder (no config.json)", path=model_dir)
    safetensors_files(model_dir)
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
    )

    autos = {CLASSIFICATION: AutoModelForSequenceClassification, CAUSAL_LM: AutoModelForCausalLM}
    if kind not in autos:
        raise WDAnalysisError(f"unknown task {kind!r}")
    extra = {"num_labels": num_labels or 2} if kind == CLASSIFICATION else {}
    options = {"local_files_only": True, "use_safetensors": True, "dtype": torch.float32}
    with _quiet_transformers():
        model = _empty_model(autos[kind], model_dir, extra) if empty else None
        if model is None:
            model = autos[kind].from_pretrained(model_dir, **extra, **options)
        try:
            tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        except (OSError, ValueError) as error:
            raise WDAnalysisError(
                f"no usable tokenizer in the model folder ({error})", path=model_dir
            ) from error
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def stored_keys(model_dir: Path) -> dict[str, Path]:
    """Every tensor name in the model's safetensors files (headers only) -> its file."""
    return {
        key: path for path in safetensors_files(model_dir) for key in read_safetensors_header(path)
    }


def stored_key(model: nn.Module, key: str, stored: Mapping[str, object]) -> str | None:
    """The file's name for the model's ``key``: as is, or without the base-model prefix
    (``bert.``) that a checkpoint of the bare model lacks, as ``from_pretrained`` maps it."""
    if key in stored:
        return key
    prefix = getattr(model, "base_model_prefix", "") + "."
    bare = key[len(prefix) :] if key.startswith(prefix) else None
    return bare if bare in stored else None


def _has_output_embeddings(model: nn.Module) -> bool:
    getter = getattr(model, "get_output_embeddings", None)
    return getter is not None and getter() is not None


def _empty_model(auto, model_dir: Path, extra: dict) -> nn.Module | None:
    """The model with meta parameters and real buffers; ``None`` when weights are tied
    (FSDP would see one tensor twice) so that the caller loads it in full."""
    try:
        from accelerate import init_empty_weights
    except ImportError:
        raise WDAnalysisError(
            "--fsdp builds the model on the meta device with accelerate, not installed",
            hint="pip install accelerate",
        ) from None
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir, local_files_only=True, **extra)
    with init_empty_weights(include_buffers=False):
        model = auto.from_config(config, dtype=torch.float32)
    all_names = list(model.named_parameters(remove_duplicate=False))
    ties_head = getattr(config, "tie_word_embeddings", False) and _has_output_embeddings(model)
    if ties_head or len(all_names) != len(list(model.named_parameters())):
        return None
    stored = stored_keys(model_dir)
    missing = [n for n, _ in model.named_parameters() if stored_key(model, n, stored) is None]
    heads = set(head_modules(model))
    unknown = [name for name in missing if name.split(".")[0] not in heads]
    if unknown:
        raise CheckpointFormatError(
            f"--fsdp loads each shard from the files, but {unknown[0]!r} is not in them",
            path=model_dir,
            hint="re-save the model with save_pretrained(..., safe_serialization=True)",
        )
    for head in sorted({name.split(".")[0] for name in missing}):
        module = model.get_submodule(head)  # a new head: drawn here, as from_pretrained does
        module.to_empty(device="cpu")
        module.apply(model._init_weights)
    return model


def head_modules(model: nn.Module) -> list[str]:
    """Top-level names of a classification head, trained in full by every method."""
    names = dict(model.named_children())
    return [name for name in HEAD_NAMES if name in names]
