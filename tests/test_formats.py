"""Loaders (issue 2): every checkpoint format users hold gives the right ΔM and ΔD.

Each test builds real checkpoints of one kind from tiny models (transformers configs, the
real ``peft`` library, the DoRA authors' key layouts) and checks every number ``compare``
returns against an independent float64 numpy computation (``builders.reference_delta``),
on non-square matrices (LLaMA with grouped-query attention: q_proj (48, 32), v_proj
(12, 32); GPT-2 c_attn stored (32, 96)) so that a wrong axis cannot pass.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from builders import (
    check_table,
    edit_json,
    finetuned,
    llama_config,
    make_peft_adapter,
    numpy_merge,
    read_tensors,
    reference_delta,
    save_model,
    tiny_model,
    write_dora_authors_adapter,
    write_vlbart_state_dict,
    write_weights,
)

import wdanalysis
from wdanalysis import COLUMNS, compare
from wdanalysis.loaders.runs import aligner_for, open_base, open_checkpoint

pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning:peft"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
]

QV = re.compile(r"\.(q_proj|v_proj)\.weight$")


def run_compare(base, runs, **kwargs) -> pd.DataFrame:
    return compare(base, runs, progress=False, **kwargs)


def qv_keys(state) -> list[str]:
    return [k for k in state if QV.search(k)]


# ---------------------------------------------------------------------------- fixtures


@dataclass
class Base:
    model: torch.nn.Module
    state: dict
    folder: Path


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Base:
    """LlamaForCausalLM (GQA, non-square q/v) saved as model.safetensors + config.json."""
    model = tiny_model("llama", seed=0)
    folder = tmp_path_factory.mktemp("llama") / "base"
    state = save_model(model, folder)
    return Base(model, state, folder)


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory) -> Base:
    model = tiny_model("gpt2", seed=1)
    folder = tmp_path_factory.mktemp("gpt2") / "base"
    return Base(model, save_model(model, folder), folder)


# ======================================================================= 1. full-model files


def _write_layout(layout: str, folder: Path, state: dict, config) -> Path:
    """Save ``state`` in one of the layouts users hold; returns the path to give wdanalysis."""
    if layout == "file.safetensors":
        return write_weights(state, folder, "safetensors", filename="weights.safetensors")
    if layout == "file.bin":
        return write_weights(state, folder, "bin", filename="weights.bin")
    fmt, shards = {
        "model.safetensors": ("safetensors", 1),
        "sharded-safetensors": ("safetensors", 3),
        "pytorch_model.bin": ("bin", 1),
        "sharded-bin": ("bin", 3),
    }[layout]
    save_model(state, folder, config=config, fmt=fmt, shards=shards)
    return folder


LAYOUTS = [
    "file.safetensors",
    "file.bin",
    "model.safetensors",
    "sharded-safetensors",
    "pytorch_model.bin",
    "sharded-bin",
]
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_full_model_layouts_and_dtypes(tmp_path, llama, layout, dtype):
    base_state = {k: v.to(DTYPES[dtype]) for k, v in llama.state.items()}
    ft_state = finetuned(base_state, seed=7, scale=0.01)
    base = _write_layout(layout, tmp_path / "base", base_state, llama.model.config)
    ft = _write_layout(layout, tmp_path / "ft", ft_state, llama.model.config)

    table = run_compare(base, ft)

    keys = qv_keys(base_state)
    assert sorted(table["parameter"]) == sorted(keys)
    assert (table["method"] == "FT").all()
    # the reference uses the stored low-precision values, upcast to float64 first
    expected = {(None, None, k): reference_delta(base_state[k], ft_state[k]) for k in keys}
    assert check_table(table, expected, rtol=1e-9) == 2 * 2
    by_module = table.groupby("module")["n_vectors"].unique()
    assert list(by_module["q_proj"]) == [48] and list(by_module["v_proj"]) == [12]


def test_half_precision_norms_would_be_wrong(llama):
    """Guard for the test above: computing in bf16 visibly changes ΔD, so upcasting matters."""
    key = "model.layers.0.self_attn.q_proj.weight"
    w0 = llama.state[key].to(torch.bfloat16)
    wt = finetuned({key: w0}, seed=7, scale=0.01)[key]
    exact = reference_delta(w0, wt)[1]
    cos = torch.nn.functional.cosine_similarity(w0, wt, dim=1)  # all in bf16
    naive = float((1 - cos).float().mean())
    assert abs(naive - exact) > 0.05 * exact


# ======================================================================= 2. training runs


def test_trainer_run_steps_sorted_numerically(tmp_path, llama):
    run = tmp_path / "run"
    states = {}
    for step, seed in ((500, 1), (1000, 2), (50, 3)):  # created out of order on purpose
        states[step] = finetuned(llama.state, seed=seed, scale=0.002 * seed)
        save_model(states[step], run / f"checkpoint-{step}", config=llama.model.config)
    (run / "runs").mkdir()  # TensorBoard logs beside the checkpoints

    table = run_compare(llama.folder, run)

    assert list(table["step"].unique()) == [50, 500, 1000]
    assert (table["run"] == "run").all()
    expected = {
        ("run", step, k): reference_delta(llama.state[k], states[step][k])
        for step in states
        for k in qv_keys(llama.state)
    }
    assert check_table(table, expected) == 12
    assert table["checkpoint"].str.endswith("checkpoint-50").sum() == 4


def test_single_checkpoint_step_from_name_or_trainer_state(tmp_path, llama):
    named = tmp_path / "checkpoint-750"
    save_model(finetuned(llama.state, seed=1), named, config=llama.model.config)
    final = tmp_path / "final"
    save_model(finetuned(llama.state, seed=2), final, config=llama.model.config)
    (final / "trainer_state.json").write_text(json.dumps({"global_step": 1234, "epoch": 3.0}))
    plain = tmp_path / "plain"
    save_model(finetuned(llama.state, seed=3), plain, config=llama.model.config)

    table = run_compare(llama.folder, [named, final, plain])

    steps = table.groupby("run", sort=False)["step"].first()
    assert steps[tmp_path.name] == 750  # a single checkpoint is named after its run folder
    assert steps["final"] == 1234
    assert pd.isna(steps["plain"])


# ======================================================================= 3. PEFT adapters


@dataclass
class PeftCase:
    model: str  # tiny_model kind the adapter is trained on
    lora: dict
    scale: object  # module name -> the scaling s the merge must use (worked out by hand)
    base: str | None = None  # "bare": save the inner model (no task head / prefix) as base
    adapter_on: str | None = None  # "bare": train the adapter on the inner model
    safe: bool = True
    null_targets: bool = False
    transposed: bool = False
    stacks: tuple = ("",)


QV_TARGETS = ["q_proj", "v_proj"]
PEFT_CASES = {
    "llama-lora-safetensors": PeftCase(
        "llama", dict(r=4, lora_alpha=12, target_modules=QV_TARGETS), lambda m: 12 / 4
    ),
    "llama-dora-bin": PeftCase(
        "llama",
        dict(r=4, lora_alpha=6, target_modules=QV_TARGETS, use_dora=True),
        lambda m: 6 / 4,
        safe=False,
    ),
    "llama-dora-rslora-patterns": PeftCase(
        "llama",
        dict(
            r=4,
            lora_alpha=8,
            target_modules=QV_TARGETS,
            use_dora=True,
            use_rslora=True,
            rank_pattern={"model.layers.1.self_attn.v_proj": 2},
            alpha_pattern={"q_proj": 3},
        ),
        lambda m: 3 / 2 if "q_proj" in m else (8 / math.sqrt(2) if "layers.1." in m else 4.0),
    ),
    "llama-lora-null-targets": PeftCase(
        "llama",
        dict(r=2, lora_alpha=5, target_modules=QV_TARGETS),
        lambda m: 5 / 2,
        null_targets=True,
    ),
    "llama-dora-on-bare-model": PeftCase(  # adapter keys lack "model."; base has it
        "llama",
        dict(r=4, lora_alpha=8, target_modules=QV_TARGETS, use_dora=True),
        lambda m: 2.0,
        adapter_on="bare",
    ),
    "llama-lora-bare-base": PeftCase(  # adapter keys have "model."; base lacks it
        "llama",
        dict(r=4, lora_alpha=8, target_modules=QV_TARGETS),
        lambda m: 2.0,
        base="bare",
    ),
    "gpt2-lora-conv1d": PeftCase(
        "gpt2",
        dict(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True),
        lambda m: 2.0,
        transposed=True,
    ),
    "gpt2-dora-conv1d": PeftCase(
        "gpt2",
        dict(r=4, lora_alpha=2, target_modules=["c_attn"], fan_in_fan_out=True, use_dora=True),
        lambda m: 0.5,
        transposed=True,
    ),
    "bert-cls-lora-bare-base": PeftCase(
        "bert-cls",
        dict(r=2, lora_alpha=5, target_modules=["query", "value"], task_type="SEQ_CLS"),
        lambda m: 2.5,
        base="bare",
        stacks=("",),  # BERT: "encoder." only, no encoder/decoder distinction
    ),
    "bart-dora": PeftCase(
        "bart",
        dict(r=4, lora_alpha=16, target_modules=QV_TARGETS, use_dora=True),
        lambda m: 4.0,
        stacks=("decoder", "encoder"),  # cross-attention: stack decoder, attention cross
    ),
}


def _parts(table, key: str) -> list[str]:
    return sorted(table.loc[table["parameter"] == key, "module"])


def _part(w0, wt, key: str, part: str, transposed: bool):
    """The part's slices of both weights: GPT-2's fused ``c_attn`` holds q | k | v, thirds of
    its output features (tests/test_fused_projections.py checks that against the model)."""
    if not key.endswith(".c_attn.weight"):
        return w0, wt
    third = (w0.shape[1] if transposed else w0.shape[0]) // 3
    rows = slice("qkv".index(part[0]) * third, ("qkv".index(part[0]) + 1) * third)
    return (w0[:, rows], wt[:, rows]) if transposed else (w0[rows], wt[rows])


def check_parts(table, expected) -> int:
    """``expected[(module, parameter)]``: each row of the table checked once."""
    return sum(
        check_table(table[table["module"] == part], {(None, None, key): value})
        for (part, key), value in expected.items()
    )


def _bare(model):
    """The inner model without task head or prefix: LlamaModel of a CausalLM, BertModel."""
    return model.model if hasattr(model, "lm_head") else model.bert


def _unique_suffix_key(keys, base_key: str) -> str:
    """The key of ``keys`` that is ``base_key`` or ends with ``.base_key``."""
    found = [k for k in keys if k == base_key or k.endswith("." + base_key)]
    if not found:  # base key longer than the model's (base has a prefix the model lacks)
        found = [k for k in keys if base_key.endswith("." + k)]
    assert len(found) == 1, (base_key, found)
    return found[0]


def _adapter_pieces(tensors: dict, module: str) -> dict:
    """lora_A, lora_B, magnitude of one module from a saved PEFT adapter (by suffix)."""
    out = {}
    for key, value in tensors.items():
        stem = key.removeprefix("base_model.model.")
        for suffix, role in (
            (".lora_A.weight", "A"),
            (".lora_B.weight", "B"),
            (".lora_magnitude_vector", "m"),
        ):
            if stem.endswith(suffix) and stem[: -len(suffix)] == module:
                out[role] = value
    return out


@pytest.mark.parametrize("name", PEFT_CASES)
def test_peft_adapter_matches_peft_merge(tmp_path, name):
    case = PEFT_CASES[name]
    model = tiny_model(case.model, seed=11)
    base_model = _bare(model) if case.base == "bare" else model
    base_state = save_model(base_model, tmp_path / "base", config=model.config)
    trained = _bare(model) if case.adapter_on == "bare" else model
    adapter = tmp_path / "adapter"
    merged = make_peft_adapter(trained, adapter, seed=5, safe_serialization=case.safe, **case.lora)
    weight_file = adapter / ("adapter_model.safetensors" if case.safe else "adapter_model.bin")
    assert weight_file.is_file()
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["use_dora"] == bool(case.lora.get("use_dora"))
    if case.null_targets:
        edit_json(adapter / "adapter_config.json", target_modules=None)

    table = run_compare(tmp_path / "base", adapter)

    method = "DoRA" if case.lora.get("use_dora") else "LoRA"
    assert (table["method"] == method).all()
    assert sorted(table["stack"].unique()) == sorted(case.stacks)
    tensors = read_tensors(weight_file)
    prefixed = [k for k in tensors if k.startswith("base_model.model.model.")]
    assert bool(prefixed) == (case.model == "llama" and case.adapter_on != "bare")
    if case.lora.get("task_type") == "SEQ_CLS":  # the task head saved whole, not in the base
        assert any(".classifier." in k for k in tensors)
    model_state = trained.state_dict()
    expected = {}
    for key in table["parameter"].unique():
        merged_key = _unique_suffix_key(merged, key)
        w0 = base_state[key]
        assert torch.equal(w0, model_state[merged_key])  # same W0 under both names
        wt = merged[merged_key]
        # (a) PEFT's own float64 merge agrees with the paper's formula done in numpy
        module = merged_key.removesuffix(".weight")
        pieces = _adapter_pieces(tensors, module)
        assert {"A", "B"} <= set(pieces), (module, list(tensors)[:4])
        assert ("m" in pieces) == (method == "DoRA")
        independent = numpy_merge(
            w0, pieces["A"], pieces["B"], case.scale(module), pieces.get("m"), case.transposed
        )
        np.testing.assert_allclose(wt.numpy(), independent, rtol=1e-11, atol=1e-13)
        for part in _parts(table, key):
            expected[(part, key)] = reference_delta(
                *_part(w0, wt, key, part, case.transposed), transposed=case.transposed
            )
            assert expected[(part, key)][1] > 1e-6  # the adapter really changed it
    assert check_parts(table, expected) == len(table) > 0

    # the other axis: one vector per input feature, same effective weights
    by_input = run_compare(tmp_path / "base", adapter, axis="in")
    expected_in = {}
    for key in by_input["parameter"].unique():
        wt = merged[_unique_suffix_key(merged, key)]
        for part in _parts(by_input, key):
            w0_wt = _part(base_state[key], wt, key, part, case.transposed)
            expected_in[(part, key)] = reference_delta(*w0_wt, "in", case.transposed)
    assert check_parts(by_input, expected_in) == len(table)

    # (b) the effective weights themselves, element by element, against PEFT's merge
    base = open_base(tmp_path / "base")
    ckpt = open_checkpoint(adapter)
    transposed = (lambda key: True) if case.transposed else base.transposed
    shapes = {k: base.store.shape(k) for k in base.store.keys()}
    bound = ckpt.adapter.bind(aligner_for(base), shapes, transposed)
    adapted = {k: m for k, m in bound.items() if m.lora_b or m.magnitude}
    assert len(adapted) == table["parameter"].nunique()
    for key, module in adapted.items():
        ours = ckpt.adapter.effective_weight(module, base.store.get(key), transposed(key))
        peft_merged = merged[_unique_suffix_key(merged, key)]
        torch.testing.assert_close(ours, peft_merged, rtol=1e-12, atol=1e-14)


def test_live_peft_state_dict_with_adapter_name(tmp_path, llama):
    """``torch.save(peft_model.state_dict())`` beside the config: keys keep ``.default.``."""
    saved = tmp_path / "saved"
    live = tmp_path / "live"
    live.mkdir()
    merged = make_peft_adapter(
        llama.model,
        saved,
        r=4,
        lora_alpha=8,
        target_modules=QV_TARGETS,
        use_dora=True,
        live_state_dict=live / "adapter_model.bin",
    )
    (live / "adapter_config.json").write_bytes((saved / "adapter_config.json").read_bytes())
    keys = torch.load(live / "adapter_model.bin", weights_only=True)
    assert any(k.endswith(".q_proj.lora_A.default.weight") for k in keys)

    table = run_compare(llama.folder, [saved, live])

    assert (table["method"] == "DoRA").all()
    expected = {
        (run, None, k): reference_delta(llama.state[k], merged[k])
        for run in ("saved", "live")
        for k in qv_keys(llama.state)
    }
    assert check_table(table, expected) == 8


def test_encoder_decoder_stacks_kept_apart(tmp_path):
    """BART: encoder self-attention, decoder self-attention and cross-attention are separate."""
    model = tiny_model("bart", seed=2)
    state = save_model(model, tmp_path / "base")
    ft_state = finetuned(state, seed=4)
    save_model(ft_state, tmp_path / "ft", config=model.config)

    table = run_compare(tmp_path / "base", tmp_path / "ft")

    counts = table.groupby(["stack", "attention"]).size().to_dict()
    assert counts == {("encoder", "self"): 4, ("decoder", "self"): 4, ("decoder", "cross"): 4}
    cross = table[table["attention"] == "cross"]
    assert cross["parameter"].str.contains(r"decoder\.layers\.\d\.encoder_attn\.").all()
    decoder = table[(table["stack"] == "decoder") & (table["attention"] == "self")]
    assert decoder["parameter"].str.contains(r"decoder\.layers\.\d\.self_attn\.").all()
    expected = {(None, None, k): reference_delta(state[k], ft_state[k]) for k in table["parameter"]}
    assert check_table(table, expected) == 12


# ======================================================================= 4. DoRA authors' LLM


def test_dora_authors_llm_format(tmp_path, llama):
    pieces = write_dora_authors_adapter(
        llama.state,
        tmp_path / "dora",
        target_modules=["q_proj"],
        magnitude_only=["v_proj"],
        r=4,
        lora_alpha=12,
        seed=9,
    )
    table = run_compare(llama.folder, tmp_path / "dora")

    assert (table["method"] == "DoRA").all()
    expected = {}
    for key, piece in pieces.items():
        w0 = llama.state[key]
        # their merge: W' = m / ||W0 + s·B@A||_row · (W0 + s·B@A), s = lora_alpha / r;
        # magnitude-only modules: W' = m / ||W0||_row · W0
        wt = numpy_merge(w0, piece.get("A"), piece.get("B"), 12 / 4, piece["m"])
        expected[(None, None, key)] = reference_delta(w0, wt)
    assert len(expected) == 4
    # atol: magnitude-only modules have a true ΔD of 0, computed as ~1e-18 from rounding
    assert check_table(table, expected, atol=1e-15) == 4
    # magnitude-only modules change magnitude, never direction
    v_rows = table[table["module"] == "v_proj"]
    assert (v_rows["delta_d"].abs() < 1e-12).all() and (v_rows["delta_m"] > 1e-3).all()


# ======================================================================= 5. DoRA authors' VL-BART


def test_dora_vlbart_state_dict(tmp_path):
    """Full ``torch.save`` state dict: weight_m (out,1), weight_v, bare lora_A/lora_B, s=1."""
    model = tiny_model("bart", seed=3)
    state = save_model(model, tmp_path / "base")
    extra = {  # VL-BART's own modules, and a token embedding resized for its extra tokens
        "model.encoder.visual_embedding.feat_embedding.0.weight": torch.randn(32, 16),
        "model.shared.weight": torch.randn(72, 32),
        "model.encoder.embed_tokens.weight": torch.randn(72, 32),
        "lm_head.weight": torch.randn(72, 32),
    }
    ckpt = tmp_path / "VLBart_multitask" / "Epoch05.pth"
    ckpt.parent.mkdir()
    pieces = write_vlbart_state_dict(state, ckpt, extra=extra, tune_others=0.01, seed=4)

    table = run_compare(tmp_path / "base", ckpt)

    assert (table["method"] == "DoRA").all()
    assert (table["step"] == 5).all()  # from the file name Epoch05.pth
    kinds = table.groupby(["stack", "attention"]).size().to_dict()
    assert kinds == {("encoder", "self"): 4, ("decoder", "self"): 4, ("decoder", "cross"): 4}
    expected = {}
    for key, p in pieces.items():
        if QV.search(key):
            wt = numpy_merge(state[key], p["A"], p["B"], 1.0, p["m"])
            expected[(None, None, key)] = reference_delta(state[key], wt)
    assert check_table(table, expected) == 12


def test_dora_vlbart_epoch_files_form_a_run(tmp_path, llama):
    """Their trainer saves EpochNN.pth (plus BEST/LAST) into one folder: one run, by epoch."""
    run = tmp_path / "snap"
    run.mkdir()
    pieces = {}
    for epoch in (10, 2, 1):
        pieces[epoch] = write_vlbart_state_dict(
            llama.state, run / f"Epoch{epoch:02d}.pth", prefix="", seed=epoch
        )
    write_vlbart_state_dict(llama.state, run / "BEST.pth", prefix="", seed=99)

    table = run_compare(llama.folder, run)

    assert list(table["step"].unique()) == [1, 2, 10]
    expected = {
        ("snap", epoch, k): reference_delta(
            llama.state[k], numpy_merge(llama.state[k], p["A"], p["B"], 1.0, p["m"])
        )
        for epoch, saved in pieces.items()
        for k, p in saved.items()
    }
    assert check_table(table, expected) == 12


def test_dora_vlbart_layout_on_non_square_weights(tmp_path, llama):
    """The VL-BART reader's axis, checked where it shows: GQA shapes (48,32) and (12,32)."""
    path = tmp_path / "vl.pth"
    pieces = write_vlbart_state_dict(llama.state, path, prefix="", seed=8)
    table = run_compare(llama.folder, path)
    expected = {
        (None, None, k): reference_delta(
            llama.state[k], numpy_merge(llama.state[k], p["A"], p["B"], 1.0, p["m"])
        )
        for k, p in pieces.items()
    }
    assert check_table(table, expected) == 4


def test_dora_vlbart_uses_its_saved_weight_v(tmp_path, llama):
    """The model computes m·(V + B@A)/‖V + B@A‖ with its own saved V (``weight_v``)."""
    path = tmp_path / "vl.pth"
    pieces = write_vlbart_state_dict(llama.state, path, prefix="", seed=8)
    tensors = torch.load(path, weights_only=True)
    gen = torch.Generator().manual_seed(0)
    for key in pieces:
        v_key = key.removesuffix(".weight") + ".weight_v"
        tensors[v_key] = tensors[v_key] + 0.05 * torch.randn(tensors[v_key].shape, generator=gen)
        pieces[key]["V"] = tensors[v_key]
    torch.save(tensors, path)

    table = run_compare(llama.folder, path)

    expected = {
        (None, None, k): reference_delta(
            llama.state[k], numpy_merge(p["V"], p["A"], p["B"], 1.0, p["m"])
        )
        for k, p in pieces.items()
    }
    assert check_table(table, expected) == 4


def test_dora_negative_magnitude_flips_the_row(tmp_path, llama):
    """m·V/‖V‖ with m < 0 points the row the other way: ΔD must see it."""
    from safetensors.torch import load_file, save_file

    adapter = tmp_path / "dora"
    make_peft_adapter(
        llama.model, adapter, r=4, lora_alpha=8, target_modules=QV_TARGETS, use_dora=True
    )
    tensors = load_file(adapter / "adapter_model.safetensors")
    for key in tensors:
        if key.endswith("lora_magnitude_vector"):
            tensors[key][:3] = -tensors[key][:3]
    save_file(tensors, adapter / "adapter_model.safetensors")

    table = run_compare(llama.folder, adapter)

    expected = {}
    for key in qv_keys(llama.state):
        module = "base_model.model." + key.removesuffix(".weight")
        wt = numpy_merge(
            llama.state[key],
            tensors[module + ".lora_A.weight"],
            tensors[module + ".lora_B.weight"],
            2.0,
            tensors[module + ".lora_magnitude_vector"],
        )
        expected[(None, None, key)] = reference_delta(llama.state[key], wt)
        assert expected[(None, None, key)][1] > 0.1  # three rows turned around
    assert check_table(table, expected) == 4


# ======================================================================= 6. table semantics


def test_method_inference_and_labels(tmp_path, llama):
    ft = tmp_path / "ft"
    save_model(finetuned(llama.state, seed=1), ft, config=llama.model.config)
    make_peft_adapter(llama.model, tmp_path / "lora", r=4, lora_alpha=8, target_modules=QV_TARGETS)
    make_peft_adapter(
        llama.model, tmp_path / "dora", r=4, lora_alpha=8, target_modules=QV_TARGETS, use_dora=True
    )
    runs = [ft, tmp_path / "lora", tmp_path / "dora"]

    inferred = run_compare(llama.folder, runs)
    assert inferred.groupby("run", sort=False)["method"].first().to_dict() == {
        "ft": "FT",
        "lora": "LoRA",
        "dora": "DoRA",
    }
    assert list(inferred["run"].unique()) == ["ft", "lora", "dora"]  # order given

    assert (inferred["label"] == inferred["method"]).all()  # no labels: the label is the method
    labelled = run_compare(llama.folder, runs, labels=["full", "low-rank", "decomposed"])
    assert labelled.groupby("run", sort=False)["label"].first().to_list() == [
        "full",
        "low-rank",
        "decomposed",
    ]  # labels set the label column; the method stays the inferred one
    assert labelled.groupby("run", sort=False)["method"].first().to_list() == ["FT", "LoRA", "DoRA"]
    as_mapping = run_compare(llama.folder, {"A": ft, "B": tmp_path / "dora"})
    assert as_mapping.groupby("run", sort=False)["label"].first().to_list() == ["A", "B"]
    assert as_mapping.groupby("run", sort=False)["method"].first().to_list() == ["FT", "DoRA"]
    # labels change names only, never numbers
    np.testing.assert_array_equal(inferred["delta_d"], labelled["delta_d"])


def test_layer_index_and_module_columns(tmp_path, llama):
    save_model(finetuned(llama.state, seed=1), tmp_path / "ft", config=llama.model.config)
    table = run_compare(llama.folder, tmp_path / "ft")
    for _, row in table.iterrows():
        match = re.fullmatch(r"model\.layers\.(\d+)\.self_attn\.(\w+)\.weight", row["parameter"])
        assert match, row["parameter"]
        assert row["layer"] == int(match.group(1)) and row["module"] == match.group(2)
        assert row["stack"] == "" and row["axis"] == "out"
    assert list(table.columns) == COLUMNS


def test_axis_in(tmp_path, llama):
    ft_state = finetuned(llama.state, seed=2)
    save_model(ft_state, tmp_path / "ft", config=llama.model.config)
    merged = make_peft_adapter(
        llama.model, tmp_path / "dora", r=4, lora_alpha=8, target_modules=QV_TARGETS, use_dora=True
    )
    table = run_compare(llama.folder, [tmp_path / "ft", tmp_path / "dora"], axis="in")

    assert (table["axis"] == "in").all()
    assert (table["n_vectors"] == 32).all()  # one per input feature, for q (48,32) and v (12,32)
    expected = {}
    for key in qv_keys(llama.state):
        expected[("ft", None, key)] = reference_delta(llama.state[key], ft_state[key], axis="in")
        expected[("dora", None, key)] = reference_delta(llama.state[key], merged[key], axis="in")
        out = reference_delta(llama.state[key], merged[key], axis="out")
        assert abs(out[0] - expected[("dora", None, key)][0]) > 1e-3 * out[0]  # axes differ
    assert check_table(table, expected) == 8


def test_gpt2_full_checkpoint_uses_conv1d_layout(tmp_path, gpt2):
    ft_state = finetuned(gpt2.state, seed=3)
    save_model(ft_state, tmp_path / "ft", config=gpt2.model.config)
    table = run_compare(gpt2.folder, tmp_path / "ft")

    assert sorted(table["module"].unique()) == ["q_proj", "v_proj"]  # parts of c_attn
    assert (table["n_vectors"] == 32).all()  # c_attn is stored (32, 96): 96 output features
    expected = {}
    for key in table["parameter"].unique():
        for part in ("q_proj", "v_proj"):
            w0, wt = _part(gpt2.state[key], ft_state[key], key, part, True)
            expected[(part, key)] = reference_delta(w0, wt, transposed=True)
            wrong = reference_delta(w0, wt, transposed=False)
            assert abs(wrong[1] - expected[(part, key)][1]) > 1e-3 * wrong[1]
    assert check_parts(table, expected) == 4


# ======================================================================= 7. tiny updates


def test_tiny_true_delta_d(tmp_path, llama):
    """fp32 FT with updates so small that ΔD ≈ 1e-8: still right to 1e-3 relative."""
    gen = torch.Generator().manual_seed(0)
    ft_state = {}
    for key, w in llama.state.items():
        if w.dim() == 2:
            noise = torch.randn(w.shape, generator=gen, dtype=torch.float64)
            ft_state[key] = (w.double() + 1.4e-4 * w.double().abs().mean() * noise).float()
        else:
            ft_state[key] = w.clone()
    save_model(ft_state, tmp_path / "ft", config=llama.model.config)

    table = run_compare(llama.folder, tmp_path / "ft")

    expected = {}
    for key in qv_keys(llama.state):
        expected[(None, None, key)] = reference_delta(llama.state[key], ft_state[key])
        assert 1e-10 < expected[(None, None, key)][1] < 1e-7
    assert check_table(table, expected, rtol=1e-3) == 4


# ======================================================================= 8 + 9. the CLI


def _main(argv) -> int:
    """``wdanalysis.cli.main``, or its handler over compare/inspect alone while a sibling
    sub-command (train, demo) is not importable yet."""
    from wdanalysis.cli import entry_point as cli

    try:
        parser = cli.build_parser()
    except ImportError:  # pragma: no cover - only while sibling CLIs are being written
        from wdanalysis.cli import analysis_commands as commands

        parser = argparse.ArgumentParser(prog="wdanalysis")
        commands.register(parser.add_subparsers(dest="command", required=True))
    return cli.run_handler(parser.parse_args([str(a) for a in argv]))


def cli(capsys, *argv) -> tuple[int, str, str]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        code = _main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def kinds(tmp_path_factory, llama) -> dict[str, Path]:
    """One checkpoint of every kind, over the ``llama`` base."""
    root = tmp_path_factory.mktemp("kinds")
    paths = {}
    half = {k: v.to(torch.bfloat16) for k, v in llama.state.items()}
    save_model(half, root / "full-bf16", config=llama.model.config)
    paths["full-bf16"] = root / "full-bf16"
    save_model(llama.state, root / "sharded", config=llama.model.config, shards=3)
    paths["sharded"] = root / "sharded"
    save_model(llama.state, root / "bin", config=llama.model.config, fmt="bin", shards=2)
    paths["bin"] = root / "bin"
    for step in (500, 1000, 50):
        save_model(finetuned(llama.state, step), root / "run" / f"checkpoint-{step}")
    paths["run"] = root / "run"
    make_peft_adapter(llama.model, root / "lora", r=4, lora_alpha=12, target_modules=QV_TARGETS)
    paths["lora"] = root / "lora"
    make_peft_adapter(
        llama.model,
        root / "dora",
        r=4,
        lora_alpha=8,
        target_modules=QV_TARGETS,
        use_dora=True,
        use_rslora=True,
        rank_pattern={"v_proj": 2},
        safe_serialization=False,
    )
    paths["dora"] = root / "dora"
    write_dora_authors_adapter(
        llama.state, root / "authors", target_modules=["q_proj"], magnitude_only=["v_proj"]
    )
    paths["authors"] = root / "authors"
    write_vlbart_state_dict(llama.state, root / "vl.pth", prefix="")
    paths["vlbart"] = root / "vl.pth"
    return paths


INSPECT_EXPECT = {
    "full-bf16": ["safetensors", "full model", "bfloat16", "q_proj, v_proj", "Linear (out, in)"],
    "sharded": ["sharded safetensors (3 shards)", "full model", "float32"],
    "bin": ["sharded .bin (2 shards)", "full model", "float32"],
    "run": ["run", "50, 500, 1000", "FT"],
    "lora": ["PEFT LoRA adapter", "LoRA", "q_proj, v_proj", "alpha/r = 12/4 = 3", "4"],
    "dora": ["PEFT DoRA adapter", "torch (.bin)", "alpha/sqrt(r)", "rank_pattern", "2, 4"],
    "authors": ["DoRA authors' LLM adapter", "DoRA", "magnitude only modules  2"],
    "vlbart": ["VL-BART", "DoRA", "1.0"],
}


@pytest.mark.parametrize("kind", INSPECT_EXPECT)
def test_inspect_each_kind(capsys, kinds, kind):
    code, out, err = cli(capsys, "inspect", kinds[kind])
    assert code == 0, err
    lines = {line.split("  ")[0].strip(): line for line in out.splitlines()}
    for label in ("format", "kind", "dtypes", "steps"):
        assert label in lines, out
    for phrase in INSPECT_EXPECT[kind]:
        assert phrase in out, f"{phrase!r} not in:\n{out}"
    if kind in {"lora", "dora", "authors", "vlbart"}:
        assert "scaling" in lines and "module names" in lines, out
    else:
        assert "default modules" in lines, out

    code, out, _ = cli(capsys, "inspect", kinds[kind], "--json")
    info = json.loads(out)
    assert code == 0 and info["path"] == str(kinds[kind])
    if kind == "run":
        assert info["steps"] == [50, 500, 1000] and info["kind"] == "run"


def test_python_inspect_matches_cli(kinds):
    info = wdanalysis.inspect(kinds["dora"])
    assert info["method"] == "DoRA" and info["ranks"] == [2, 4]
    assert info["modules_adapted"] == 4 and info["module_names"] == ["q_proj", "v_proj"]


def test_cli_compare_writes_deltas_csv(capsys, tmp_path, llama, kinds):
    out = tmp_path / "out"
    code, stdout, err = cli(
        capsys,
        "compare",
        llama.folder,
        kinds["run"],
        kinds["lora"],
        kinds["authors"],
        "--out",
        out,
        "--no-figures",
        "--quiet",
    )
    assert code == 0, err
    table = pd.read_csv(out / "deltas.csv")
    assert list(table.columns) == COLUMNS
    assert table.groupby("run", sort=False)["method"].first().to_list() == ["FT", "LoRA", "DoRA"]
    assert len(table) == (3 + 1 + 1) * 4
    api = run_compare(llama.folder, [kinds["run"], kinds["lora"], kinds["authors"]])
    np.testing.assert_allclose(table["delta_d"], api["delta_d"], rtol=1e-12)
    assert "deltas.csv" in stdout


def _error_line(code: int, err: str, path) -> str:
    assert code == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("wdanalysis: error: ")]
    assert len(errors) == 1, err
    assert str(path) in errors[0], errors[0]
    return errors[0]


def _compare_error(capsys, tmp_path, base, run) -> tuple[str, int, Path]:
    out = tmp_path / "out"
    code, _, err = cli(capsys, "compare", base, run, "--out", out, "--no-figures", "--quiet")
    return err, code, out


def test_cli_error_missing_path(capsys, tmp_path, llama):
    err, code, out = _compare_error(capsys, tmp_path, llama.folder, tmp_path / "nope")
    line = _error_line(code, err, tmp_path / "nope")
    assert "no such file" in line
    assert not (out / "deltas.csv").exists()


def test_cli_error_truncated_safetensors(capsys, tmp_path, llama):
    ft = tmp_path / "ft"
    save_model(finetuned(llama.state, seed=1), ft)
    data = (ft / "model.safetensors").read_bytes()
    (ft / "model.safetensors").write_bytes(data[: len(data) // 2])
    err, code, _ = _compare_error(capsys, tmp_path, llama.folder, ft)
    assert "truncated" in _error_line(code, err, ft / "model.safetensors")


def test_cli_error_adapter_shapes_do_not_fit(capsys, tmp_path, llama):
    from transformers import LlamaForCausalLM

    other = LlamaForCausalLM(llama_config(head_dim=16))  # same names, other q/v sizes
    make_peft_adapter(other, tmp_path / "lora", r=2, lora_alpha=4, target_modules=QV_TARGETS)
    err, code, _ = _compare_error(capsys, tmp_path, llama.folder, tmp_path / "lora")
    line = _error_line(code, err, tmp_path / "lora")
    assert "does not fit" in line and "q_proj" in line


def test_cli_error_adapter_keys_match_nothing(capsys, tmp_path, llama):
    bert = tiny_model("bert", seed=0)
    make_peft_adapter(bert, tmp_path / "lora", r=2, lora_alpha=4, target_modules=["query"])
    err, code, _ = _compare_error(capsys, tmp_path, llama.folder, tmp_path / "lora")
    line = _error_line(code, err, tmp_path / "lora")
    assert "match no base weight" in line and "query" in line


def test_cli_error_unknown_format(capsys, tmp_path, llama):
    onnx = tmp_path / "model.onnx"
    onnx.write_bytes(b"\x08\x01")
    err, code, _ = _compare_error(capsys, tmp_path, llama.folder, onnx)
    assert "unknown weight file type" in _error_line(code, err, onnx)

    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "README.txt").write_text("not a checkpoint")
    err, code, _ = _compare_error(capsys, tmp_path, llama.folder, folder)
    assert "no recognisable checkpoint" in _error_line(code, err, folder)


def test_cli_error_lora_weights_without_config(capsys, tmp_path, llama):
    make_peft_adapter(llama.model, tmp_path / "lora", r=2, lora_alpha=4, target_modules=["q_proj"])
    loose = tmp_path / "loose" / "adapter_model.safetensors"
    loose.parent.mkdir()
    loose.write_bytes((tmp_path / "lora" / "adapter_model.safetensors").read_bytes())
    err, code, _ = _compare_error(capsys, tmp_path, llama.folder, loose)
    assert "adapter_config.json" in _error_line(code, err, loose)
