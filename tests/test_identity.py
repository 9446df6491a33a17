"""Every matrix has its own identity: component, stack, attention kind, layer and module.

Tiny models built by transformers and diffusers themselves: T5 and Whisper (encoder self-,
decoder self- and cross-attention), an SDXL-shaped pipeline whose two CLIP text encoders
have the same module names and sizes (so only the component tells them apart, as diffusers
and kohya ``lora_te1_``/``lora_te2_`` files name them), and a UNet with ``attn1``/``attn2``.
Each row is checked against an independent float64 reference, and no two different
matrices may share an identity in the table or in a fit; ``pool=True`` / ``--pool`` gives
the paper's one cloud per run and module.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from builders import check_table, finetuned, numpy_merge, reference_delta, save_model
from safetensors.torch import save_file
from sd_builders import tiny_clip, tiny_unet

import wdanalysis
from wdanalysis.cli import main
from wdanalysis.plots.figures import plot_figure2
from wdanalysis.stats import fit_groups
from wdanalysis.table.schema import COLUMNS, read_table

transformers = pytest.importorskip("transformers")

IDENTITY = ["run", "step", "component", "stack", "attention", "module", "layer"]


def compare(base, runs, **kwargs) -> pd.DataFrame:
    return wdanalysis.compare(base, runs, progress=False, **kwargs)


def assert_identities_unique(table: pd.DataFrame) -> None:
    """No two different matrices (parameters) share an identity, in the table or a fit."""
    table = table.fillna({"component": "", "stack": "", "attention": ""})
    assert not table.duplicated(IDENTITY).any(), table[table.duplicated(IDENTITY, keep=False)]
    fits = wdanalysis.fit_lines(table, per_step=False)
    keys = fit_groups(table)
    for _, fit in fits.iterrows():
        rows = table
        for key in keys:
            rows = rows[rows[key].astype(str) == str(fit[key])]
        assert len(rows) == fit["n"]
        # within one fit, one point per (step, layer): never two kinds stacked on one layer
        assert not rows.duplicated(["step", "layer"]).any()


def t5_model():
    config = transformers.T5Config(
        vocab_size=40, d_model=24, d_kv=8, d_ff=20, num_layers=2, num_decoder_layers=2,
        num_heads=2,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.T5ForConditionalGeneration(config)


def whisper_model():
    config = transformers.WhisperConfig(
        vocab_size=40, d_model=16, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=20, decoder_ffn_dim=20, num_mel_bins=8,
        max_source_positions=8, max_target_positions=8, pad_token_id=0, bos_token_id=1,
        eos_token_id=2, decoder_start_token_id=1,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.WhisperForConditionalGeneration(config)


# T5: (block, layer.1.EncDecAttention) cross; Whisper: decoder.layers.N.encoder_attn cross.
KINDS = {
    "t5": (t5_model, ["q", "v"], r"decoder\.block\.\d\.layer\.1\.EncDecAttention\."),
    "whisper": (whisper_model, ["q_proj", "v_proj"], r"decoder\.layers\.\d\.encoder_attn\."),
}


@pytest.mark.parametrize("name", KINDS)
def test_encoder_decoder_self_and_cross_attention_apart(tmp_path, name):
    build, modules, cross_path = KINDS[name]
    model = build()
    state = save_model(model, tmp_path / "base")
    ft = finetuned(state, seed=4)
    save_model(ft, tmp_path / "ft", config=model.config)

    table = compare(tmp_path / "base", tmp_path / "ft", modules=modules)

    kinds = table.groupby(["stack", "attention"]).size().to_dict()
    per_kind = 2 * len(modules)  # two layers
    expected_kinds = {("encoder", "self"), ("decoder", "self"), ("decoder", "cross")}
    assert kinds == dict.fromkeys(expected_kinds, per_kind)
    cross = table[table["attention"] == "cross"]
    assert cross["parameter"].str.contains(cross_path).all()
    assert (table["component"] == "").all()
    expected = {(None, None, k): reference_delta(state[k], ft[k]) for k in table["parameter"]}
    assert check_table(table, expected) == 6 * len(modules)
    assert_identities_unique(table)

    fits = wdanalysis.fit_lines(table)
    pooled = fits[fits["scope"] == "pooled"]
    assert len(pooled) == 3 * len(modules)
    assert {"stack", "attention"} <= set(fits.columns)
    for _, fit in pooled.iterrows():  # each fit over its own kind's points only
        rows = table[
            (table["module"] == fit["module"])
            & (table["stack"] == fit["stack"])
            & (table["attention"] == fit["attention"])
        ]
        slope = np.polyfit(rows["delta_d"].to_numpy(), rows["delta_m"].to_numpy(), 1)[0]
        np.testing.assert_allclose(fit["slope"], slope, rtol=1e-9)
    one_cloud = wdanalysis.fit_lines(table, pool=True)
    assert len(one_cloud[one_cloud["scope"] == "pooled"]) == len(modules)
    assert "attention" not in one_cloud.columns

    figure = plot_figure2(table, module=modules[0])
    titles = sorted(ax.get_title() for ax in figure.axes if ax.get_title())
    assert len(titles) == 3 and any("decoder cross" in t for t in titles)
    pooled_figure = plot_figure2(table, module=modules[0], pool=True)
    assert len([ax for ax in pooled_figure.axes if ax.get_title()]) == 1


def test_plot_pool_option_and_old_tables(tmp_path, capsys):
    """``wdanalysis plot --pool`` fits one cloud; a table without the new columns reads."""
    model = t5_model()
    state = save_model(model, tmp_path / "base")
    save_model(finetuned(state, seed=5), tmp_path / "ft", config=model.config)
    table = compare(tmp_path / "base", tmp_path / "ft", modules=["q"])
    table.to_csv(tmp_path / "deltas.csv", index=False)

    assert main(["plot", str(tmp_path / "deltas.csv"), "--out", str(tmp_path / "kinds")]) == 0
    kinds = pd.read_csv(tmp_path / "kinds" / "fits.csv")
    assert len(kinds[kinds["scope"] == "pooled"]) == 3
    out = str(tmp_path / "one")
    assert main(["plot", str(tmp_path / "deltas.csv"), "--out", out, "--pool"]) == 0
    one = pd.read_csv(tmp_path / "one" / "fits.csv")
    assert len(one[one["scope"] == "pooled"]) == 1
    capsys.readouterr()

    old = table.drop(columns=["component", "attention", "rows_added"])  # schema version 1
    old.to_csv(tmp_path / "old.csv", index=False)
    again = read_table(tmp_path / "old.csv")
    assert list(again.columns[: len(old.columns)]) == list(old.columns)
    assert set(COLUMNS) <= set(again.columns)
    assert (again["attention"] == "").all() and (again["rows_added"] == 0).all()
    # an old table still separates its stacks (no attention column: encoder/decoder only)
    assert len(wdanalysis.fit_lines(again, per_step=False)) == 2


# ---------------------------------------------------------------------------- SDXL


def _pipeline(root, models) -> None:
    for name, model in models.items():
        model.save_pretrained(root / name)
    index = {
        "_class_name": "StableDiffusionXLPipeline",
        "unet": ["diffusers", "UNet2DConditionModel"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
    }
    (root / "model_index.json").write_text(json.dumps(index))


def _perturbed(model, seed: int):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() >= 2:
                param.mul_(1 + 0.05 * torch.randn(param.shape, generator=gen))
    return model


def test_sdxl_text_encoders_and_unet_attention_kinds(tmp_path):
    """Both CLIP encoders have ``text_model.encoder.layers.0.self_attn.q_proj`` (12, 12);
    the UNet's ``attn1`` (self) and ``attn2`` (cross) both have ``to_q``/``to_k``."""
    pytest.importorskip("diffusers")
    models = {"unet": tiny_unet(0), "text_encoder": tiny_clip(1), "text_encoder_2": tiny_clip(2)}
    _pipeline(tmp_path / "base", models)
    states = {name: {k: v.clone() for k, v in m.state_dict().items()} for name, m in models.items()}
    tuned = {name: _perturbed(m, i + 10) for i, (name, m) in enumerate(models.items())}
    _pipeline(tmp_path / "ft", tuned)

    table = compare(tmp_path / "base", tmp_path / "ft", modules=["q_proj", "to_q", "to_k"])

    assert set(table["component"]) == {"unet", "text_encoder", "text_encoder_2"}
    encoders = table[table["component"].str.startswith("text_encoder")]
    assert (encoders["attention"] == "").all()  # CLIP has one kind of attention
    assert len(encoders) == 2 and encoders["layer"].tolist() == [0, 0]
    unet = table[table["component"] == "unet"]
    assert set(unet["attention"]) == {"self", "cross"}
    assert unet.loc[unet["attention"] == "cross", "parameter"].str.contains(r"\.attn2\.").all()
    assert unet.loc[unet["attention"] == "self", "parameter"].str.contains(r"\.attn1\.").all()
    # down_blocks.0, mid_block, up_blocks.1 (two attentions): four blocks in network order
    to_q = unet[(unet["module"] == "to_q") & (unet["attention"] == "self")]
    assert to_q.sort_values("layer")["parameter"].str.split(".").str[1].tolist() == [
        "down_blocks", "mid_block", "up_blocks", "up_blocks",
    ]  # fmt: skip
    assert sorted(to_q["layer"]) == [0, 1, 2, 3]
    expected = {}
    for key in table["parameter"]:
        component, inner = key.split(".", 1)
        expected[(None, None, key)] = reference_delta(
            states[component][inner], tuned[component].state_dict()[inner]
        )
    assert check_table(table, expected) == len(table) == 2 + 4 * 4
    assert_identities_unique(table)
    fits = wdanalysis.fit_lines(table, per_step=False)
    assert "component" in fits.columns and "attention" in fits.columns


def test_kohya_te1_te2_bind_to_their_own_encoder(tmp_path):
    """A kohya LoRA on both SDXL encoders (``lora_te1_``/``lora_te2_``, the same module
    names): each row lands on its own component and equals W0 + (alpha/r)·up@down."""
    pytest.importorskip("diffusers")
    models = {"unet": tiny_unet(0), "text_encoder": tiny_clip(1), "text_encoder_2": tiny_clip(2)}
    _pipeline(tmp_path / "base", models)
    gen = torch.Generator().manual_seed(3)
    tensors, expected = {}, {}
    encoders = (("lora_te1_", "text_encoder", 2.0), ("lora_te2_", "text_encoder_2", 6.0))
    for prefix, component, alpha in encoders:
        for proj in ("q_proj", "v_proj"):
            inner = f"encoder.layers.0.self_attn.{proj}.weight"  # transformers 5 drops text_model.
            name = f"{prefix}text_model_encoder_layers_0_self_attn_{proj}"  # as sd-scripts names
            down, up = torch.randn(2, 12, generator=gen), torch.randn(12, 2, generator=gen)
            tensors |= {f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up}
            tensors[f"{name}.alpha"] = torch.tensor(alpha)
            w0 = models[component].state_dict()[inner]
            wt = numpy_merge(w0, down, up, alpha / 2)
            expected[(None, None, f"{component}.{inner}")] = reference_delta(w0, wt)
    save_file(tensors, str(tmp_path / "lora.safetensors"))

    table = compare(tmp_path / "base", tmp_path / "lora.safetensors", modules=["q_proj", "v_proj"])

    assert check_table(table, expected) == len(table) == 4
    assert sorted(set(table["component"])) == ["text_encoder", "text_encoder_2"]
    assert_identities_unique(table)
    assert len(wdanalysis.fit_lines(table, per_step=False)) == 4  # 2 components × q, v


def test_single_file_trees_and_plain_models_by_name():
    """SDXL single-file trees name the component; a plain model (GPT-2's ``transformer.h``,
    LLaMA) has none, and no attention kind where it has one kind only."""
    from wdanalysis.weights.identity import name_weights

    unet = "model.diffusion_model."
    keys = [
        f"{unet}input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight",
        f"{unet}input_blocks.4.1.transformer_blocks.1.attn1.to_q.weight",
        f"{unet}input_blocks.4.1.transformer_blocks.0.attn2.to_q.weight",
        f"{unet}middle_block.1.transformer_blocks.0.attn1.to_q.weight",
        f"{unet}output_blocks.2.1.transformer_blocks.0.attn1.to_q.weight",
        "conditioner.embedders.0.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight",
        "conditioner.embedders.1.model.text_model.encoder.layers.0.self_attn.q_proj.weight",
    ]
    names = name_weights(keys)
    got = [(n.component, n.attention, n.layer, n.module) for n in names.values()]
    assert got == [
        ("unet", "self", 0, "to_q"),
        ("unet", "self", 1, "to_q"),
        ("unet", "cross", 0, "to_q"),
        ("unet", "self", 2, "to_q"),
        ("unet", "self", 3, "to_q"),
        ("text_encoder", "", 0, "q_proj"),
        ("text_encoder_2", "", 0, "q_proj"),
    ]
    plain = name_weights(
        ["transformer.h.1.attn.c_attn.weight", "model.layers.2.self_attn.q_proj.weight"]
    )
    assert [(n.component, n.stack, n.attention, n.layer) for n in plain.values()] == [
        ("", "", "", 1),
        ("", "", "", 2),
    ]


# ---------------------------------------------------------------------------- one stack only


def test_encoder_only_and_decoder_only_models_have_an_empty_stack(tmp_path):
    """BERT (``encoder.layer.N``) and a decoder-only model's ``decoder.layers.N`` name no
    encoder/decoder distinction: their rows say ``stack=""`` (as the identity columns are
    documented), while T5, which has both stacks, keeps ``encoder``/``decoder``."""
    from builders import tiny_model

    from wdanalysis.weights.identity import describe_weight, name_weights

    bert = tiny_model("bert")
    state = save_model(bert, tmp_path / "base")
    save_model(finetuned(state, seed=3), tmp_path / "ft", config=bert.config)
    table = compare(tmp_path / "base", tmp_path / "ft", modules=["query", "value"])
    assert len(table) > 0 and table["parameter"].str.contains(r"(?:^|\.)encoder\.").all()
    assert (table["stack"] == "").all() and (table["attention"] == "").all()

    opt_like = ["model.decoder.layers.0.self_attn.q_proj.weight", "model.decoder.embed.weight"]
    assert {n.stack for n in name_weights(opt_like).values()} == {""}
    t5_names = name_weights(t5_model().state_dict())
    stacks = {n.stack for k, n in t5_names.items() if k.endswith(".q.weight")}
    assert stacks == {"encoder", "decoder"}
    # a VAE in a pipeline has both stacks inside one component: they stay apart
    vae = ["encoder.down.0.conv.weight", "decoder.up.0.conv.weight"]
    assert [n.stack for n in name_weights(vae).values()] == ["encoder", "decoder"]
    # one key on its own has no model to compare with: its names say the stack
    assert describe_weight("encoder.layer.0.attention.self.query.weight").stack == "encoder"
