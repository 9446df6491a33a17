"""LoRA and DoRA layers in plain PyTorch (DoRA paper, Eq. 1 and Eq. 5).

Both wrap a frozen base layer (``nn.Linear`` or GPT-2 style ``Conv1D``) instead of copying
it, so the pretrained weight W0 stays untouched and the analysis can always rebuild the
effective weight from W0 plus the saved adapter. Parameter names (``lora_A.weight``,
``lora_B.weight``, ``lora_magnitude_vector``) are chosen so that a module's state dict is
already in PEFT's on-disk layout once the ``base_model.model.`` prefix is added.

Axis convention: one magnitude per *output feature* (row of an ``nn.Linear`` weight), as
PEFT, torchtune and the DoRA authors' code do; ``Conv1D`` weights are (in, out) and are
transposed first.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def is_conv1d(module: nn.Module) -> bool:
    """GPT-2's ``Conv1D`` is a linear layer with its weight stored as (in, out)."""
    return type(module).__name__ == "Conv1D" and getattr(module, "weight", None) is not None


def is_norm(module: nn.Module) -> bool:
    """A normalisation layer (LayerNorm, GroupNorm, RMSNorm ...): never weight-decayed, and
    what ``train_layernorm`` trains beside the adapters."""
    return isinstance(module, nn.LayerNorm | nn.GroupNorm) or "Norm" in type(module).__name__


def is_adaptable(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module)


def base_weight(module: nn.Module) -> torch.Tensor:
    """The base layer's weight as (out, in), whatever its storage layout."""
    return module.weight.T if is_conv1d(module) else module.weight


def lora_scaling(r: int, alpha: float, use_rslora: bool = False) -> float:
    """s = alpha / r, or alpha / sqrt(r) with rsLoRA (Kalajdzievski 2023), as PEFT computes it."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def row_norm(weight: torch.Tensor) -> torch.Tensor:
    """||W||_c per output feature, computed in at least float32 (bf16 norms are too coarse)."""
    if weight.dtype in (torch.float16, torch.bfloat16):
        weight = weight.float()
    return torch.linalg.norm(weight, dim=1)


def dora_weight(
    w0: torch.Tensor, delta_v: torch.Tensor, magnitude: torch.Tensor, detach_norm: bool = True
) -> torch.Tensor:
    """Merged DoRA weight W' = m * (W0 + ΔV) / ||W0 + ΔV||_c (paper Eq. 5), all (out, in).

    With ``detach_norm`` the norm is a constant for autograd (paper Sec. 4.3), so the
    gradient of ΔV becomes (m / C) * dL/dW' (Eq. 11) instead of Eq. 6.
    """
    direction = w0 + delta_v
    norm = row_norm(direction).to(direction.dtype)
    if detach_norm:
        norm = norm.detach()
    return (magnitude / norm).unsqueeze(1) * direction


def full_precision(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether a linear layer on ``x`` computes in float32/float64 (no autocast, no bf16)."""
    wide = (torch.float32, torch.float64)
    return x.dtype in wide and weight.dtype in wide and not torch.is_autocast_enabled(x.device.type)


def add_lora(result: torch.Tensor, hidden: torch.Tensor, b: torch.Tensor, s: float):
    """result + s * hidden @ B^T in one ``addmm``: the B product, the scaling and the sum
    in a single pass, where ``result + lora_B(hidden) * s`` makes two more over
    (tokens, out). Falls back to that form when dtypes differ (autocast casts per op)."""
    if not (result.dtype == hidden.dtype == b.dtype) or torch.is_autocast_enabled(b.device.type):
        return result + F.linear(hidden, b) * s
    flat = torch.addmm(result.reshape(-1, b.shape[0]), hidden.reshape(-1, b.shape[1]), b.T, alpha=s)
    return flat.view(result.shape)


class LoRALinear(nn.Module):
    """y = W0 x + b + s * B A dropout(x)   (paper Eq. 1 with LoRA's ΔW = s·B·A).

    A is initialised Kaiming-uniform (as ``nn.Linear`` and PEFT do) and B to zeros, so the
    layer equals its base layer exactly at initialisation.
    """

    def __init__(
        self,
        base_layer: nn.Module,
        r: int,
        alpha: float,
        use_rslora: bool = False,
        dropout: float = 0.0,
    ):
        super().__init__()
        if not is_adaptable(base_layer):
            raise TypeError(f"LoRA needs nn.Linear or Conv1D, got {type(base_layer).__name__}")
        if r <= 0:
            raise ValueError(f"rank must be positive, got {r}")
        self.base_layer = base_layer
        self.fan_in_fan_out = is_conv1d(base_layer)
        out_features, in_features = base_weight(base_layer).shape
        self.r = r
        self.lora_alpha = alpha
        self.scaling = lora_scaling(r, alpha, use_rslora)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        # Over a meta base (FSDP2 from meta, train/sharded_load.py) the factors are still
        # drawn for real on the CPU: the same random stream, so the same init, as one process.
        device = base_layer.weight.device
        device = torch.device("cpu") if device.type == "meta" else device
        factory = {"device": device, "dtype": base_layer.weight.dtype}
        self.lora_A = nn.Linear(in_features, r, bias=False, **factory)
        self.lora_B = nn.Linear(r, out_features, bias=False, **factory)
        self.reset_lora_parameters()
        for param in self.base_layer.parameters():
            param.requires_grad_(False)

    def reset_lora_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def delta_weight(self) -> torch.Tensor:
        """ΔV = s * B @ A as (out, in)."""
        return self.scaling * (self.lora_B.weight @ self.lora_A.weight)

    def direction_weight(self) -> torch.Tensor:
        """V' = W0 + ΔV as (out, in), in one fused ``addmm`` (no (out, in) temporaries)."""
        w0 = base_weight(self.base_layer)
        return torch.addmm(w0, self.lora_B.weight, self.lora_A.weight, alpha=self.scaling)

    def merged_weight(self) -> torch.Tensor:
        """The effective weight as (out, in); never written back into the base layer."""
        return self.direction_weight()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        return add_lora(result, self.lora_A(self.lora_dropout(x)), self.lora_B.weight, self.scaling)


class DoRALinear(LoRALinear):
    """DoRA: W' = m * (W0 + s·B·A) / ||W0 + s·B·A||_c   (paper Eq. 5).

    The forward never builds W' for the input path; it rescales the base and LoRA outputs,
    y = W0 x + b + (m/C - 1) W0 x' + (m/C) s B A x'  with x' = dropout(x),
    which is PEFT's formulation and reduces to W' x + b without dropout (in float32/64
    without dropout it is computed as (m/C)(W0 x + s B A x) + b, fewer passes over the
    activations: ``benchmarks/bench_training.py``). C is recomputed
    from the current A and B every step; ``detach_norm`` (paper Sec. 4.3, default on)
    treats it as a constant for backward, which saves the (out, in) tensors its gradient
    would need.

    ``magnitude_only`` trains m alone (the paper's Table 6 setting): A and B stay frozen
    zeros so that the saved adapter is still a valid PEFT DoRA adapter.
    """

    def __init__(
        self,
        base_layer: nn.Module,
        r: int,
        alpha: float,
        use_rslora: bool = False,
        dropout: float = 0.0,
        detach_norm: bool = True,
        magnitude_only: bool = False,
    ):
        super().__init__(base_layer, r, alpha, use_rslora, dropout)
        self.detach_norm = detach_norm
        self.magnitude_only = magnitude_only
        if magnitude_only:
            nn.init.zeros_(self.lora_A.weight)
            self.lora_A.weight.requires_grad_(False)
            self.lora_B.weight.requires_grad_(False)
        if base_layer.weight.device.type == "meta":  # filled from the real base rows later
            magnitude = torch.empty(self.lora_B.weight.shape[0], device="meta")
        else:
            with torch.no_grad():
                magnitude = self.weight_norm().detach()
        self.lora_magnitude_vector = nn.Parameter(magnitude.to(base_layer.weight.dtype))

    def weight_norm(self) -> torch.Tensor:
        """C = ||W0 + s·B·A||_c, in float32 even under autocast."""
        device_type = self.lora_A.weight.device.type
        with torch.autocast(device_type=device_type, enabled=False):
            return row_norm(self.direction_weight())

    def merged_weight(self) -> torch.Tensor:
        return dora_weight(
            base_weight(self.base_layer), self.delta_weight(), self.lora_magnitude_vector
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.detach_norm:
            with torch.no_grad():
                norm = self.weight_norm()
        else:
            norm = self.weight_norm()
        scale = self.lora_magnitude_vector / norm
        dropped = self.lora_dropout(x)
        no_dropout = isinstance(self.lora_dropout, nn.Identity) or not self.training
        w0 = base_weight(self.base_layer)
        if no_dropout and not self.magnitude_only and full_precision(x, w0):
            return self._fused_forward(x, w0, scale)
        result = self.base_layer(x)
        if no_dropout:
            bias = self.base_layer.bias
            base_out = result if bias is None else result - bias
        else:
            base_out = F.linear(dropped, w0)
        # (m/C - 1) is tiny near initialisation: form it in float32 before any bf16 cast.
        update = (scale - 1).to(result.dtype) * base_out
        scale = scale.to(result.dtype)
        if not self.magnitude_only:
            update = update + scale * (self.lora_B(self.lora_A(dropped)) * self.scaling)
        return result + update

    def _fused_forward(self, x: torch.Tensor, w0: torch.Tensor, scale: torch.Tensor):
        """y = (m/C) * (W0 x + s B A x) + b: the same Eq. 5 output without dropout, with one
        elementwise pass over (tokens, out) (the ``addcmul``; the LoRA sum rides in an
        ``addmm``) instead of six: PEFT's form subtracts the bias back out of the base
        result, then rescales base and LoRA outputs separately.

        Only in float32/float64: under bf16 the general path keeps PEFT's arithmetic, its
        rounding included ((m/C - 1) is formed in float32 before the cast there).
        """
        direction = add_lora(F.linear(x, w0), self.lora_A(x), self.lora_B.weight, self.scaling)
        scale = scale.to(direction.dtype)
        bias = self.base_layer.bias
        return direction * scale if bias is None else torch.addcmul(bias, direction, scale)
