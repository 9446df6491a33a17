"""Tiny Stable Diffusion parts for the ecosystem tests (diffusers, kohya/LyCORIS, pipelines):
a UNet whose attention, ResNet and conv weights are all non-square, and CLIP text encoders."""

from __future__ import annotations

import torch


def tiny_unet(seed: int = 0):
    """Attention ``to_k`` (8, 12), ResNet ``conv1`` (16, 8, 3, 3); one layer per block."""
    import diffusers

    torch.manual_seed(seed)
    return diffusers.UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=12,
        attention_head_dim=2,
        norm_num_groups=4,
    ).eval()


def tiny_clip(seed: int = 0, hidden: int = 12, intermediate: int = 20, layers: int = 1):
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    config = CLIPTextConfig(
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=2,
        vocab_size=30,
        max_position_embeddings=8,
    )
    return CLIPTextModel(config).eval()


def save_unet_lora(unet, folder, config, seed: int, metadata: bool = True) -> None:
    """``config`` (a PEFT LoraConfig) added to ``unet``, moved off its initial values as
    training would, saved with diffusers' ``save_lora_weights``."""
    from diffusers import StableDiffusionPipeline
    from peft.utils import get_peft_model_state_dict

    unet.add_adapter(config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
            elif "lora_magnitude_vector" in name:
                p.mul_(1 + 0.1 * torch.randn(p.shape, generator=gen))
    StableDiffusionPipeline.save_lora_weights(
        folder,
        unet_lora_layers=get_peft_model_state_dict(unet),
        unet_lora_adapter_metadata=config.to_dict() if metadata else None,
    )
