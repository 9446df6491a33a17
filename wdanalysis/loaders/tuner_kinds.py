"""PEFT's tuners other than LoRA, by ``peft_type``: those read (their merged weight is
PEFT's own, :mod:`wdanalysis.loaders.peft_tuners`) and those refused, with why.

Plain data, importable without PEFT, so that the config reader
(:mod:`wdanalysis.loaders.peft_config`) can dispatch on the type and refuse early.
The lists cover every ``PeftType`` of PEFT 0.21.2; a type named in neither is refused
(unknown means refuse).
"""

from __future__ import annotations

from pathlib import Path

from wdanalysis.errors import CheckpointFormatError

# peft_type → (the method column's name, how the merged weight is formed).
MERGED = {
    "ADALORA": ("AdaLoRA", "W0 + s·B·diag(E)·A, the SVD-form LoRA with its adaptive ranks"),
    "ADAMSS": ("AdaMSS", "W0 + low-rank updates in subspaces clustered from W0's SVD"),
    "BOFT": ("BOFT", "W0 rotated by butterfly-factorised orthogonal blocks, times boft_s"),
    "C3A": ("C3A", "W0 + a block-circulant update (circular convolution kernels)"),
    "DEFT": ("DEFT", "(I − P_proj)·W0 + Q_P·R, a residual-projection update"),
    "DELORA": ("DeLoRA", "W0 + λ·‖W0‖·B·Ξ·A, normalised rank-one parts with a bounded norm"),
    "FOURIERFT": ("FourierFT", "W0 + s·IDFT2 of a sparse spectrum at the saved frequencies"),
    "GLORA": ("GLoRA", "W0 + W0⊙A + B, generalised LoRA"),
    "GRALORA": ("GraLoRA", "W0 + a grid of block-wise (granular) LoRA updates"),
    "HIRA": ("HiRA", "W0 + W0⊙(B·A), a Hadamard high-rank update"),
    "HRA": ("HRA", "W0 times a chain of Householder reflections"),
    "IA3": (
        "IA³",
        "W0 scaled by the learned vector: per input column for feedforward_modules, "
        "else per output row",
    ),
    "LN_TUNING": ("LN Tuning", "the trained copy of the layer replaces it"),
    "LOHA": ("LoHa", "W0 + s·(W1a·W1b)⊙(W2a·W2b), a Hadamard product of low-rank factors"),
    "LOKR": ("LoKr", "W0 + s·(W1 ⊗ W2), a Kronecker product of (low-rank) factors"),
    "MISS": ("MiSS", "W0 + its small trained block, shared over the weight's tiles"),
    "OFT": ("OFT", "W0 rotated by block-diagonal orthogonal matrices (Cayley)"),
    "OSF": ("OSF", "W0 with the low singular subspace of its SVD trained, the high one frozen"),
    "PEANUT": ("PEANuT", "W0 + an update computed from W0 by small trained networks"),
    "PSOFT": ("PSOFT", "W0 + B·(R − I)·A, an orthogonal R between frozen SVD factors of W0"),
    "PVERA": ("PVeRA", "W0 + VeRA's update at the mean of its probabilistic projection"),
    "RANDLORA": ("RandLoRA", "W0 + s·Σ B_i·diag(λ)·A_i·diag(γ) over shared random bases"),
    "ROAD": ("RoAd", "W0's output pairs rotated and scaled (2-D rotations)"),
    "SHIRA": ("SHiRA", "W0 + a sparse update at the saved indices"),
    "SUPERTUNING": (
        "SuperTuning",
        "W0 + trained entries on a sparse support chosen by magnitude (+ a LoRA if r)",
    ),
    "TRAINABLE_TOKENS": ("trainable tokens", "the saved rows written into the embedding table"),
    "VBLORA": ("VBLoRA", "W0 + B·A, their rows mixed from the shared vector bank (top-k)"),
    "VERA": ("VeRA", "W0 + diag(λ_b)·B·diag(λ_d)·A over the shared projections vera_A/vera_B"),
    "WAVEFT": ("WaveFT", "W0 + the inverse wavelet transform of sparse coefficients"),
}

_PROMPT = "trains virtual tokens fed to the model with the input; no weight changes"
NO_MERGED_WEIGHT = {
    "PROMPT_TUNING": _PROMPT,
    "MULTITASK_PROMPT_TUNING": _PROMPT,
    "P_TUNING": "trains a prompt encoder whose virtual tokens precede the input; no weight changes",
    "PREFIX_TUNING": "trains key/value prefixes for every attention layer; no weight changes",
    "CPT": "context-aware prompt tuning trains token embeddings of the prompt only; no weight "
    "changes",
    "CARTRIDGE": "trains a KV-cache prefix; no weight changes",
    "ADAPTION_PROMPT": "adds gated prompt attention beside the layers; no weight changes",
    "XLORA": "mixes LoRA experts per token with a learned classifier: no single merged weight "
    "(analyse each expert LoRA on its own)",
    "POLY": "routes a mixture of LoRA modules per task: no single merged weight",
    "LILY": "routes shared low-rank experts per input; PEFT defines no merged weight",
    "SHADOW": "its adaptation depends on the input; PEFT defines no merged weight",
    "BEFT": "trains biases only; the weights it leaves unchanged",
}
# Merged by PEFT, but from state shared across the whole model's modules that one module
# cannot be given on its own.
WHOLE_MODEL_ONLY = {
    "FROD": "its bases are decomposed jointly over all layers of a kind and indexed by layer",
    "TINYLORA": "its shared vectors are numbered over all adapted modules of the model",
    "UNILORA": "its one shared parameter vector is indexed over all adapted modules",
}
_LORA_TYPES = {"LORA", "DORA"}


def tuner_name(peft_type: str) -> str:
    return MERGED[peft_type][0]


def check_readable(raw: dict, path: Path) -> None:
    """Refuse, in one line, a ``peft_type`` that is not LoRA and not merged here."""
    given = raw.get("peft_type")
    peft_type = str(given).upper()
    if peft_type in MERGED or peft_type in _LORA_TYPES:
        return
    if peft_type in NO_MERGED_WEIGHT:
        raise CheckpointFormatError(
            f"peft_type {given!r} has no merged weight to analyse: {NO_MERGED_WEIGHT[peft_type]}",
            path,
        )
    if peft_type in WHOLE_MODEL_ONLY:
        raise CheckpointFormatError(
            f"peft_type {given!r} is refused: {WHOLE_MODEL_ONLY[peft_type]}, so its merge "
            "cannot be formed one module at a time, as wdanalysis reads weights",
            path,
            "merge it with PEFT (merge_and_unload, save_pretrained) and analyse the merged model",
        )
    raise CheckpointFormatError(
        f"unsupported peft_type {given!r}",
        path,
        "wdanalysis reads LoRA/DoRA adapters and the PEFT tuners listed in the README "
        "('PEFT methods')",
    )
