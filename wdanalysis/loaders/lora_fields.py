"""What each field of PEFT's ``LoraConfig`` does to the merged weight, and the refusals.

Every field PEFT 0.21 writes into a ``peft_type: LORA`` ``adapter_config.json`` is in one
of three tables (``tests/test_lora_variants.py`` walks ``dataclasses.fields(LoraConfig)``,
so a field added by a new PEFT release fails the tests until it is classified here):

* :data:`HANDLED`: read by :mod:`wdanalysis.loaders.peft_config` and applied to the merge;
* :data:`HARMLESS`: no effect on the merged weight matrices (metadata, training-only
  settings, sub-configs PEFT ignores unless another field activates them);
* :data:`REFUSED`: changes the merged weight in a way this reader does not rebuild, or the
  adapter has no merged weight: set to anything but its default, the adapter is refused in
  one line that names the field and the way out.

A field in none of the tables with a non-empty value is refused too: unknown means refuse.
``init_lora_weights`` is classified by value (:func:`base_init`): PiSSA and OLoRA move the
principal part of ``W0`` into the factors and are rebuilt exactly
(:mod:`wdanalysis.loaders.lora_inits`); the randomised or data-driven inits are refused
with PEFT's recipe for turning them into a plain LoRA.
"""

from __future__ import annotations

from pathlib import Path

from wdanalysis.errors import CheckpointFormatError

HANDLED = frozenset(
    {
        "peft_type",
        "r",
        "lora_alpha",
        "use_rslora",
        "use_dora",
        "rank_pattern",
        "alpha_pattern",
        "fan_in_fan_out",
        "modules_to_save",  # whole saved weights
        "trainable_token_indices",  # loaders.trainable_tokens
        "init_lora_weights",  # by value: base_init()
        "kasa_config",  # lora_diag and the truncated base: loaders.lora_inits
        "alora_invocation_tokens",  # s·B@A, active only after the invocation: a note
        "target_parameters",  # ``….weight`` as their module; stacked experts: formats
        "use_bdlora",  # block-diagonal factors expanded: loaders.bdlora
        # lora_B.bias changes only the layer's bias (PEFT's merge adds s·lora_B.bias to
        # base_layer.bias): checked and kept apart from the weight (loaders.peft_adapter)
        "lora_bias",
        # the DoRA authors' fork of PEFT: magnitude-only modules; dora_simple changes only
        # the training graph (‖V‖ detached), not the merge
        "Wdecompose_target_modules",
        "dora_simple",
    }
)

_METADATA = "metadata"
_SELECTION = "which modules are adapted is read from the tensors' names"
HARMLESS: dict[str, str] = {
    "task_type": _METADATA,
    "auto_mapping": _METADATA,
    "peft_version": _METADATA,
    "base_model_name_or_path": _METADATA,
    "revision": _METADATA,
    "inference_mode": _METADATA,
    "target_modules": _SELECTION,
    "exclude_modules": _SELECTION,
    "layers_to_transform": _SELECTION,
    "layers_pattern": _SELECTION,
    "ensure_weight_tying": "tied adapters are saved under each module's own name",
    "lora_dropout": "training only",
    "bias": "biases are not part of the weight matrices analysed",
    "megatron_config": "tensor-parallel LoRA layers merge s·B@A like nn.Linear",
    "megatron_core": "tensor-parallel LoRA layers merge s·B@A like nn.Linear",
    "eva_config": "EVA leaves the base untouched; its ranks and alphas are saved in "
    "rank_pattern/alpha_pattern",
    "loftq_config": "used only with init_lora_weights='loftq' (refused)",
    "corda_config": "used only with init_lora_weights='corda' (refused)",
    "lora_ga_config": "used only with init_lora_weights='lora_ga' (refused)",
    "velora_config": "VeLoRA changes the backward pass only; PEFT merges s·B@A",
    "monteclora_config": "PEFT merges MonteCLoRA as s·B@A; its sampler tensors are not merged",
    "qalora_group_size": "used only with use_qalora (refused)",
    "runtime_config": "not saved",
    "merge_weights": "PEFT ≤ 0.2: whether to merge at eval time",
}

_MERGE_FIRST = (
    "merge it with PEFT (PeftModel.from_pretrained(base, adapter).merge_and_unload()"
    ".save_pretrained(dir)) and analyse that full model"
)
REFUSED: dict[str, tuple[str, str]] = {
    "use_qalora": (
        "QALoRA pools the input features of quantized (GPTQ) layers before lora_A, so its "
        "update is not s·B@A on the base weight",
        _MERGE_FIRST,
    ),
    "layer_replication": (
        "layer_replication stacks copies of the base's layers, each with its own LoRA, so the "
        "adapted model has more layers than the base",
        "analyse full models instead: the merged adapter (merge_and_unload().save_pretrained) "
        "against the same LoraConfig merged untrained, which has the same replicated layers",
    ),
    "enable_lora": (
        "enable_lora (PEFT ≤ 0.2 MergedLinear) adapts only some parts of a fused projection",
        _MERGE_FIRST,
    ),
    "arrow_config": (
        "Arrow routes each token to its top-k LoRA experts, so there is no single merged weight",
        "analyse the task adapters one by one",
    ),
}

# init_lora_weights values that leave the base untouched: PEFT merges W0 + s·B@A.
PLAIN_INITS = frozenset({"true", "false", "gaussian", "eva", "orthogonal", "mica"})
EXACT_INITS = frozenset({"pissa", "olora"})  # the base is W0 − s·B₀A₀, B₀A₀ recomputed
_CONVERT = (
    "convert it to a plain LoRA with PEFT: save the untrained adapter right after "
    "get_peft_model (peft_model.save_pretrained(init_dir)), then save the trained one with "
    "peft_model.save_pretrained(out_dir, path_initial_model_for_weight_conversion=init_dir); "
    "that rank-2r LoRA is read exactly"
)
_NOT_RECOMPUTABLE = {
    "pissa_niter": "PiSSA with randomised SVD (pissa_niter_K) changes the base by factors "
    "drawn at random, which cannot be recomputed",
    "corda": "CorDA changes the base by factors computed from activation covariances, which "
    "cannot be recomputed from the weights",
    "loftq": "LoftQ replaces the base by its quantization and initial factors, which cannot "
    "be recomputed here",
    "lora_ga": "LoRA-GA changes the base by factors computed from gradients, which cannot be "
    "recomputed from the weights",
}


def is_set(value) -> bool:
    """Whether a config value asks for something (PEFT writes null/false/{}/[] when not)."""
    return value not in (None, False, "", {}, [], 0)


def base_init(raw: dict, where: Path) -> str | None:
    """How the adapter's initialisation changed the base: ``None`` (it did not), ``"pissa"``,
    ``"olora"`` or ``"kasa"``; refuses the inits whose change cannot be recomputed."""
    value = raw.get("init_lora_weights", True)
    name = str(value).lower()
    if raw.get("kasa_config") is not None:
        if name not in PLAIN_INITS or raw.get("use_dora") or raw.get("fan_in_fan_out"):
            raise CheckpointFormatError(
                "kasa_config combined with init_lora_weights, use_dora or fan_in_fan_out, "
                "which PEFT does not write",
                where,
                "re-save the adapter with PEFT",
            )
        return "kasa"
    if isinstance(value, bool) or name in PLAIN_INITS:
        return None
    if name in EXACT_INITS:
        if name == "olora" and raw.get("fan_in_fan_out"):
            raise CheckpointFormatError(
                "init_lora_weights='olora' with fan_in_fan_out (Conv1D): PEFT's OLoRA init "
                "factors the weight in its stored (in, out) layout, which is not read here",
                where,
                _CONVERT,
            )
        return name
    kind = "pissa_niter" if name.startswith("pissa_niter_") else name
    if kind in _NOT_RECOMPUTABLE:
        raise CheckpointFormatError(
            f"init_lora_weights={value!r}: {_NOT_RECOMPUTABLE[kind]}", where, _CONVERT
        )
    raise CheckpointFormatError(
        f"unknown init_lora_weights={value!r}: it may change the base weight",
        where,
        "wdanalysis reads True/False/'gaussian'/'eva'/'orthogonal'/'mica'/'pissa'/'olora'; "
        + _CONVERT,
    )


def check_lora_fields(raw: dict, where: Path) -> list[str]:
    """Refuse the fields that change the merged weight in a way not read here; return the
    notes to show for the handled ones that need a word (aLoRA)."""
    for key, value in raw.items():
        if key in HANDLED or key in HARMLESS or not is_set(value):
            continue
        if key in REFUSED:
            why, fix = REFUSED[key]
            raise CheckpointFormatError(f"{key} is set: {why}", where, fix)
        raise CheckpointFormatError(
            f"unknown adapter_config.json field {key!r} = {value!r} (from a PEFT newer than "
            "wdanalysis knows?): it may change the merged weight",
            where,
            "if it does not, delete it from adapter_config.json; else merge with PEFT "
            "(merge_and_unload) and analyse the full model",
        )
    # target_parameters other than ``….weight`` (PEFT's ParamWrapper on stacked experts) are
    # read by loaders.formats.stacked_experts against the base, or refused there
    notes = []
    if is_set(raw.get("alora_invocation_tokens")):
        notes.append(
            "aLoRA (alora_invocation_tokens): the update s·B@A applies only to the tokens from "
            "the invocation sequence on, so ΔM/ΔD describe the weight while it is active"
        )
    return notes


# Adapter tensors a LORA adapter may hold beside its factors that take no part in the
# merge, by the config field that makes PEFT save them.
_UNMERGED_TENSORS = {
    ".lora_velora_embed": "velora_config",
    ".lora_monteclora_sampler.": "monteclora_config",
}
KNOWN_LORA_ROLES = (
    "lora_A",
    "lora_B",
    "lora_magnitude_vector",
    "lora_embedding_A",
    "lora_embedding_B",
    "lora_diag",
)


def unmerged_tensor(key: str, raw: dict) -> bool:
    """Whether ``key`` is a tensor PEFT saves beside the factors that is never merged."""
    return any(
        marker in key and is_set(raw.get(field)) for marker, field in _UNMERGED_TENSORS.items()
    )


def refuse_unknown_tensor(key: str, raw: dict, where: Path) -> None:
    """A ``lora_*`` tensor this reader does not understand is refused, never dropped."""
    parts = key.split(".")
    roles = [p for p in parts if p.startswith("lora_")]
    if not roles or unmerged_tensor(key, raw):
        return
    role = roles[-1]
    if role == "lora_diag" and raw.get("kasa_config") is None:
        raise CheckpointFormatError(
            f"adapter tensor {key!r} (KaSA's lora_diag) but no kasa_config in adapter_config.json",
            where,
            "copy the adapter_config.json PEFT saved beside the weights",
        )
    tail = parts[parts.index(role) + 1 :]
    if role == "lora_A" and tail and tail[-1] == "bias":  # PEFT's lora_bias is lora_B's only
        raise CheckpointFormatError(
            f"unknown adapter tensor {key!r}: PEFT's lora_bias saves lora_B.bias only",
            where,
            "merge the adapter with PEFT (merge_and_unload) and analyse the full model",
        )
    if role not in KNOWN_LORA_ROLES:
        raise CheckpointFormatError(
            f"unknown adapter tensor {key!r} ({role}): it would be dropped from the merge",
            where,
            "merge the adapter with PEFT (merge_and_unload) and analyse the full model",
        )


def live_unsupported(raw: dict) -> str | None:
    """The variant of a live PEFT model's ``LoraConfig`` (as a dict) that live tracking
    cannot read — its in-memory base is PEFT's changed one, or its factors are not the
    layer's plain ``lora_A``/``lora_B`` — else ``None``."""
    init = str(raw.get("init_lora_weights", True)).lower()
    if isinstance(raw.get("init_lora_weights"), str) and init not in PLAIN_INITS:
        return f"init_lora_weights={raw['init_lora_weights']!r}"
    for key, name in (("kasa_config", "KaSA"), ("use_bdlora", "BD-LoRA")):
        if is_set(raw.get(key)):
            return name
    return next((k for k in REFUSED if is_set(raw.get(k))), None)
