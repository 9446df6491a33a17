"""Load a pretrained model and tokenizer from a local folder or the local hub cache (safetensors
only; nothing is ever downloaded)."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from wdanalysis.errors import CheckpointFormatError, WDAnalysisError
from wdanalysis.storage.hub_cache import resolve_model_path
from wdanalysis.train.data import CAUSAL_LM, CLASSIFICATION

HEAD_NAMES = ("classifier", "score")  # what PEFT's SEQ_CLS task saves in full


def safetensors_files(model_dir: Path) -> list[Path]:
    """``model.safetensors`` or the shards listed in ``model.safetensors.index.json``."""
    single = model_dir / "model.safetensors"
    if single.is_file():
        return [single]
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
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


def load_pretrained(model_dir: str | Path, kind: str, num_labels: int | None = None):
    """(model, tokenizer) from a local folder with ``transformers`` Auto classes.

    ``model_dir`` may be a hub id ``org/name[@revision]`` already in the local Hugging Face
    cache (:mod:`wdanalysis.storage.hub_cache`; never downloaded). The caller seeds torch
    first: a newly initialised classification head is drawn from the global RNG, and every
    method must start from the same head.
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

    options = {"local_files_only": True, "use_safetensors": True, "dtype": torch.float32}
    with _quiet_transformers():
        if kind == CLASSIFICATION:
            model = AutoModelForSequenceClassification.from_pretrained(
                model_dir, num_labels=num_labels or 2, **options
            )
        elif kind == CAUSAL_LM:
            model = AutoModelForCausalLM.from_pretrained(model_dir, **options)
        else:
            raise WDAnalysisError(f"unknown task {kind!r}")
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


def head_modules(model: nn.Module) -> list[str]:
    """Top-level names of a classification head, trained in full by every method."""
    names = dict(model.named_children())
    return [name for name in HEAD_NAMES if name in names]
