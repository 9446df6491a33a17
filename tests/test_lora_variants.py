"""LoRA variants written by PEFT itself (``peft_type: LORA``): read exactly or refused.

PiSSA, OLoRA, KaSA and BD-LoRA adapters are saved by PEFT on tiny non-square GQA models
(Llama and Qwen2, ``num_key_value_heads < num_attention_heads``) and compared with the true
change of the ORIGINAL base: ``W_merged − W0``, ``W_merged`` from PEFT's own
``PeftModel.from_pretrained(original base).merge_and_unload()`` in float64 (PEFT re-runs the
init on ``W0`` when it loads). Every refusal's one-line message is asserted, and every field
of PEFT's ``LoraConfig`` must be classified, so a new PEFT release cannot slip one past.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import re
import typing
import warnings

import pytest
import torch
from builders import check_table, reference_delta
from safetensors.torch import load_file, save_file

import wdanalysis
from wdanalysis.errors import WDAnalysisError
from wdanalysis.loaders import lora_fields

peft = pytest.importorskip("peft", reason="peft is not installed")
transformers = pytest.importorskip("transformers", reason="transformers is not installed")

from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from peft.tuners.lora.config import BdLoraConfig, KasaConfig, VeloraConfig  # noqa: E402
from peft.tuners.lora.layer import LoraLayer  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

TARGETS = ["q_proj", "k_proj", "down_proj"]  # (32, 32), (16, 32) GQA, (32, 48)


def _tiny(kind: str):
    shape = dict(
        vocab_size=32,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    )
    if kind == "llama":
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(**shape))
    return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**shape))


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    folders = {}
    for kind in ("llama", "qwen2"):
        torch.manual_seed(0)
        folders[kind] = tmp_path_factory.mktemp(kind)
        _tiny(kind).save_pretrained(folders[kind])
    return folders


def _perturb(peft_model, seed: int) -> None:
    """A random step on every trainable tensor (the factors, KaSA's lora_diag)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in peft_model.named_parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=gen).to(p.dtype))


def _write(base, folder, seed=1, **options):
    model = AutoModelForCausalLM.from_pretrained(base)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, **options)
    peft_model = get_peft_model(model, config)
    _perturb(peft_model, seed)
    peft_model.save_pretrained(folder)
    return folder


def _peft_merge(base, adapter) -> dict[str, torch.Tensor]:
    """PEFT's own reading: the adapter loaded on the original base, merged in float64."""
    model = AutoModelForCausalLM.from_pretrained(base)
    merged = PeftModel.from_pretrained(model, adapter).double().merge_and_unload()
    return merged.state_dict()


def _w0(base) -> dict[str, torch.Tensor]:
    return AutoModelForCausalLM.from_pretrained(base).double().state_dict()


def _expected(w0, w1, table):
    keys = [k for k in table["parameter"].unique()]
    return {(None, None, k): reference_delta(w0[k], w1[k]) for k in keys}


VARIANTS = {  # name → (model, LoraConfig options, method column)
    "pissa": ("llama", dict(init_lora_weights="pissa"), "PiSSA"),
    "olora": ("qwen2", dict(init_lora_weights="olora"), "OLoRA"),
    "pissa-dora": ("qwen2", dict(init_lora_weights="pissa", use_dora=True), "PiSSA-DoRA"),
    "kasa": ("qwen2", dict(kasa_config=KasaConfig()), "KaSA"),
    "bdlora": (
        "llama",
        dict(
            use_bdlora=BdLoraConfig(
                target_modules_bd_a=["down_proj"],
                target_modules_bd_b=["q_proj"],
                nblocks=2,
                match_strict=False,  # k_proj stays a plain LoRA
            )
        ),
        "LoRA",
    ),
    "velora": ("llama", dict(velora_config=VeloraConfig()), "LoRA"),  # extra tensor unmerged
    "bias": ("qwen2", dict(bias="all"), "LoRA"),  # trained biases saved beside: not weights
}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_variant_equals_peft_merge_on_original_base(tmp_path, bases, name):
    kind, options, method = VARIANTS[name]
    adapter = _write(bases[kind], tmp_path / name, **options)
    table = wdanalysis.compare(bases[kind], adapter, modules=TARGETS)
    assert len(table) == 6 and set(table["method"]) == {method}
    w0, w1 = _w0(bases[kind]), _peft_merge(bases[kind], adapter)
    # float32 factorisations on both sides; KaSA's base is PEFT's float32 reconstruction
    rtol = 1e-5 if name == "kasa" else 1e-7
    assert check_table(table, _expected(w0, w1, table), rtol=rtol) == 6
    if name in ("pissa", "olora", "kasa"):  # read as plain LoRA s·B@A it would be far off
        key = table["parameter"].iloc[0]
        plain = wdanalysis.compare(bases[kind], _as_plain(adapter, tmp_path), modules=TARGETS)
        row = plain[plain["parameter"] == key]["delta_m"].iloc[0]
        assert abs(row / reference_delta(w0[key], w1[key])[0] - 1) > 0.2


def _as_plain(adapter, tmp_path):
    """The same tensors with the base-changing part of the config removed."""
    folder = tmp_path / "plain"
    folder.mkdir()
    tensors = load_file(adapter / "adapter_model.safetensors")
    save_file(
        {k: v for k, v in tensors.items() if "lora_diag" not in k},
        folder / "adapter_model.safetensors",
    )
    raw = json.loads((adapter / "adapter_config.json").read_text())
    raw.update(init_lora_weights=True, kasa_config=None)
    (folder / "adapter_config.json").write_text(json.dumps(raw))
    return folder


def test_pissa_run_starts_at_zero_and_conversion_is_read_exactly(tmp_path, bases):
    """An untrained PiSSA adapter changes nothing; PEFT's conversion recipe
    (``path_initial_model_for_weight_conversion``: a rank-2r plain LoRA) of a randomised
    ``pissa_niter_2`` adapter — refused itself — equals the true change of the trained model."""
    base = bases["llama"]
    model = AutoModelForCausalLM.from_pretrained(base)
    w0 = {k: v.double() for k, v in model.state_dict().items()}
    peft_model = get_peft_model(
        model,
        LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights="pissa_niter_2"),
    )
    peft_model.save_pretrained(tmp_path / "init")
    _perturb(peft_model, 3)
    peft_model.save_pretrained(tmp_path / "niter")
    peft_model.save_pretrained(
        tmp_path / "converted", path_initial_model_for_weight_conversion=str(tmp_path / "init")
    )
    truth = peft_model.double().merge_and_unload().state_dict()
    with pytest.raises(
        WDAnalysisError, match="pissa_niter_2.*random.*path_initial_model_for_weight_conversion"
    ):
        wdanalysis.compare(base, tmp_path / "niter")
    converted = json.loads((tmp_path / "converted" / "adapter_config.json").read_text())
    assert converted["r"] == 8 and converted["init_lora_weights"] is True
    table = wdanalysis.compare(base, tmp_path / "converted", modules=TARGETS)
    assert check_table(table, _expected(w0, truth, table), rtol=1e-5) == 6

    run = tmp_path / "run"  # a deterministic PiSSA run: step 0 (untrained) and step 1
    for step, seed in ((0, None), (1, 4)):
        model = AutoModelForCausalLM.from_pretrained(base)
        peft_model = get_peft_model(
            model, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights="pissa")
        )
        if seed is not None:
            _perturb(peft_model, seed)
        peft_model.save_pretrained(run / f"checkpoint-{step}")
    table = wdanalysis.compare(base, run, modules=TARGETS)
    first = table[table["step"] == 0]
    assert len(first) == 6 and (first["delta_m"] < 1e-9).all() and (first["delta_d"] < 1e-12).all()
    assert (table[table["step"] == 1]["delta_m"] > 1e-4).all()


@pytest.fixture(scope="module")
def plain(bases, tmp_path_factory):
    """A plain PEFT LoRA adapter, edited below into adapters wdanalysis must refuse."""
    return _write(bases["llama"], tmp_path_factory.mktemp("plain") / "lora")


def _edited(plain, tmp_path, config=None, tensors=None):
    folder = tmp_path / "edited"
    folder.mkdir()
    raw = json.loads((plain / "adapter_config.json").read_text())
    raw.update(config or {})
    (folder / "adapter_config.json").write_text(json.dumps(raw))
    state = load_file(plain / "adapter_model.safetensors")
    state.update(tensors or {})
    save_file(state, folder / "adapter_model.safetensors")
    return folder


Q = "base_model.model.model.layers.0.self_attn.q_proj."
REFUSALS = {  # name → (config changes, extra tensors, message pattern)
    "corda": ({"init_lora_weights": "corda"}, None, "CorDA.*covariances.*path_initial_model"),
    "loftq": ({"init_lora_weights": "loftq"}, None, "LoftQ.*quantization.*path_initial_model"),
    "lora_ga": ({"init_lora_weights": "lora_ga"}, None, "LoRA-GA.*gradients.*path_initial"),
    "unknown init": ({"init_lora_weights": "zeros"}, None, "unknown init_lora_weights='zeros'"),
    "unknown field": ({"lora_twist": 0.5}, None, "unknown adapter_config.json field 'lora_twist'"),
    "qalora": ({"use_qalora": True}, None, "use_qalora is set: QALoRA pools"),
    "arrow": ({"arrow_config": {"top_k": 2}}, None, "arrow_config is set: Arrow routes"),
    "experts": (
        {"target_parameters": ["experts.gate_up_proj"]},
        None,
        "target_parameters 'experts.gate_up_proj'.*merge_and_unload",
    ),
    "olora conv1d": (
        {"init_lora_weights": "olora", "fan_in_fan_out": True},
        None,
        "olora.*fan_in_fan_out",
    ),
    "diag without kasa": ({}, {Q + "lora_diag": torch.ones(4)}, "lora_diag.*no kasa_config"),
    "unknown tensor": (
        {},
        {Q + "lora_C.weight": torch.ones(4, 4)},
        "unknown adapter tensor.*lora_C",
    ),
    "bdlora nblocks": (
        {"use_bdlora": {"nblocks": 0}},
        None,
        "use_bdlora.nblocks must be a positive",
    ),
}


@pytest.mark.parametrize("name", list(REFUSALS))
def test_refused_in_one_line(tmp_path, bases, plain, name):
    config, tensors, pattern = REFUSALS[name]
    folder = _edited(plain, tmp_path, config, tensors)
    with pytest.raises(WDAnalysisError, match=pattern) as error:
        wdanalysis.compare(bases["llama"], folder)
    assert "\n" not in str(error.value) and str(folder) in str(error.value)


@pytest.mark.parametrize(
    "options, pattern",
    [
        (
            dict(layer_replication=[[0, 2], [1, 2]]),
            "layer_replication is set: .*more layers than the base",
        ),
    ],
)
def test_peft_written_refusals(tmp_path, bases, options, pattern):
    """Written by PEFT: refused for the right reason (not 'a model of another size')."""
    adapter = _write(bases["llama"], tmp_path / "a", **options)
    with pytest.raises(WDAnalysisError, match=pattern):
        wdanalysis.compare(bases["llama"], adapter)


def test_left_out_module_warned_and_alora_noted(tmp_path, bases, plain):
    score = {"base_model.model.score.weight": torch.ones(2, 32)}  # a head the base lacks
    folder = _edited(plain, tmp_path, {"alora_invocation_tokens": [3, 4]}, score)
    with pytest.warns(UserWarning, match="1 saved module.*'score'.*modules_to_save"):
        table = wdanalysis.compare(bases["llama"], folder, modules=["q_proj"])
    assert len(table) == 2
    info = wdanalysis.inspect(folder)
    assert any("aLoRA" in note for note in info["notes"])


def test_every_lora_config_field_is_classified():
    """A new LoraConfig field (or init value) fails here until lora_fields classifies it."""
    tables = (lora_fields.HANDLED, lora_fields.HARMLESS, lora_fields.REFUSED)
    for f in dataclasses.fields(LoraConfig):
        assert sum(f.name in t for t in tables) == 1, f"LoraConfig.{f.name} is not classified"
        if f.metadata.get("is_lora_variant"):  # a variant flag must be read or refused
            assert (
                f.name in lora_fields.HANDLED
                or f.name in lora_fields.REFUSED
                or f.name
                in (
                    "velora_config",
                    "monteclora_config",
                )
            ), f.name
    # every init PEFT's LoraLayer.update_layer dispatches on, and every value LoraConfig types
    source = inspect.getsource(LoraLayer.update_layer)
    found = set(re.findall(r'init_lora_weights(?:\.lower\(\))? == "(\w+)"', source))
    found |= set(re.findall(r'init_lora_weights\.startswith\("(\w+)"\)', source))
    hints = typing.get_type_hints(LoraConfig)["init_lora_weights"]
    literal = [a for a in typing.get_args(hints) if a is not bool][0]
    assert {"pissa", "olora", "corda", "loftq"} <= found
    for value in found | set(typing.get_args(literal)):
        if value.lower() in lora_fields.PLAIN_INITS | lora_fields.EXACT_INITS:
            continue
        with pytest.raises(WDAnalysisError, match="path_initial_model_for_weight_conversion"):
            lora_fields.base_init({"init_lora_weights": value}, "adapter_config.json")
    # PEFT's defaults ask for nothing: a default LoraConfig passes untouched
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        defaults = LoraConfig().to_dict()
    assert lora_fields.check_lora_fields(json.loads(json.dumps(defaults, default=str)), "x") == []


@pytest.mark.parametrize(
    "options", [dict(init_lora_weights="olora"), dict(kasa_config=KasaConfig())]
)
def test_live_tracking_refuses_a_changed_base(tmp_path, bases, options):
    """In memory, PEFT's base is already the residual/truncated one: refused, not misread."""
    from wdanalysis.tracking.tracker import Tracker

    model = AutoModelForCausalLM.from_pretrained(bases["qwen2"])
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, **options))
    tracker = Tracker(bases["qwen2"], tmp_path / "live.csv", every=1, modules=TARGETS)
    with pytest.raises(WDAnalysisError, match="live tracking of .*(olora|KaSA).* not supported"):
        tracker.begin(model)
