"""A diffusers pipeline folder as the base: ``model_index.json`` and one sub-folder per
component, as ``save_pretrained`` and hub snapshots lay it out.

The pipeline is SDXL-shaped: a tiny UNet, two CLIP text encoders whose modules share names
(``text_model.encoder.layers.0.self_attn.q_proj``) but not sizes (hidden 12 and 20; the
second saved only as the ``fp16`` variant, sharded), and a VAE (left out). A LoRA over all
three components is saved with diffusers' ``StableDiffusionXLPipeline.save_lora_weights``;
the reference merges each component's PEFT adapter with PEFT's ``merge_and_unload`` in
float64.
"""

from __future__ import annotations

import json

import pytest
import torch
from builders import check_table, reference_delta
from sd_builders import tiny_clip, tiny_unet

import wdanalysis
import wdanalysis.loaders.runs
from wdanalysis.errors import CheckpointFormatError

diffusers = pytest.importorskip("diffusers", reason="diffusers is not installed")
peft = pytest.importorskip("peft", reason="peft is not installed")

from diffusers import StableDiffusionXLPipeline  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from peft.utils import get_peft_model_state_dict  # noqa: E402
from transformers import CLIPTextModel  # noqa: E402

UNET_TARGETS, TE_TARGETS = ["to_k", "to_v"], ["q_proj", "v_proj"]


def _text_encoder(hidden: int, seed: int):
    return tiny_clip(seed, hidden=hidden, intermediate=2 * hidden + 4, layers=2)


def _components():
    return {
        "unet": tiny_unet(0),
        "text_encoder": _text_encoder(12, 1),
        "text_encoder_2": _text_encoder(20, 2),
    }


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    root = tmp_path_factory.mktemp("sdxl")
    models = _components()
    models["unet"].save_pretrained(root / "unet")
    models["text_encoder"].save_pretrained(root / "text_encoder")
    models["text_encoder_2"].save_pretrained(
        root / "text_encoder_2", variant="fp16", max_shard_size="8KB"
    )
    torch.manual_seed(3)
    diffusers.AutoencoderKL(
        block_out_channels=(8,), norm_num_groups=4, latent_channels=4
    ).save_pretrained(root / "vae")
    index = {
        "_class_name": "StableDiffusionXLPipeline",
        "_diffusers_version": diffusers.__version__,
        "unet": ["diffusers", "UNet2DConditionModel"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "vae": ["diffusers", "AutoencoderKL"],
        "scheduler": ["diffusers", "EulerDiscreteScheduler"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
    }
    (root / "model_index.json").write_text(json.dumps(index))
    assert not (root / "text_encoder_2" / "model.safetensors").exists()
    return root


def _lora(folder, use_dora: bool) -> dict:
    """Saves the LoRA as diffusers does; returns {pipeline key: (ΔM, ΔD)} from PEFT's merge."""
    layers, expected = {}, {}
    gen = torch.Generator().manual_seed(7)
    for component, model in _components().items():
        targets = UNET_TARGETS if component == "unet" else TE_TARGETS
        config = LoraConfig(r=3, lora_alpha=5, target_modules=targets, use_dora=use_dora)
        model = get_peft_model(model.double(), config)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.copy_((0.1 * torch.randn(p.shape, generator=gen)).float())
                elif "lora_magnitude_vector" in name:
                    p.mul_(1 + 0.1 * torch.randn(p.shape, generator=gen)).copy_(p.float())
        layers[f"{component}_lora_layers"] = {  # as add_adapter's models name them
            k.removeprefix("base_model.model."): v.float()
            for k, v in get_peft_model_state_dict(model).items()
        }
        layers[f"{component}_lora_adapter_metadata"] = config.to_dict()
        w0 = {k: v.clone() for k, v in model.get_base_model().state_dict().items()}
        merged = model.merge_and_unload().state_dict()
        for key, weight in merged.items():
            base_key = key.replace(".base_layer.", ".")
            if key.endswith(".weight") and any(f".{t}." in key for t in targets):
                before = w0.get(base_key, w0.get(key.replace(".weight", ".base_layer.weight")))
                expected[(None, None, f"{component}.{key}")] = reference_delta(
                    before.flatten(1), weight.flatten(1)
                )
    StableDiffusionXLPipeline.save_lora_weights(folder, **layers)
    return expected


@pytest.mark.parametrize("use_dora", [False, True])
def test_sdxl_pipeline_base_binds_each_component(tmp_path, pipeline, use_dora):
    expected = _lora(tmp_path / "lora", use_dora)
    assert {k[2].split(".")[0] for k in expected} == {"unet", "text_encoder", "text_encoder_2"}
    table = wdanalysis.compare(pipeline, tmp_path / "lora", modules=UNET_TARGETS + TE_TARGETS)
    assert set(table["method"]) == {"DoRA" if use_dora else "LoRA"}
    assert check_table(table, expected, rtol=1e-9, atol=1e-15) == len(table) == len(expected)
    assert not table["parameter"].str.startswith("vae.").any()


def test_pipeline_reads_components_where_they_lie(pipeline):
    info = wdanalysis.inspect(pipeline)
    assert "diffusers pipeline" in info["format"] and "text_encoder_2" in info["format"]
    base = wdanalysis.loaders.runs.open_base(pipeline)
    keys = base.store.keys()
    assert not any(k.startswith("vae.") for k in keys)
    te2 = CLIPTextModel.from_pretrained(pipeline / "text_encoder_2", variant="fp16")
    key = next(k for k in te2.state_dict() if k.endswith("layers.1.self_attn.q_proj.weight"))
    assert torch.equal(base.store.get(f"text_encoder_2.{key}"), te2.state_dict()[key])


def test_pipeline_without_weights_is_refused(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps({"unet": ["diffusers", "X"]}))
    with pytest.raises(CheckpointFormatError, match="without weights for any component"):
        wdanalysis.loaders.runs.open_base(tmp_path)


def test_sdxl_kohya_network_binds_each_text_encoder(tmp_path, pipeline):
    """LyCORIS' kohya network over SDXL's two text encoders (``lora_te1_``/``lora_te2_``,
    same module names) and the UNet, against the pipeline folder; LyCORIS' merge is the
    reference."""
    pytest.importorskip("lycoris", reason="lycoris-lora is not installed")
    import warnings

    from lycoris.kohya import create_network
    from safetensors.torch import load_file

    models = {k: m.double() for k, m in _components().items()}
    before = {c: {k: v.clone() for k, v in m.state_dict().items()} for c, m in models.items()}
    preset = tmp_path / "preset.toml"
    preset.write_text(
        'unet_target_module = ["Transformer2DModel"]\nunet_target_name = []\n'
        'text_encoder_target_module = ["CLIPAttention"]\n'
    )
    tes = [models["text_encoder"], models["text_encoder_2"]]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        network = create_network(
            1.0, 3, 2.0, None, tes, models["unet"], algo="lora", preset=str(preset)
        )
    network.apply_to(tes, models["unet"], apply_text_encoder=True, apply_unet=True)
    network.double()
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in network.named_parameters():
            if name.endswith("lora_up.weight"):
                p.copy_((0.1 * torch.randn(p.shape, generator=gen, dtype=torch.float64)).float())
    lora = tmp_path / "sdxl_lora.safetensors"
    network.save_weights(str(lora), torch.float32, None)
    keys = load_file(str(lora))
    assert any(k.startswith("lora_te2_") for k in keys) and any(
        k.startswith("lora_te1_") for k in keys
    )
    network.merge_to(None, None, keys, None, None)
    expected = {}
    for component, model in models.items():
        for key, weight in model.state_dict().items():
            if key.endswith(("q_proj.weight", "v_proj.weight", "to_q.weight", "to_v.weight")):
                w0 = before[component][key]
                if not torch.equal(w0, weight):
                    expected[(None, None, f"{component}.{key}")] = reference_delta(
                        w0.flatten(1), weight.flatten(1)
                    )
    assert {k[2].split(".")[0] for k in expected} == {"unet", "text_encoder", "text_encoder_2"}
    table = wdanalysis.compare(pipeline, lora)
    assert check_table(table, expected, rtol=1e-9, atol=1e-15) == len(table) == len(expected)


def test_sdxl_diffusers_lora_against_a_single_file_with_openclip(tmp_path):
    """The same diffusers LoRA against SDXL's single-file layout: the first encoder as HF
    CLIP under ``conditioner.embedders.0.transformer.``, the second in OpenCLIP's fused
    layout under ``conditioner.embedders.1.model.`` (its q/k/v rows of ``in_proj_weight``
    read as q_proj/k_proj/v_proj); each encoder's modules stay in their own tree."""
    from safetensors.torch import save_file

    expected = _lora(tmp_path / "lora", use_dora=True)
    models = _components()
    tensors = {"model.diffusion_model.out.2.weight": torch.zeros(4, 8, 3, 3)}  # no UNet here
    for key, value in models["text_encoder"].state_dict().items():
        tensors["conditioner.embedders.0.transformer." + key] = value.float().contiguous()
    te2 = {k: v.float() for k, v in models["text_encoder_2"].state_dict().items()}
    for n in range(2):  # OpenCLIP's names, written out here
        pre = next(k for k in te2 if k.endswith(f"layers.{n}.self_attn.q_proj.weight"))
        pre = pre[: -len("self_attn.q_proj.weight")]
        block = f"conditioner.embedders.1.model.transformer.resblocks.{n}."
        tensors[block + "attn.in_proj_weight"] = torch.cat(
            [te2[pre + f"self_attn.{p}_proj.weight"] for p in "qkv"]
        )
        for ours, theirs in (("self_attn.out_proj", "attn.out_proj"), ("mlp.fc1", "mlp.c_fc")):
            tensors[block + theirs + ".weight"] = te2[pre + ours + ".weight"]
    (tmp_path / "sdxl").mkdir()
    save_file(
        {k: v.contiguous() for k, v in tensors.items()}, str(tmp_path / "sdxl" / "x.safetensors")
    )

    def single_file_name(key: str) -> str:
        component, _, rest = key.partition(".")
        if component == "text_encoder":
            return "conditioner.embedders.0.transformer." + rest
        return "conditioner.embedders.1.model.text_model." + rest[rest.index("encoder.") :]

    expected = {
        (None, None, single_file_name(k[2])): v
        for k, v in expected.items()
        if not k[2].startswith("unet.")
    }
    with pytest.warns(UserWarning, match="unet modules left out"):
        table = wdanalysis.compare(tmp_path / "sdxl", tmp_path / "lora", modules=TE_TARGETS)
    assert check_table(table, expected, rtol=1e-9, atol=1e-15) == len(table) == 8
