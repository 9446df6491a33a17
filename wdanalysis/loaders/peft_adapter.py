"""LoRA and DoRA adapters: parse their configs and rebuild effective weights exactly.

Formats read here (see ``shared/reference/formats-and-pitfalls.md``):

* PEFT ``LORA`` adapters, with or without ``use_dora`` (``lora_magnitude_vector``), on
  ``nn.Linear``, GPT-2 ``Conv1D``, ``nn.Conv1d/2d/3d`` and ``nn.Embedding`` layers;
* the DoRA authors' LLM format (``peft_type: "DORA"``, ``weight_m_wdecomp.weight``);
* the DoRA authors' VL-BART state dicts (``weight_m``, bare ``lora_A``/``lora_B``).

Conv weights are analysed as the matrix ``(out, in·k…)`` (PEFT's DoRA norm runs over every
dim but 0), with ``lora_A`` ``(r, in, k…)`` and ``lora_B`` ``(out, r, 1…)`` flattened the
same way: PEFT's conv merge ``conv(A, B)`` is exactly ``B.view(out, r) @ A.view(r, -1)``.
An embedding weight ``(num_embeddings, embedding_dim)`` is, for PEFT, stored ``(in, out)``:
its update is ``(lora_embedding_B @ lora_embedding_A)ᵀ`` and its DoRA magnitude holds one
value per embedding dimension, so it is handled like a transposed (``Conv1D``) weight.

The effective weight is always rebuilt from the untouched base matrix, one matrix at a time
and in float64, so merges never pile up across checkpoints and bf16 never rounds the update.
"""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from wdanalysis.errors import AdapterMismatchError, CheckpointFormatError
from wdanalysis.loaders import bdlora, lora_fields, lora_inits
from wdanalysis.loaders import trainable_tokens as tokens
from wdanalysis.loaders.key_alignment import KeyAligner, strip_peft_prefix
from wdanalysis.loaders.layer_shapes import check_factors, factor_matrices, out_in
from wdanalysis.loaders.peft_config import (  # noqa: F401 - re-exported: the adapters' API
    SUPPORTED_PEFT_TYPES,
    VLBART_CONFIG,
    AdapterConfig,
    read_adapter_config,
)
from wdanalysis.storage.tensor_store import TensorStore

# Suffix of a key → (role, is the module's own name before it).
_ROLE_SUFFIXES = (
    (".lora_A.weight", "A"),
    (".lora_B.weight", "B"),
    (".lora_B.bias", "bias"),  # PEFT lora_bias=True: merged into the layer's bias
    (".lora_magnitude_vector.weight", "m"),
    (".lora_magnitude_vector", "m"),
    (".weight_m_wdecomp.weight", "m"),
    (".weight_m", "m"),
    (".weight_v", "v"),  # VL-BART DoraLinear: its own frozen copy of W0
    (".lora_A", "A"),
    (".lora_B", "B"),
    (".lora_embedding_A", "EA"),  # nn.Embedding: (r, num_embeddings)
    (".lora_embedding_B", "EB"),  # (embedding_dim, r)
    (".lora_diag", "D"),  # KaSA: (r,), the update is s·B·diag·A
)
_UNSUPPORTED_ROLES = ("lora_E", "hada_w", "lokr_w")


@dataclass
class AdapterModule:
    """The adapter's pieces for one module, keyed by their names in the adapter file."""

    name: str  # module path without the PEFT prefix
    lora_a: str | None = None
    lora_b: str | None = None
    magnitude: str | None = None
    replacement: str | None = None  # a whole saved weight (PEFT modules_to_save)
    saved_base: str | None = None  # VL-BART ``weight_v``: the W0 the module itself merges onto
    rank: int | None = None
    scaling: float = 1.0
    embedding: bool = False  # an nn.Embedding: stored (in, out), update (B@A)ᵀ
    token_rows: str | None = None  # PEFT trainable tokens (wdanalysis.loaders.trainable_tokens)
    token_indices: tuple[int, ...] = ()
    diag: str | None = None  # KaSA's lora_diag
    # the init changed the base: "pissa", "olora", "kasa" (wdanalysis.loaders.lora_inits)
    base_init: str | None = None
    blocks: bdlora.Blocks | None = None  # BD-LoRA: which factor is saved block-diagonal
    lora_bias: str | None = None  # PEFT lora_B.bias (out,): merged into the bias only

    def merged_whole(self, axis: str, transposed: bool) -> bool:
        """Whether the engine must merge this module's whole weight with
        :meth:`Adapter.effective_weight` instead of streaming its update block by block.

        The streamed update ``s·B[rows]@A`` (and DoRA's per-row rescaling) covers the usual
        layouts; the rare ones below are merged whole, one matrix, exactly as the adapter
        merges them. ``transposed``: whether the base stores the weight (in, out).
        """
        return bool(
            not (self.lora_b or self.magnitude)  # a whole saved weight (modules_to_save)
            or self.saved_base  # VL-BART merges onto its own weight_v, not the base
            or self.base_init  # PiSSA/OLoRA/KaSA: the base part is recomputed from W0
            or self.blocks  # BD-LoRA: a factor expanded from its diagonal blocks
            # DoRA's per-output scale on the input axis needs whole stored columns
            or (self.magnitude and axis == "in" and transposed)
            # an embedding is (in, out) whatever the caller's layout says
            or (self.embedding and not transposed)
        )


def group_adapter_keys(
    keys: list[str], where: Path, raw: dict | None = None
) -> dict[str, AdapterModule]:
    """Group adapter tensor names by the module they adapt.

    ``raw``: a PEFT ``LORA`` config, whose adapters hold only the tensors
    :mod:`wdanalysis.loaders.lora_fields` knows; any other ``lora_*`` tensor is refused.
    """
    modules: dict[str, AdapterModule] = {}
    for key in keys:
        if raw is not None:
            lora_fields.refuse_unknown_tensor(key, raw, where)
            if lora_fields.unmerged_tensor(key, raw):
                continue  # saved for training (VeLoRA, MonteCLoRA), never merged by PEFT
        if any(f".{role}" in key for role in _UNSUPPORTED_ROLES):
            raise CheckpointFormatError(
                f"unsupported adapter tensor {key!r} (embedding or non-LoRA adapter)", where
            )
        if tokens.token_module(key):
            name = strip_peft_prefix(tokens.token_module(key))
            modules.setdefault(name, AdapterModule(name)).token_rows = key
            continue
        role, name = _role_of(key)
        module = modules.setdefault(name, AdapterModule(name))
        module.embedding = module.embedding or role in ("EA", "EB")
        if role == "bias":
            module.lora_bias = key
        elif role in ("A", "EA"):
            module.lora_a = key
        elif role in ("B", "EB"):
            module.lora_b = key
        elif role == "m":
            module.magnitude = key
        elif role == "v":
            module.saved_base = key
        elif role == "D":
            module.diag = key
        elif key.endswith(".weight"):
            module.replacement = key
    return modules


# A live PEFT model's state dict (``torch.save(peft_model.state_dict())``) keeps the adapter
# name: ``q_proj.lora_A.default.weight``, ``q_proj.lora_magnitude_vector.default.weight``.
_NAMED_ROLE = re.compile(
    r"^(?P<module>.+)\.(?P<role>lora_A|lora_B|lora_magnitude_vector|lora_embedding_[AB]|lora_diag)"
    r"\.[^.]+(?:\.weight)?$"
)
_NAMED_ROLES = {
    "lora_A": "A",
    "lora_B": "B",
    "lora_magnitude_vector": "m",
    "lora_embedding_A": "EA",
    "lora_embedding_B": "EB",
    "lora_diag": "D",
}


_NAMED_BIAS = re.compile(r"^(?P<module>.+)\.lora_B\.[^.]+\.bias$")


def _role_of(key: str) -> tuple[str, str]:
    for suffix, role in _ROLE_SUFFIXES:
        if key.endswith(suffix):
            return role, strip_peft_prefix(key[: -len(suffix)])
    named_bias = _NAMED_BIAS.match(key)  # before _NAMED_ROLE, which would take it for B
    if named_bias:
        return "bias", strip_peft_prefix(named_bias["module"])
    named = _NAMED_ROLE.match(key)
    if named:
        return _NAMED_ROLES[named["role"]], strip_peft_prefix(named["module"])
    stripped = strip_peft_prefix(key)
    stripped = stripped.replace(".modules_to_save.default.", ".").replace(".modules_to_save.", ".")
    stripped = stripped.replace(".base_layer.", ".")  # the wrapped layer's own weight
    name = stripped[: -len(".weight")] if stripped.endswith(".weight") else stripped
    return "other", name


@dataclass
class Adapter:
    """A LoRA/DoRA adapter over a base model, checked against that model's weights."""

    path: Path
    store: TensorStore
    config: AdapterConfig
    modules: dict[str, AdapterModule]

    @property
    def method(self) -> str:
        dora = any(m.magnitude for m in self.modules.values())
        init = _INIT_NAMES.get(self.config.base_init)
        if init:
            return f"{init}-DoRA" if dora else init
        return "DoRA" if dora else "LoRA"

    @property
    def adapted(self) -> dict[str, AdapterModule]:
        return {n: m for n, m in self.modules.items() if m.lora_b or m.magnitude}

    def bind(self, aligner: KeyAligner, shapes: dict[str, tuple[int, ...]], transposed) -> dict:
        """Map base keys to adapter modules; fail loudly on anything that does not fit."""
        bound: dict[str, AdapterModule] = {}
        unmatched, left_out = [], []
        for name, module in self.modules.items():
            base_key = aligner.find(name + ".weight")
            if base_key is None:
                if module.lora_b or module.magnitude or module.token_rows:
                    unmatched.append(name)
                elif module.replacement:  # e.g. a task head saved with modules_to_save
                    left_out.append(name)
                continue
            if module.embedding and len(shapes[base_key]) != 2:
                raise AdapterMismatchError(
                    f"{module.name}: an embedding adapter on the base weight "
                    f"{list(shapes[base_key])}, which is not an embedding table",
                    self.path,
                    "pass the base model this adapter was trained on",
                )
            if module.token_rows:
                module.token_indices = tokens.indices_for(name, self.config.raw, self.path)
                rows = self.store.shape(module.token_rows)
                tokens.check_rows(name, module.token_indices, rows, shapes[base_key], self.path)
            if module.lora_b:
                module.blocks = bdlora.blocks_for(name, self.config.raw, self.path)
            self._check_module(module, shapes[base_key], transposed(base_key) or module.embedding)
            lora_inits.bind_init(
                module, self.config.base_init, shapes[base_key], self.store, self.path
            )
            bound[base_key] = module
        if left_out:
            warn_left_out(left_out, self.path)
        if unmatched:
            total = sum(1 for m in self.modules.values() if m.lora_b or m.magnitude)
            why, hint = explain_unmatched(unmatched[0], aligner.base_keys)
            raise AdapterMismatchError(
                f"{len(unmatched)} of {total} adapted modules match no base weight, "
                f"e.g. {unmatched[0]!r}: {why}",
                self.path,
                hint,
            )
        return bound

    def _check_module(self, module: AdapterModule, shape, transposed: bool) -> None:
        if not (module.lora_a or module.lora_b or module.magnitude):
            return  # a whole saved weight (1-D norms too): checked when it is analysed
        out_features, _ = out_in(shape, transposed, self.path)
        if module.lora_a or module.lora_b:
            if not (module.lora_a and module.lora_b):
                raise AdapterMismatchError(
                    f"{module.name} has only one of lora_A/lora_B",
                    self.path,
                    "the adapter file is incomplete; re-save it",
                )
            a_shape, b_shape = bdlora.full_shapes(
                module.blocks, self.store.shape(module.lora_a), self.store.shape(module.lora_b)
            )
            rank = check_factors(module.name, a_shape, b_shape, shape, transposed, self.path)
            module.rank, module.scaling = self.config.rank_and_scaling(module.name, rank, self.path)
        if module.lora_bias:
            self._check_bias(module, out_features)
        if module.magnitude:
            m_shape = self.store.shape(module.magnitude)
            if math.prod(m_shape) != out_features:
                raise AdapterMismatchError(
                    f"{module.name}: magnitude has shape {list(m_shape)} but the base weight has "
                    f"{out_features} output features",
                    self.path,
                    "this adapter was trained on a model of another size",
                )
        pieces = (module.lora_a, module.lora_b, module.magnitude, module.lora_bias)
        refuse_non_float(self.store, pieces, self.path)
        if module.saved_base and self.store.shape(module.saved_base) != tuple(shape):
            raise AdapterMismatchError(
                f"{module.name}: weight_v {list(self.store.shape(module.saved_base))} does not "
                f"match the base weight {list(shape)}",
                self.path,
                "this checkpoint was trained on a model of another size",
            )

    def _check_bias(self, module: AdapterModule, out_features: int) -> None:
        """``lora_B.bias`` must be one value per output feature, beside a ``lora_B``."""
        shape = tuple(self.store.shape(module.lora_bias))
        if not module.lora_b or shape != (out_features,):
            raise AdapterMismatchError(
                f"{module.name}: lora_B.bias has shape {list(shape)}"
                + ("" if module.lora_b else " but the module has no lora_B")
                + f"; PEFT's lora_bias holds one value per output feature ({out_features})",
                self.path,
                "pass the base model this adapter was trained on, or re-save the adapter",
            )

    def saved_weight(self, module: AdapterModule, w0: torch.Tensor) -> torch.Tensor:
        """A ``modules_to_save`` weight in float64; resized (added tokens): fatal only here."""
        saved = self.store.get(module.replacement)
        if tuple(saved.shape) != tuple(w0.shape):
            raise AdapterMismatchError(
                f"{module.name}: saved weight {list(saved.shape)} does not match the base "
                f"weight {list(w0.shape)}",
                self.path,
                "leave this module out of --modules, or pass the matching base model",
            )
        return saved.to(torch.float64)

    def effective_weight(self, module: AdapterModule, w0: torch.Tensor, transposed: bool):
        """The merged weight in float64, in the base weight's stored layout.

        LoRA: ``W0 + s·B@A``; DoRA: ``m · V / ‖V‖`` with ``V = W0 + s·B@A`` and the norm
        taken per output feature, exactly as PEFT and the DoRA authors merge. Conv kernels
        are merged as ``(out, in·k…)`` matrices, embeddings as transposed weights
        (:mod:`wdanalysis.loaders.layer_shapes`).
        """
        if module.token_rows:  # rows replaced first; PEFT refuses LoRA on the same table
            w0 = tokens.with_rows(w0, module.token_indices, self.store.get(module.token_rows))
        if not (module.lora_b or module.magnitude):
            return self.saved_weight(module, w0) if module.replacement else w0.double()
        # VL-BART's DoraLinear merges onto its own saved copy of W0 (weight_v)
        use_saved = module.saved_base and self.config.format == "dora-vlbart"
        v = (self.store.get(module.saved_base) if use_saved else w0).to(torch.float64)
        transposed = transposed or module.embedding
        v = v.T if transposed else v.reshape(v.shape[0], -1)  # conv: (out, in·k…)
        if module.base_init:  # PiSSA/OLoRA: W0 − s·B₀A₀; KaSA: W0 − T (its tail)
            v = v - lora_inits.initial_part(module.base_init, v, module.rank, module.scaling)
        if module.lora_b:
            a, b = bdlora.full_factors(
                module.blocks, self.store.get(module.lora_a), self.store.get(module.lora_b)
            )
            a, b = factor_matrices(a, b)
            if module.diag:  # KaSA: s·B·diag(lora_diag)·A
                b = b.to(torch.float64) * self.store.get(module.diag).to(torch.float64)
            v = v + module.scaling * (b.to(torch.float64) @ a.to(torch.float64))
        if module.magnitude:
            m = self.store.get(module.magnitude).to(torch.float64).reshape(-1, 1)
            norm = torch.linalg.vector_norm(v, dim=1, keepdim=True)
            # A zero row of V has no direction: it stays zero (and is counted as a zero-norm
            # vector by the analysis) instead of becoming 0/0 = NaN.
            v = m * (v / torch.where(norm > 0, norm, torch.ones_like(norm)))
        return (v.T if transposed else v).reshape(w0.shape)


_INIT_NAMES = {"pissa": "PiSSA", "olora": "OLoRA", "kasa": "KaSA"}


def warn_left_out(names: list[str], path: Path) -> None:
    """Saved modules the base lacks cannot be analysed: say so rather than drop them."""
    shown = ", ".join(repr(n) for n in names[:5]) + (", …" if len(names) > 5 else "")
    warnings.warn(
        f"{path}: {len(names)} saved module(s) match no base weight and are left out: "
        f"{shown} (e.g. a task head saved with modules_to_save that the base model lacks)",
        stacklevel=3,
    )


def refuse_non_float(store, names, path) -> None:
    """Adapter factors and magnitudes must be floating point (not quantized or integer)."""
    for name in names:
        dtype = store.dtype(name) if name else torch.float32
        if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise AdapterMismatchError(
                f"adapter tensor {name!r} has dtype {str(dtype).replace('torch.', '')}; "
                "quantized or integer adapter weights are not supported",
                path,
                "save the adapter in fp32/fp16/bf16",
            )


def explain_unmatched(name: str, base_keys) -> tuple[str, str]:
    """Why an adapted module matches no base weight, and the fix: a model mismatch (the
    base has no such module) or a key-prefix mismatch (the name fits several base weights)."""
    paths = sorted(k[: -len(".weight")] for k in base_keys if k.endswith(".weight"))
    leaf = name.rsplit(".", 1)[-1]
    same_leaf = [p for p in paths if p.rsplit(".", 1)[-1] == leaf]
    retrain = "pass the base model this adapter was trained on"
    if not same_leaf:
        leaves = sorted({p.rsplit(".", 1)[-1] for p in paths})
        shown = ", ".join(leaves[:8]) + (", …" if len(leaves) > 8 else "")
        return (
            f"model mismatch: the base has no {leaf!r} module (its modules: {shown})",
            retrain,
        )
    parts = name.split(".")
    numbered = [i for i, part in enumerate(parts) if part.isdigit()]
    for start in range(len(parts) - 1):
        tail = ".".join(parts[start:])
        fits = [p for p in same_leaf if p == tail or p.endswith("." + tail)]
        if len(fits) >= 2 and (not numbered or start <= numbered[0]):
            return (
                f"key prefix mismatch: it fits {fits[0]!r} and {fits[1]!r} alike",
                "the adapter was saved without the model's module prefix; rename its keys to "
                f"full module names such as 'base_model.model.{fits[0]}'",
            )
        if fits:
            break
    return (
        f"model mismatch: the base has {leaf!r} modules but none at this path "
        f"(e.g. {same_leaf[0]!r})",
        retrain,
    )
