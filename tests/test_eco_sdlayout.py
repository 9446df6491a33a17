"""Stable Diffusion UNet LoRAs against a base in the other layout (diffusers ↔ original).

A tiny diffusers ``UNet2DConditionModel`` with two ResNets per down block (as SD1.x, SD2.x
and SDXL), three levels — with attention, without, with — and SDXL's ``add_embedding``, so
both upsampler places (``output_blocks.N.1.conv`` and ``.2.conv``) occur. Its original
(LDM) layout is made here by a rename written independently of
:mod:`wdanalysis.loaders.formats.sdlayout` (a list of prefix pairs, as diffusers' conversion script
builds it), and that rename is itself checked against diffusers' own single-file loader
(``convert_ldm_unet_checkpoint``). LoRAs are written by LyCORIS (kohya names) and by
diffusers (``save_lora_weights``); the references are their own merges in float64 on the
diffusers model, compared by name through the rename.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from builders import check_table, reference_delta
from sd_builders import save_unet_lora, tiny_clip

import wdanalysis
from wdanalysis.cli import main as _main
from wdanalysis.loaders.formats import sdlayout

pytest.importorskip("lycoris", reason="lycoris-lora is not installed")
diffusers = pytest.importorskip("diffusers", reason="diffusers is not installed")
pytest.importorskip("peft", reason="peft is not installed")

from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint  # noqa: E402
from lycoris.kohya import create_network  # noqa: E402
from peft import LoraConfig  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

UNET_PREFIX, TE_PREFIX = "model.diffusion_model.", "cond_stage_model.transformer."
UNET_CONFIG = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(16, 24, 32),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=12,
    attention_head_dim=4,
    norm_num_groups=8,
    addition_embed_type="text_time",
    addition_time_embed_dim=4,
    projection_class_embeddings_input_dim=20,
)


def _unet(seed=0):
    torch.manual_seed(seed)
    return diffusers.UNet2DConditionModel(**UNET_CONFIG).double().eval()


def _te(seed=0):
    return tiny_clip(seed).double().eval()


# ------------------------------------------------ the test's own rename (prefix pairs)


def _prefix_pairs(diffusers_keys) -> list[tuple[str, str]]:
    """(diffusers prefix, original prefix), enumerated block by block."""
    pairs = [
        ("conv_in.", "input_blocks.0.0."),
        ("time_embedding.linear_1.", "time_embed.0."),
        ("time_embedding.linear_2.", "time_embed.2."),
        ("add_embedding.linear_1.", "label_emb.0.0."),
        ("add_embedding.linear_2.", "label_emb.0.2."),
        ("conv_norm_out.", "out.0."),
        ("conv_out.", "out.2."),
        ("mid_block.attentions.0.", "middle_block.1."),
        ("mid_block.resnets.0.", "middle_block.0."),
        ("mid_block.resnets.1.", "middle_block.2."),
    ]
    levels = len(UNET_CONFIG["block_out_channels"])
    for lv in range(levels):
        first_in, first_out = 1 + 3 * lv, 3 * lv
        for k in range(2):
            pairs.append((f"down_blocks.{lv}.resnets.{k}.", f"input_blocks.{first_in + k}.0."))
            pairs.append((f"down_blocks.{lv}.attentions.{k}.", f"input_blocks.{first_in + k}.1."))
        pairs.append((f"down_blocks.{lv}.downsamplers.0.conv.", f"input_blocks.{3 * lv + 3}.0.op."))
        for k in range(3):
            pairs.append((f"up_blocks.{lv}.resnets.{k}.", f"output_blocks.{first_out + k}.0."))
            pairs.append((f"up_blocks.{lv}.attentions.{k}.", f"output_blocks.{first_out + k}.1."))
        attention = any(key.startswith(f"up_blocks.{lv}.attentions.") for key in diffusers_keys)
        slot = 2 if attention else 1
        pairs.append((f"up_blocks.{lv}.upsamplers.0.", f"output_blocks.{first_out + 2}.{slot}."))
    return pairs


_RESNET_INSIDE = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}


def _rename(diffusers_keys) -> dict[str, str]:
    """diffusers key → original key, for every key of the UNet."""
    keys = list(diffusers_keys)
    pairs = _prefix_pairs(keys)
    renamed = {}
    for key in keys:
        ((hf, sd),) = [(hf, sd) for hf, sd in pairs if key.startswith(hf)]
        rest = key[len(hf) :]
        if ".resnets." in hf:
            module, _, param = rest.partition(".")
            rest = f"{_RESNET_INSIDE[module]}.{param}"
        renamed[key] = sd + rest
    assert len(set(renamed.values())) == len(renamed)
    return renamed


@pytest.fixture(scope="module")
def layouts():
    state = {k: v.float() for k, v in _unet().state_dict().items()}
    rename = _rename(state)
    original = {rename[k]: v for k, v in state.items()}
    return state, original, rename


def test_the_tests_rename_is_diffusers_own(layouts):
    """diffusers' single-file loader reads the renamed state dict back exactly."""
    state, original, _ = layouts
    checkpoint = {UNET_PREFIX + k: v for k, v in original.items()}
    back = convert_ldm_unet_checkpoint(checkpoint, dict(UNET_CONFIG))
    assert set(back) == set(state)
    assert all(torch.equal(back[k], state[k]) for k in state)
    assert {"output_blocks.2.2.conv.weight", "output_blocks.5.1.conv.weight"} <= set(original)


@pytest.mark.parametrize("sep", [".", "_"])
def test_sdlayout_converts_every_unet_module_both_ways(layouts, sep):
    state, _, rename = layouts
    checked = 0
    for key in state:
        if not key.endswith(".weight"):
            continue
        hf = key[: -len(".weight")].replace(".", sep)
        sd = rename[key][: -len(".weight")].replace(".", sep)
        assert sd in sdlayout.convert(hf, sdlayout.ORIGINAL, sep), key
        assert sdlayout.convert(sd, sdlayout.DIFFUSERS, sep) == [hf], key
        assert sdlayout.layout_of(hf, sep) == sdlayout.DIFFUSERS
        assert sdlayout.layout_of(sd, sep) == sdlayout.ORIGINAL
        checked += 1
    assert checked > 100
    assert sdlayout.convert("transformer_blocks.0.attn1.to_q", sdlayout.ORIGINAL) == []
    assert sdlayout.convert("input_blocks.3.0.in_layers.2", sdlayout.DIFFUSERS) == []


# ------------------------------------------------------------------------ kohya files


def _preset(tmp_path) -> str:
    path = tmp_path / "preset.toml"
    path.write_text(
        "enable_conv = true\n"
        'unet_target_module = ["Transformer2DModel", "ResnetBlock2D", "Downsample2D",'
        ' "Upsample2D"]\n'
        'unet_target_name = ["conv_in$", "conv_out$", "time_embedding.linear_1$",'
        ' "add_embedding.linear_2$"]\n'
        'text_encoder_target_module = ["CLIPAttention", "CLIPMLP"]\n'
    )
    return str(path)


SOME_KOHYA_MODULES = (
    "down_blocks_1_resnets_0_conv_shortcut",
    "up_blocks_0_upsamplers_0_conv",
    "up_blocks_1_upsamplers_0_conv",
    "down_blocks_0_downsamplers_0_conv",
    "mid_block_attentions_0_proj_in",
    "add_embedding_linear_2",
    "conv_in",
)


def _kohya_network(tmp_path, unet, te, seed=1):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        network = create_network(
            1.0, 2, 3.0, None, te, unet, algo="lora", conv_dim=2, conv_alpha=1.0,
            preset=_preset(tmp_path),
        )  # fmt: skip
    network.apply_to(te, unet, apply_text_encoder=te is not None, apply_unet=True)
    network.double()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in network.named_parameters():
            if name.endswith("lora_up.weight"):
                p.copy_(0.1 * torch.randn(p.shape, generator=gen, dtype=torch.float64))
            p.copy_(p.float().double())  # exact in the fp32 file
    return network


def _expected(before: dict, after: dict, rename=None, prefix="") -> dict:
    """(ΔM, ΔD) of every weight the merge changed, under its name in the analysed base."""
    rename = rename or {}
    return {
        (None, None, prefix + rename.get(k, k)): reference_delta(
            before[k].flatten(1), after[k].flatten(1)
        )
        for k in before
        if k.endswith(".weight") and not torch.equal(before[k], after[k])
    }


def _original_single_file(folder, original: dict, te_state: dict | None):
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {UNET_PREFIX + k: v.contiguous() for k, v in original.items()}
    for k, v in (te_state or {}).items():
        tensors[_te_key(k)] = v.float().contiguous()
    save_file(tensors, str(folder / "model.safetensors"))


def _te_key(key: str) -> str:
    """As in SD1.x files (``cond_stage_model.transformer.text_model.encoder.…``), whether
    or not this transformers version saves the ``text_model.`` wrapper."""
    return TE_PREFIX + ("" if key.startswith("text_model.") else "text_model.") + key


def _check(table, expected) -> None:
    assert check_table(table, expected, rtol=1e-9, atol=1e-15) == len(expected)
    others = table[~table["parameter"].isin([k[2] for k in expected])]
    assert (others["delta_m"] == 0).all() and (others["delta_d"] == 0).all()


def test_kohya_diffusers_names_against_an_original_single_file(tmp_path, layouts):
    """sd-scripts' SD1.x/2.x case: ``lora_unet_down_blocks_…`` against
    ``model.diffusion_model.input_blocks.…`` (+ a CLIP text encoder matched by tail)."""
    state, original, rename = layouts
    unet, te = _unet(), _te()
    te_state = {k: v.float() for k, v in te.state_dict().items()}
    _original_single_file(tmp_path / "sd", original, te_state)
    network = _kohya_network(tmp_path, unet, te)
    lora = tmp_path / "lora.safetensors"
    network.save_weights(str(lora), torch.float32, None)
    with safe_open(str(lora), "pt") as handle:
        keys = set(handle.keys())
    for module in SOME_KOHYA_MODULES:
        assert f"lora_unet_{module}.lora_down.weight" in keys, module
    unet_w0 = {k: v.double() for k, v in state.items()}
    te_w0 = {k: v.double() for k, v in te_state.items()}
    network.merge_to(None, None, load_file(str(lora)), None, None)  # LyCORIS' own merge
    expected = {
        **_expected(unet_w0, unet.state_dict(), rename, UNET_PREFIX),
        **_expected(te_w0, te.state_dict(), {k: _te_key(k) for k in te_w0}),
    }
    assert len(expected) > 60 and any("output_blocks.2.2.conv" in k[2] for k in expected)
    assert sum(k[2].startswith(TE_PREFIX + "text_model.encoder.") for k in expected) == 6

    with pytest.warns(UserWarning, match="converted from the diffusers to the original"):
        table = wdanalysis.compare(tmp_path / "sd", lora, modules=[".*"])
    _check(table, expected)
    info = wdanalysis.inspect(lora)
    assert "UNet names in the diffusers layout" in info["notes"]


def test_kohya_original_names_against_a_diffusers_unet(tmp_path, layouts):
    """sd-scripts' SDXL case: ``lora_unet_input_blocks_4_1_…`` against
    ``unet/diffusion_pytorch_model.safetensors``."""
    state, _, rename = layouts
    (tmp_path / "unet").mkdir()
    save_file(state, str(tmp_path / "unet" / "diffusion_pytorch_model.safetensors"))
    unet = _unet()
    network = _kohya_network(tmp_path, unet, None, seed=2)
    flat_to_original = {
        "lora_unet_" + name.replace(".", "_"): "lora_unet_"
        + rename[name + ".weight"][: -len(".weight")].replace(".", "_")
        for name, _ in unet.named_modules()
        if name + ".weight" in rename
    }
    diffusers_file = tmp_path / "d.safetensors"
    network.save_weights(str(diffusers_file), torch.float32, None)
    weights = load_file(str(diffusers_file))
    renamed = {}
    for key, value in weights.items():
        module, _, role = key.partition(".")
        renamed[f"{flat_to_original[module]}.{role}"] = value
    assert "lora_unet_output_blocks_5_1_conv.lora_up.weight" in renamed  # an upsampler
    assert "lora_unet_input_blocks_4_0_skip_connection.alpha" in renamed
    lora = tmp_path / "sdxl_style.safetensors"
    save_file(renamed, str(lora))
    w0 = {k: v.double() for k, v in state.items()}
    network.merge_to(None, None, weights, None, None)
    expected = _expected(w0, unet.state_dict())

    with pytest.warns(UserWarning, match="converted from the original .LDM. to the diffusers"):
        table = wdanalysis.compare(tmp_path / "unet", lora, modules=[".*"])
    assert len(expected) > 60
    _check(table, expected)
    assert "UNet names in the original (LDM) layout" in wdanalysis.inspect(lora)["notes"]


# -------------------------------------------------------------------- diffusers files


@pytest.mark.parametrize("use_dora", [False, True])
def test_diffusers_lora_against_an_original_single_file(tmp_path, layouts, use_dora):
    state, original, rename = layouts
    _original_single_file(tmp_path / "sd", original, None)
    (tmp_path / "unet").mkdir()
    save_file(state, str(tmp_path / "unet" / "diffusion_pytorch_model.safetensors"))
    unet = _unet().float()
    targets = ["to_k", "conv1", "conv_shortcut", "proj_in", "conv", "conv_in", "linear_1"]
    config = LoraConfig(r=2, lora_alpha=3, target_modules=targets, use_dora=use_dora)
    save_unet_lora(unet, tmp_path / "lora", config, seed=3)
    reference = diffusers.UNet2DConditionModel(**UNET_CONFIG).double()
    reference.load_state_dict({k: v.double() for k, v in state.items()})
    w0 = {k: v.clone() for k, v in reference.state_dict().items()}
    reference.load_lora_adapter(
        str(tmp_path / "lora"), weight_name="pytorch_lora_weights.safetensors", prefix="unet"
    )
    reference.fuse_lora()
    reference.unload_lora()
    merged = reference.state_dict()
    expected = _expected(w0, merged, rename, UNET_PREFIX)
    assert any("output_blocks.5.1.conv" in k[2] for k in expected)
    assert any("time_embed.0" in k[2] for k in expected)

    with pytest.warns(UserWarning, match="converted from the diffusers to the original"):
        table = wdanalysis.compare(tmp_path / "sd", tmp_path / "lora", modules=[".*"])
    assert set(table["method"]) == {"DoRA" if use_dora else "LoRA"}
    _check(table, expected)
    assert "UNet names in the diffusers layout" in wdanalysis.inspect(tmp_path / "lora")["notes"]
    # the same file against the diffusers-layout UNet: no conversion, the same numbers
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        same = wdanalysis.compare(tmp_path / "unet", tmp_path / "lora", modules=[".*"])
    _check(same, _expected(w0, merged))


# ----------------------------------------------------------------------- bad input


def _cli_error(capsys, base, lora, tmp_path) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        code = _main(
            ["compare", str(base), str(lora), "--out", str(tmp_path / "out"), "--no-figures",
             "--quiet"]
        )  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    lines = [x for x in err.splitlines() if x.startswith("wdanalysis: error: ")]
    assert len(lines) == 1 and str(lora) in lines[0], err
    return lines[0]


def test_a_lora_for_another_unet_is_refused(capsys, tmp_path, layouts):
    """A kohya LoRA of a UNet with one ResNet per block: its names convert to blocks of
    another size (or to none), which is an error, never a silent wrong match."""
    _, original, _ = layouts
    _original_single_file(tmp_path / "sd", original, None)
    other = diffusers.UNet2DConditionModel(**{**UNET_CONFIG, "layers_per_block": 1})
    network = _kohya_network(tmp_path, other.double(), None, seed=4)
    network.save_weights(str(tmp_path / "other.safetensors"), torch.float32, None)
    line = _cli_error(capsys, tmp_path / "sd", tmp_path / "other.safetensors", tmp_path)
    assert "do not fit the base weight" in line and "output_blocks.1.0.in_layers.2" in line


def _openclip(te_state: dict) -> dict:
    """The tiny CLIP in OpenCLIP's layout of SD2.x / SDXL checkpoints: q/k/v fused."""
    q_name = "self_attn.q_proj.weight"  # transformers 5 saves no ``text_model.`` wrapper
    prefix = next(k for k in te_state if k.endswith(q_name))[: -len(q_name)]
    out = {"transformer.resblocks.0.attn.in_proj_weight": torch.cat(
        [te_state[prefix + f"self_attn.{p}_proj.weight"] for p in "qkv"]
    )}  # fmt: skip
    for ours, theirs in (("self_attn.out_proj", "attn.out_proj"), ("mlp.fc1", "mlp.c_fc"),
                         ("mlp.fc2", "mlp.c_proj")):  # fmt: skip
        out[f"transformer.resblocks.0.{theirs}.weight"] = te_state[prefix + ours + ".weight"]
    return out


def _clip_names(te_state: dict, tree: str) -> dict:
    """HF CLIP key → the CLIP-named view of the fused OpenCLIP encoder saved under ``tree``."""
    names = {}
    for key in te_state:
        at = key.find("encoder.layers.")
        if at >= 0 and key.endswith(("_proj.weight", "fc1.weight", "fc2.weight")):
            names[key] = f"{tree}text_model.{key[at:]}"
    return names


def test_openclip_fused_text_encoder_is_read_per_projection(tmp_path, layouts):
    """SD2.x's file: its OpenCLIP encoder fuses q/k/v into ``in_proj_weight``; a LoRA's
    q_proj/k_proj/v_proj/out_proj/fc1/fc2 modules are analysed on their rows of it, equal to
    LyCORIS' merge of the same encoder in CLIP layout, and a full checkpoint holding the
    merged weights in OpenCLIP layout gives the same rows."""
    state, original, rename = layouts
    unet, te = _unet(), _te()
    tree = "cond_stage_model.model."
    te_w0 = {k: v.float().double() for k, v in te.state_dict().items()}
    tensors = {UNET_PREFIX + k: v for k, v in original.items()}
    for k, v in _openclip({k: v.float() for k, v in te.state_dict().items()}).items():
        tensors[tree + k] = v.contiguous()
    (tmp_path / "sd2").mkdir()
    save_file(tensors, str(tmp_path / "sd2" / "model.safetensors"))
    network = _kohya_network(tmp_path, unet, te, seed=5)
    lora = tmp_path / "lora.safetensors"
    network.save_weights(str(lora), torch.float32, None)
    w0 = {k: v.double() for k, v in state.items()}
    network.merge_to(None, None, load_file(str(lora)), None, None)
    names = _clip_names(te_w0, tree)
    te_expected = _expected(te_w0, te.state_dict(), names)
    assert len(te_expected) == 6 and all(
        "text_model.encoder.layers.0." in k[2] for k in te_expected
    )
    expected = {**_expected(w0, unet.state_dict(), rename, UNET_PREFIX), **te_expected}
    table = wdanalysis.compare(tmp_path / "sd2", lora, modules=[".*"])
    _check(table, expected)
    assert "OpenCLIP" in " ".join(wdanalysis.inspect(tmp_path / "sd2")["notes"])

    merged = dict(tensors)  # the merged encoder, saved back in OpenCLIP layout
    for k, v in _openclip({k: v.float() for k, v in te.state_dict().items()}).items():
        merged[tree + k] = v.contiguous()
    (tmp_path / "ft").mkdir()
    save_file(merged, str(tmp_path / "ft" / "model.safetensors"))
    te_keys = [k[2].removesuffix(".weight") for k in te_expected]
    table = wdanalysis.compare(tmp_path / "sd2", [lora, tmp_path / "ft"], modules=te_keys)
    assert len(table) == 12
    for run in ("lora", "ft"):
        rows = table[table["run"].str.startswith(run)]
        assert check_table(rows, te_expected, rtol=1e-6, atol=1e-12) == 6


def test_a_unet_name_of_the_other_layout_wins_over_a_shorter_tail():
    """With one upsampler, ``conv.weight`` alone would name it uniquely: a downsampler's
    LoRA must still go to ``input_blocks.3.0.op``, its whole name in the other layout."""
    from wdanalysis.loaders.formats import diffusers as diffusers_format
    from wdanalysis.loaders.formats import kohya
    from wdanalysis.loaders.formats.foreign import ForeignModule
    from wdanalysis.loaders.key_alignment import KeyAligner

    aligner = KeyAligner(
        UNET_PREFIX + k
        for k in ("output_blocks.2.1.conv.weight", "input_blocks.3.0.op.weight", "out.2.weight")
    )
    notes = []
    find = diffusers_format._resolver(notes.append)
    module = ForeignModule("down_blocks.0.downsamplers.0.conv", component="unet")
    assert find(module, aligner) == UNET_PREFIX + "input_blocks.3.0.op.weight"
    module = ForeignModule("up_blocks.0.upsamplers.0.conv", component="unet")
    assert find(module, aligner) == UNET_PREFIX + "output_blocks.2.1.conv.weight"
    assert notes == ["UNet names converted from the diffusers to the original (LDM) layout"
                     " of the base"] * 2  # fmt: skip
    find = kohya._Resolver(notes.append).find
    for name, key in (("down_blocks_0_downsamplers_0_conv", "input_blocks.3.0.op.weight"),
                      ("conv_out", "out.2.weight")):  # fmt: skip
        assert find(ForeignModule("lora_unet_" + name, component="UNet"), aligner) == (
            UNET_PREFIX + key
        )


def test_sdxl_single_file_text_encoders_stay_in_their_trees(tmp_path, layouts):
    """SDXL's file: UNet (original names), CLIP under ``conditioner.embedders.0.`` and
    OpenCLIP under ``conditioner.embedders.1.``. The second encoder's LoRA modules
    (``lora_te2_…encoder_layers_0_mlp_fc1``) also fit the first encoder's keys by their
    tail, here with the same shapes: they are left out, not bound there."""
    state, original, rename = layouts
    unet, te1, te2 = _unet(), _te(), _te(seed=1)
    te1_state = {k: v.float() for k, v in te1.state_dict().items()}
    tensors = {UNET_PREFIX + k: v for k, v in original.items()}
    for k, v in te1_state.items():
        tensors["conditioner.embedders.0.transformer." + k] = v.contiguous()
    for k, v in _openclip({k: v.float() for k, v in te2.state_dict().items()}).items():
        tensors["conditioner.embedders.1.model." + k] = v.contiguous()
    (tmp_path / "sdxl").mkdir()
    save_file(tensors, str(tmp_path / "sdxl" / "model.safetensors"))
    network = _kohya_network(tmp_path, unet, [te1, te2], seed=6)
    lora = tmp_path / "lora.safetensors"
    network.save_weights(str(lora), torch.float32, None)
    weights = load_file(str(lora))
    assert any(k.startswith("lora_te2_") for k in weights)
    unet_w0 = {k: v.double() for k, v in state.items()}
    te1_w0 = {k: v.double() for k, v in te1_state.items()}
    te2_w0 = {k: v.float().double() for k, v in te2.state_dict().items()}
    network.merge_to(None, None, weights, None, None)
    te1_names = {k: "conditioner.embedders.0.transformer." + k for k in te1_w0}
    expected = {
        **_expected(unet_w0, unet.state_dict(), rename, UNET_PREFIX),
        **_expected(te1_w0, te1.state_dict(), te1_names),
    }
    assert sum("embedders.0" in k[2] for k in expected) == 6
    expected.update(
        _expected(te2_w0, te2.state_dict(), _clip_names(te2_w0, "conditioner.embedders.1.model."))
    )
    assert sum("embedders.1" in k[2] for k in expected) == 6
    table = wdanalysis.compare(tmp_path / "sdxl", lora, modules=[".*"])
    _check(table, expected)


def test_kohya_sdxl_text_encoders_in_a_pipeline_base():
    """A pipeline base names SDXL's encoders ``text_encoder.`` and ``text_encoder_2.``:
    ``lora_te1_…`` belongs to the first alone (``text_encoder`` is not ``text_encoder_2``)."""
    from wdanalysis.loaders.formats import kohya
    from wdanalysis.loaders.formats.foreign import ForeignModule
    from wdanalysis.loaders.key_alignment import KeyAligner

    leaf = "text_model.encoder.layers.0.mlp.fc1.weight"
    aligner = KeyAligner([f"text_encoder.{leaf}", f"text_encoder_2.{leaf}"])
    find = kohya._Resolver(lambda note: None).find
    flat = "text_model_encoder_layers_0_mlp_fc1"
    te1 = ForeignModule("lora_te1_" + flat, component="text encoder 1")
    te2 = ForeignModule("lora_te2_" + flat, component="text encoder 2")
    assert find(te1, aligner) == f"text_encoder.{leaf}"
    assert find(te2, aligner) == f"text_encoder_2.{leaf}"
