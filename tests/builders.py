"""Builders of tiny, real checkpoints for tests, and an independent numpy reference.

Everything here writes files the way users' tools write them (transformers configs, PEFT's
``save_pretrained``, ``torch.save`` state dicts, safetensors shards with an index) from tiny
models built from configs: nothing is downloaded. The reference functions recompute ΔM and
ΔD with numpy in float64/longdouble by a different route than ``wdanalysis.engine.decomposition``
(explicit norms and ``0.5·‖â − b̂‖²`` instead of the kernel's sums), so they can catch it.

The builders are generic: other test files may import them (``from builders import ...``;
``tests/conftest.py`` puts this folder on ``sys.path``).
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

# ---------------------------------------------------------------------------- tiny models

HIDDEN = 32
LAYERS = 2


def llama_config(**overrides):
    """LLaMA with grouped-query attention: q_proj (48, 32) and v_proj (12, 32), non-square."""
    from transformers import LlamaConfig

    kwargs = dict(
        vocab_size=64,
        hidden_size=HIDDEN,
        intermediate_size=40,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=12,
        max_position_embeddings=32,
        tie_word_embeddings=False,
    )
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


def bert_config(**overrides):
    from transformers import BertConfig

    kwargs = dict(
        vocab_size=64,
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        intermediate_size=40,
        max_position_embeddings=32,
        num_labels=3,
    )
    kwargs.update(overrides)
    return BertConfig(**kwargs)


def gpt2_config(**overrides):
    from transformers import GPT2Config

    kwargs = dict(
        vocab_size=64,
        n_embd=HIDDEN,
        n_layer=LAYERS,
        n_head=4,
        n_positions=32,
        bos_token_id=0,
        eos_token_id=0,
    )
    kwargs.update(overrides)
    return GPT2Config(**kwargs)


def trainable_bert(folder: Path, tokenizer, dropout: bool = True) -> Path:
    """The tiny BERT classifier the training tests fine-tune (seed 0), with ``tokenizer``
    saved beside it; ``dropout=False`` so that runs can be compared step for step."""
    from transformers import BertForSequenceClassification

    quiet = {} if dropout else {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
    torch.manual_seed(0)
    config = bert_config(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=48,
        max_position_embeddings=64,
        num_labels=2,
        **quiet,
    )
    BertForSequenceClassification(config).save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


def trainable_gpt2(folder: Path, tokenizer, dropout: bool = True) -> Path:
    """The tiny GPT-2 the training tests fine-tune (seed 0), as :func:`trainable_bert`."""
    from transformers import GPT2LMHeadModel

    quiet = {} if dropout else {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
    torch.manual_seed(0)
    config = gpt2_config(
        vocab_size=tokenizer.vocab_size,
        n_embd=32,
        n_layer=2,
        n_head=2,
        n_positions=64,
        bos_token_id=101,
        eos_token_id=102,
        **quiet,
    )
    GPT2LMHeadModel(config).save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


def bart_config(**overrides):
    from transformers import BartConfig

    kwargs = dict(
        vocab_size=64,
        d_model=HIDDEN,
        encoder_layers=LAYERS,
        decoder_layers=LAYERS,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=40,
        decoder_ffn_dim=40,
        max_position_embeddings=32,
    )
    kwargs.update(overrides)
    return BartConfig(**kwargs)


def tiny_model(kind: str, seed: int = 0):
    """A randomly initialised tiny transformers model.

    ``kind``: ``llama`` (LlamaForCausalLM), ``llama-bare`` (LlamaModel), ``bert``
    (BertModel), ``bert-cls`` (BertForSequenceClassification), ``gpt2`` (GPT2LMHeadModel),
    ``bart`` (BartModel), ``bart-lm`` (BartForConditionalGeneration).
    """
    import transformers as tf

    factories = {
        "llama": (tf.LlamaForCausalLM, llama_config),
        "llama-bare": (tf.LlamaModel, llama_config),
        "bert": (tf.BertModel, bert_config),
        "bert-cls": (tf.BertForSequenceClassification, bert_config),
        "gpt2": (tf.GPT2LMHeadModel, gpt2_config),
        "bart": (tf.BartModel, bart_config),
        "bart-lm": (tf.BartForConditionalGeneration, bart_config),
    }
    cls, config = factories[kind]
    torch.manual_seed(seed)
    model = cls(config())
    with torch.no_grad():  # norms well away from zero, and not all alike
        for name, param in model.named_parameters():
            if param.dim() == 2:
                param.normal_(0.0, 0.2, generator=torch.Generator().manual_seed(seed + len(name)))
    return model.eval()


# ---------------------------------------------------------------------------- writing files


def write_weights(
    state: Mapping[str, torch.Tensor],
    folder: str | Path,
    fmt: str = "safetensors",
    shards: int = 1,
    filename: str | None = None,
) -> Path:
    """Write a state dict as transformers does: one file, or shards plus an index.

    ``fmt``: ``safetensors`` or ``bin``. Returns the single file, or the index file.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().clone().contiguous() for k, v in state.items()}
    stem, ext = ("model", "safetensors") if fmt == "safetensors" else ("pytorch_model", "bin")
    if shards == 1:
        path = folder / (filename or f"{stem}.{ext}")
        _write_one(state, path, fmt)
        return path
    keys = list(state)
    weight_map, total = {}, 0
    for i in range(shards):
        name = f"{stem}-{i + 1:05d}-of-{shards:05d}.{ext}"
        part = {k: state[k] for k in keys[i::shards]}
        _write_one(part, folder / name, fmt)
        for key, tensor in part.items():
            weight_map[key] = name
            total += tensor.numel() * tensor.element_size()
    index = folder / f"{stem}.{ext}.index.json"
    index.write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return index


def _write_one(state: Mapping[str, torch.Tensor], path: Path, fmt: str) -> None:
    if fmt == "safetensors":
        save_file(dict(state), str(path), metadata={"format": "pt"})
    elif fmt == "bin":
        torch.save(dict(state), path)
    else:
        raise ValueError(fmt)


def save_model(
    model_or_state,
    folder: str | Path,
    *,
    config=None,
    dtype: torch.dtype | None = None,
    fmt: str = "safetensors",
    shards: int = 1,
) -> dict[str, torch.Tensor]:
    """Save weights (+ ``config.json``) into ``folder``; returns the state dict as stored."""
    folder = Path(folder)
    if isinstance(model_or_state, torch.nn.Module):
        config = config if config is not None else model_or_state.config
        state = model_or_state.state_dict()
    else:
        state = dict(model_or_state)
    state = {
        k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v)
        for k, v in state.items()
    }
    write_weights(state, folder, fmt=fmt, shards=shards)
    if config is not None:
        config.save_pretrained(folder)
    return state


def finetuned(
    state: Mapping[str, torch.Tensor], seed: int, scale: float = 0.05
) -> dict[str, torch.Tensor]:
    """A full fine-tuning step: every matrix changes in both row norms and directions."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for key, value in state.items():
        if value.is_floating_point() and value.dim() == 2:
            w = value.to(torch.float64)
            noise = torch.randn(w.shape, generator=gen, dtype=torch.float64)
            rows = 1 + scale * torch.randn(w.shape[0], 1, generator=gen, dtype=torch.float64)
            out[key] = (w * rows + scale * w.std() * noise).to(value.dtype)
        else:
            out[key] = value.clone()
    return out


# ---------------------------------------------------------------------------- PEFT adapters


def randomize_adapter(peft_model, seed: int, b_std: float = 0.05, m_jitter: float = 0.1) -> None:
    """Make a fresh PEFT adapter non-trivial: lora_B ~ N(0, b_std), magnitude jittered.

    At initialisation lora_B is zero and the DoRA magnitude equals the base row norms, so
    every merge would be the identity; this gives every module a real update.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * b_std)
            elif "lora_magnitude_vector" in name:
                param.mul_(1 + m_jitter * torch.randn(param.shape, generator=gen))


def make_peft_adapter(
    model,
    folder: str | Path,
    *,
    seed: int = 0,
    safe_serialization: bool = True,
    live_state_dict: str | Path | None = None,
    **lora_kwargs,
) -> dict[str, torch.Tensor]:
    """Wrap a copy of ``model`` with PEFT LoRA/DoRA, randomise it, save it to ``folder``.

    Returns PEFT's own merged weights (``merge_and_unload`` on a float64 copy), keyed by the
    base model's parameter names: the ground truth for every effective weight.
    ``live_state_dict``: also ``torch.save(peft_model.state_dict())`` there (keys keep the
    adapter name, ``...q_proj.lora_A.default.weight``, and ``base_layer``).
    """
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(**lora_kwargs))
    randomize_adapter(peft_model, seed)
    peft_model.save_pretrained(str(folder), safe_serialization=safe_serialization)
    if live_state_dict is not None:
        torch.save(peft_model.state_dict(), live_state_dict)
    merged = copy.deepcopy(peft_model).double().merge_and_unload()
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}


def edit_json(path: str | Path, **changes) -> dict:
    """Rewrite keys of a JSON file (e.g. ``target_modules=None`` in adapter_config.json)."""
    path = Path(path)
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data, indent=2))
    return data


def read_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors or torch file (for building references in tests)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=True)


# ---------------------------------------------------------------------------- DoRA authors


def write_dora_authors_adapter(
    base_state: Mapping[str, torch.Tensor],
    folder: str | Path,
    *,
    target_modules: Iterable[str],
    magnitude_only: Iterable[str] = (),
    r: int = 4,
    lora_alpha: float = 8,
    seed: int = 0,
    prefix: str = "base_model.model.",
    dtype: torch.dtype = torch.float32,
) -> dict[str, dict[str, torch.Tensor]]:
    """The DoRA authors' LLM format (``peft_type: "DORA"``), written key by key.

    For every base ``<module>.weight`` whose module name ends with a target: ``lora_A.weight``
    (r, in), ``lora_B.weight`` (out, r) and ``weight_m_wdecomp.weight`` (out, 1); modules in
    ``magnitude_only`` (``Wdecompose_target_modules``) get only the magnitude. Returns, per
    base key, the saved pieces (``A``, ``B``, ``m``) for building a reference.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    target_modules, magnitude_only = list(target_modules), list(magnitude_only)
    gen = torch.Generator().manual_seed(seed)
    tensors, pieces = {}, {}
    for key, w in base_state.items():
        if not key.endswith(".weight") or w.dim() != 2:
            continue
        module = key[: -len(".weight")]
        lora = any(module.endswith(t) for t in target_modules)
        magnitude = lora or any(module.endswith(t) for t in magnitude_only)
        if not magnitude:
            continue
        out_f, in_f = w.shape
        norms = torch.linalg.vector_norm(w.to(torch.float64), dim=1, keepdim=True)
        m = (norms * (1 + 0.1 * torch.randn(out_f, 1, generator=gen, dtype=torch.float64))).to(
            dtype
        )
        piece = {"m": m}
        tensors[f"{prefix}{module}.weight_m_wdecomp.weight"] = m
        if lora:
            piece["A"] = (torch.randn(r, in_f, generator=gen) / math.sqrt(in_f)).to(dtype)
            piece["B"] = (0.05 * torch.randn(out_f, r, generator=gen)).to(dtype)
            tensors[f"{prefix}{module}.lora_A.weight"] = piece["A"]
            tensors[f"{prefix}{module}.lora_B.weight"] = piece["B"]
        pieces[key] = piece
    torch.save(tensors, folder / "adapter_model.bin")
    config = {
        "peft_type": "DORA",
        "task_type": "CAUSAL_LM",
        "r": r,
        "lora_alpha": lora_alpha,
        "lora_dropout": 0.05,
        "target_modules": target_modules,
        "Wdecompose_target_modules": magnitude_only or None,
        "dora_simple": True,
        "fan_in_fan_out": False,
        "bias": "none",
        "merge_weights": False,
        "modules_to_save": None,
        "base_model_name_or_path": "tiny-llama",
        "inference_mode": True,
    }
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return pieces


def write_vlbart_state_dict(
    base_state: Mapping[str, torch.Tensor],
    path: str | Path,
    *,
    targets: Iterable[str] = ("q_proj", "v_proj"),
    r: int = 4,
    seed: int = 0,
    prefix: str = "model.",
    extra: Mapping[str, torch.Tensor] | None = None,
    tune_others: float = 0.0,
) -> dict[str, dict[str, torch.Tensor]]:
    """A DoRA authors' VL-BART checkpoint: ``torch.save`` of the whole model's state dict.

    Their ``DoraLinear`` replaces each targeted ``nn.Linear`` inside ``layers`` and registers
    ``weight_m`` (out, 1), ``weight_v`` (out, in; the frozen W0), ``bias``, and bare
    ``lora_A`` (r, in) / ``lora_B`` (out, r) parameters; the merge uses scaling 1.0. Every
    other weight is saved under its usual name (changed by ``tune_others`` relative noise,
    as in their runs that also tune the language model). Returns the saved pieces per base key.
    """
    gen = torch.Generator().manual_seed(seed)
    targets = tuple(targets)
    tensors, pieces = {}, {}
    for key, w in base_state.items():
        module, _, leaf = key.rpartition(".")
        if "layers" in module and module.rsplit(".", 1)[-1] in targets:
            if leaf == "bias":
                tensors[f"{prefix}{module}.bias"] = w.clone()
                continue
            out_f, in_f = w.shape
            norms = torch.linalg.vector_norm(w, dim=1, keepdim=True)
            piece = {
                "m": norms * (1 + 0.1 * torch.randn(out_f, 1, generator=gen)),
                "A": torch.randn(r, in_f, generator=gen) / math.sqrt(in_f),
                "B": 0.05 * torch.randn(out_f, r, generator=gen),
                "V": w.clone(),
            }
            tensors[f"{prefix}{module}.weight_m"] = piece["m"]
            tensors[f"{prefix}{module}.weight_v"] = piece["V"]
            tensors[f"{prefix}{module}.lora_A"] = piece["A"]
            tensors[f"{prefix}{module}.lora_B"] = piece["B"]
            pieces[key] = piece
        else:
            value = w.clone()
            if tune_others and value.is_floating_point():
                value = value + tune_others * value.std() * torch.randn(value.shape, generator=gen)
            tensors[f"{prefix}{key}"] = value
    tensors.update(extra or {})
    torch.save(tensors, path)
    return pieces


# ---------------------------------------------------------------------------- reference math


def as_f64(tensor) -> np.ndarray:
    if isinstance(tensor, torch.Tensor):
        return tensor.detach().to(torch.float64).cpu().numpy()
    return np.asarray(tensor, dtype=np.float64)


def numpy_merge(w0, a=None, b=None, scale: float = 1.0, magnitude=None, transposed=False):
    """The merged weight by the papers' formulas, in numpy float64, in W0's stored layout.

    LoRA ``W0 + s·B@A``; DoRA ``m · V/‖V‖_row`` with ``V = W0 + s·B@A`` (one norm per output
    feature). ``transposed``: W0 is stored (in, out) as GPT-2 Conv1D.
    """
    w = as_f64(w0)
    w = w.T if transposed else w
    v = w + scale * (as_f64(b) @ as_f64(a)) if b is not None else w.copy()
    if magnitude is not None:
        v = as_f64(magnitude).reshape(-1, 1) * v / np.linalg.norm(v, axis=1, keepdims=True)
    return v.T if transposed else v


def reference_delta(w0, wt, axis: str = "out", transposed: bool = False) -> tuple[float, float]:
    """(ΔM, ΔD) of ``wt`` against ``w0`` by explicit norms; ΔD as mean 0.5·‖â − b̂‖².

    Vectors are rows of the (out, in) matrix for ``axis="out"``, columns for ``"in"``.
    ``1 − cos(a, b) = 0.5·‖a/‖a‖ − b/‖b‖‖²`` has no cancellation; longdouble sums.
    """
    a, b = as_f64(w0), as_f64(wt)
    if transposed:
        a, b = a.T, b.T
    if axis == "in":
        a, b = a.T, b.T
    norm_a = np.linalg.norm(a, axis=1)
    norm_b = np.linalg.norm(b, axis=1)
    delta_m = float(np.mean(np.abs(norm_b - norm_a)))
    a_hat = a.astype(np.longdouble) / norm_a.astype(np.longdouble)[:, None]
    b_hat = b.astype(np.longdouble) / norm_b.astype(np.longdouble)[:, None]
    delta_d = float(np.mean(0.5 * np.sum((a_hat - b_hat) ** 2, axis=1)))
    return delta_m, delta_d


def assert_close(actual: float, expected: float, rtol: float = 1e-9, atol: float = 0.0, what=""):
    assert math.isfinite(actual), f"{what}: got {actual}"
    assert abs(actual - expected) <= atol + rtol * abs(expected), (
        f"{what}: got {actual!r}, expected {expected!r} "
        f"(relative error {abs(actual - expected) / max(abs(expected), 1e-300):.3g})"
    )


def check_table(table, expected: Mapping, rtol: float = 1e-9, atol: float = 0.0) -> int:
    """Every ``expected[(run, step, parameter)] = (ΔM, ΔD)`` is in ``table`` and matches.

    ``run`` or ``step`` may be ``None`` to match any. Returns the number of rows checked;
    fails if a row is missing or duplicated.
    """
    checked = 0
    for (run, step, parameter), (delta_m, delta_d) in expected.items():
        rows = table[table["parameter"] == parameter]
        if run is not None:
            rows = rows[rows["run"] == run]
        if step is not None:
            rows = rows[rows["step"] == step]
        assert len(rows) == 1, f"{len(rows)} rows for {(run, step, parameter)}"
        row = rows.iloc[0]
        assert_close(row["delta_m"], delta_m, rtol, atol, f"ΔM {run} {step} {parameter}")
        assert_close(row["delta_d"], delta_d, rtol, atol, f"ΔD {run} {step} {parameter}")
        checked += 1
    return checked


# --------------------------------------------------------------- synthetic deltas tables


def synthetic_deltas(
    spec=(("FT", -0.62), ("LoRA", 0.83), ("DoRA", -0.31)),
    steps=(100, 200, 300),
    layers=12,
    modules=("q_proj",),
    stacks=("",),
    seed=0,
    spread=0.5,
    n_vectors=64,
):
    """A ``compare``-shaped table whose ΔM–ΔD correlation per run is ``rho`` in expectation.

    ``spec`` is ``(method, rho)`` per run; ΔM and ΔD are standard normals scaled by
    ``spread`` around 2e-3 and 2e-4, so they stay positive like real ones.
    """
    import math

    import pandas as pd

    rng = np.random.default_rng(seed)
    rows = []
    for method, rho in spec:
        for module in modules:
            for stack in stacks:
                for step in steps:
                    for layer in range(layers):
                        d, e = rng.normal(size=2)
                        m = rho * d + math.sqrt(1 - rho**2) * e
                        prefix = f"{stack}." if stack else ""
                        rows.append(
                            {
                                "method": method,
                                "run": f"{method.lower()}-run",
                                "step": step,
                                "layer": layer,
                                "module": module,
                                "parameter": f"{prefix}layers.{layer}.{module}.weight",
                                "stack": stack,
                                "axis": "out",
                                "delta_m": 1e-3 * (2 + spread * m),
                                "delta_d": 1e-4 * (2 + spread * d),
                                "n_vectors": n_vectors,
                                "zero_norm_vectors": 0,
                                "checkpoint": f"/ckpt/{method}/{step}",
                            }
                        )
    frame = pd.DataFrame(rows)
    frame["step"] = frame["step"].astype("Int64")
    frame["layer"] = frame["layer"].astype("Int64")
    return frame
