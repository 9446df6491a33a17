"""Shared pieces of the issue-33 architecture tests (``test_fused_modern.py``,
``test_fused_experts.py``): tiny models with weights away from zero, a fine-tuning step
that moves stacked experts too, and the q/k/v a model's own forward hands its attention."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from builders import finetuned


def noisy(model, seed: int = 0):
    """Weights well away from zero (every parameter, the stacked experts too)."""
    with torch.no_grad():
        for i, (_, param) in enumerate(model.named_parameters()):
            param.normal_(0.0, 0.2, generator=torch.Generator().manual_seed(seed + i))
    return model.eval()


def moved(state: dict, seed: int) -> dict:
    """A fine-tuning step on every float tensor, the 3-D stacks included."""
    gen = torch.Generator().manual_seed(seed)
    out = finetuned(state, seed)
    for key, value in state.items():
        if value.is_floating_point() and value.dim() == 3:
            rows = 1 + 0.05 * torch.randn(*value.shape[:2], 1, generator=gen)
            out[key] = value * rows + 0.01 * torch.randn(value.shape, generator=gen)
    return out


def save(model, folder: Path, state=None) -> Path:
    model = copy.deepcopy(model)
    if state is not None:
        model.load_state_dict(state)
    model.save_pretrained(folder)
    return folder


def one_row(table, parameter: str, module: str, run=None):
    rows = table[(table["parameter"] == parameter) & (table["module"] == module)]
    if run is not None:
        rows = rows[rows["run"] == run]
    assert len(rows) == 1, f"{len(rows)} rows for {parameter} {module}"
    return rows


SEEN: dict[str, torch.Tensor] = {}


def capture_attention(module, query, key, value, attention_mask, **kwargs):
    """An attention function that keeps the q, k, v the model's forward hands it."""
    SEEN.update(q=query.detach(), k=key.detach(), v=value.detach())
    return torch.zeros_like(value.transpose(1, 2)).contiguous(), None


def forward_features(model, module_path: str) -> dict[str, torch.Tensor]:
    """Output features of ``module_path`` that the model's own forward hands its attention
    as query, key and value (one token: rotary embeddings are the identity at position 0,
    up to the order of the rope dims, which a set of features does not see)."""
    from transformers import AttentionInterface

    AttentionInterface.register("wdanalysis_capture", capture_attention)
    model = copy.deepcopy(model)
    model.set_attn_implementation("wdanalysis_capture")
    seen = {}
    module = model.get_submodule(module_path)
    hook = module.register_forward_hook(lambda m, i, out: seen.setdefault("y", out.detach()))
    try:
        with torch.no_grad():
            model(torch.tensor([[5]]))
    finally:
        hook.remove()
    y = seen["y"].reshape(-1)
    found = {}
    for name in ("q", "k", "v"):
        distance = (y[:, None] - SEEN[name].reshape(-1)[None, :]).abs().min(dim=1).values
        found[name] = torch.nonzero(distance < 1e-6).reshape(-1)
    return found
