"""Our LoRA/DoRA layers against PEFT and against the paper's gradient formulas (float64)."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers.pytorch_utils import Conv1D

from wdanalysis.train import AdapterSpec, DoRALinear, LoRALinear, dora_weight, inject_adapters
from wdanalysis.train.inject import merge_adapters
from wdanalysis.train.layers import base_weight

IN, OUT, R = 7, 5, 3  # non-square on purpose: a wrong norm axis cannot hide


class Net(nn.Module):
    def __init__(self, conv1d: bool = False):
        super().__init__()
        self.proj = Conv1D(OUT, IN) if conv1d else nn.Linear(IN, OUT)
        self.head = nn.Linear(OUT, 2)

    def forward(self, x):
        return self.head(torch.tanh(self.proj(x)))


def _random_adapter_pair(method: str, conv1d: bool, rslora: bool, seed: int = 0):
    """A PEFT model and ours with identical base, A, B and m, in float64."""
    torch.manual_seed(seed)
    base = Net(conv1d).double()
    nn.init.normal_(base.proj.bias)
    ours = Net(conv1d).double()
    ours.load_state_dict(base.state_dict())
    config = LoraConfig(
        r=R,
        lora_alpha=5,
        use_rslora=rslora,
        target_modules=["proj"],
        use_dora=method == "dora",
        fan_in_fan_out=conv1d,
    )
    peft_model = get_peft_model(base, config).double()
    spec = AdapterSpec(method=method, r=R, alpha=5, use_rslora=rslora, target_modules=("proj",))
    layer = inject_adapters(ours, spec)["proj"]
    peft_layer = peft_model.base_model.model.proj
    with torch.no_grad():
        peft_layer.lora_A["default"].weight.normal_()
        peft_layer.lora_B["default"].weight.normal_()
        layer.lora_A.weight.copy_(peft_layer.lora_A["default"].weight)
        layer.lora_B.weight.copy_(peft_layer.lora_B["default"].weight)
        if method == "dora":
            magnitude = peft_layer.lora_magnitude_vector["default"].weight
            magnitude.mul_(torch.rand_like(magnitude) + 0.5)
            layer.lora_magnitude_vector.copy_(magnitude)
    return peft_model, ours, layer


@pytest.mark.parametrize("method", ["lora", "dora"])
@pytest.mark.parametrize("conv1d", [False, True])
@pytest.mark.parametrize("rslora", [False, True])
def test_forward_and_merged_weight_match_peft(method, conv1d, rslora):
    peft_model, ours, layer = _random_adapter_pair(method, conv1d, rslora)
    x = torch.randn(4, 6, IN, dtype=torch.float64)
    peft_model.eval()
    ours.eval()
    torch.testing.assert_close(ours(x), peft_model(x), rtol=1e-12, atol=1e-12)
    assert not torch.allclose(ours(x), Net(conv1d).double()(x))  # the adapter does something

    ours_merged = layer.merged_weight()
    peft_merged = base_weight(peft_model.merge_and_unload().proj)
    torch.testing.assert_close(ours_merged, peft_merged, rtol=1e-12, atol=1e-12)


def test_merge_adapters_gives_plain_layer_with_same_output():
    _, ours, _ = _random_adapter_pair("dora", conv1d=True, rslora=False)
    x = torch.randn(3, IN, dtype=torch.float64)
    before = ours(x)
    merge_adapters(ours)
    assert isinstance(ours.proj, Conv1D)
    torch.testing.assert_close(ours(x), before, rtol=1e-12, atol=1e-12)


def test_dora_merged_weight_formula_per_output_row():
    torch.manual_seed(1)
    layer = DoRALinear(nn.Linear(IN, OUT).double(), r=R, alpha=6)
    nn.init.normal_(layer.lora_B.weight)
    w0 = layer.base_layer.weight
    v = w0 + (6 / R) * layer.lora_B.weight @ layer.lora_A.weight
    expected = layer.lora_magnitude_vector[:, None] * v / v.norm(dim=1, keepdim=True)
    torch.testing.assert_close(layer.merged_weight(), expected)
    torch.testing.assert_close(layer.merged_weight().norm(dim=1), layer.lora_magnitude_vector)


def _reference_grads(layer: DoRALinear, x, probe):
    """dL/dW' for L = sum(probe * (x W'^T + b)), by autograd on a float64 leaf W'."""
    w_prime = layer.merged_weight().detach().requires_grad_(True)
    loss = (probe * (x @ w_prime.T + layer.base_layer.bias)).sum()
    (grad_w_prime,) = torch.autograd.grad(loss, w_prime)
    return grad_w_prime


@pytest.mark.parametrize("detach_norm", [True, False])
def test_dora_gradients_follow_eq11_or_eq6(detach_norm):
    torch.manual_seed(2)
    layer = DoRALinear(nn.Linear(IN, OUT).double(), r=R, alpha=4, detach_norm=detach_norm)
    with torch.no_grad():
        layer.lora_B.weight.normal_()
        layer.lora_magnitude_vector.mul_(torch.rand(OUT, dtype=torch.float64) + 0.5)
    x = torch.randn(9, IN, dtype=torch.float64)
    probe = torch.randn(9, OUT, dtype=torch.float64)
    (probe * layer(x)).sum().backward()

    grad_w = _reference_grads(layer, x, probe)
    with torch.no_grad():
        s, a, b = layer.scaling, layer.lora_A.weight, layer.lora_B.weight
        m = layer.lora_magnitude_vector
        v = layer.direction_weight()
        c = v.norm(dim=1)
        grad_dv = (m / c)[:, None] * grad_w  # Eq. 11
        if not detach_norm:  # Eq. 6: project out the component along V'
            grad_dv = grad_dv - (m / c**3 * (grad_w * v).sum(1))[:, None] * v
        grad_m = (grad_w * v).sum(1) / c
    torch.testing.assert_close(layer.lora_B.weight.grad, s * grad_dv @ a.T)
    torch.testing.assert_close(layer.lora_A.weight.grad, s * b.T @ grad_dv)
    torch.testing.assert_close(layer.lora_magnitude_vector.grad, grad_m)


def test_functional_gradient_of_delta_v_differs_with_and_without_detach():
    torch.manual_seed(3)
    w0 = torch.randn(OUT, IN, dtype=torch.float64)
    m = torch.rand(OUT, dtype=torch.float64) + 0.5
    probe = torch.randn(OUT, IN, dtype=torch.float64)
    grads = {}
    for detach in (True, False):
        torch.manual_seed(4)
        dv = (0.3 * torch.randn(OUT, IN, dtype=torch.float64)).requires_grad_()
        (probe * dora_weight(w0, dv, m, detach_norm=detach)).sum().backward()
        c = (w0 + dv).detach().norm(dim=1)
        eq11 = (m / c)[:, None] * probe
        v = (w0 + dv).detach()
        eq6 = eq11 - (m / c**3 * (probe * v).sum(1))[:, None] * v
        torch.testing.assert_close(dv.grad, eq11 if detach else eq6)
        grads[detach] = dv.grad
    assert not torch.allclose(grads[True], grads[False])


@pytest.mark.parametrize("cls", [LoRALinear, DoRALinear])
def test_layer_equals_base_exactly_at_init(cls):
    torch.manual_seed(5)
    base = nn.Linear(IN, OUT)
    x = torch.randn(4, IN)
    expected = base(x)
    layer = cls(base, r=R, alpha=8)
    assert torch.equal(layer(x), expected)
    assert layer.lora_A.weight.abs().sum() > 0  # A is random, B is zero
    assert torch.count_nonzero(layer.lora_B.weight) == 0


def test_magnitude_only_trains_m_alone_and_matches_peft():
    peft_model, ours, layer = _random_adapter_pair("dora", conv1d=False, rslora=False)
    spec = AdapterSpec(
        method="dora", r=R, alpha=5, target_modules=(), magnitude_only_modules=("proj",)
    )
    torch.manual_seed(6)
    fresh = Net().double()
    fresh.load_state_dict(
        {k.replace("base_layer.", ""): v for k, v in ours.state_dict().items() if "lora" not in k}
    )
    mag_layer = inject_adapters(fresh, spec)["proj"]
    trainable = {n for n, p in fresh.named_parameters() if p.requires_grad}
    assert trainable == {"proj.lora_magnitude_vector"}
    with torch.no_grad():
        mag_layer.lora_magnitude_vector.mul_(1.5)
        peft_layer = peft_model.base_model.model.proj
        peft_layer.lora_A["default"].weight.zero_()
        peft_layer.lora_B["default"].weight.zero_()
        peft_layer.lora_magnitude_vector["default"].weight.copy_(mag_layer.lora_magnitude_vector)
    x = torch.randn(3, IN, dtype=torch.float64)
    torch.testing.assert_close(fresh(x), peft_model(x), rtol=1e-12, atol=1e-12)


def test_dropout_training_forward_matches_peft_formulation():
    """With dropout PEFT's DoRA keeps W0 x on the clean input; ours must too."""
    peft_model, ours, layer = _random_adapter_pair("dora", conv1d=False, rslora=False)
    layer.lora_dropout = nn.Dropout(0.5)
    peft_model.base_model.model.proj.lora_dropout["default"] = nn.Dropout(0.5)
    ours.train()
    peft_model.train()
    x = torch.randn(8, IN, dtype=torch.float64)
    torch.manual_seed(7)
    ours_out = ours(x)
    torch.manual_seed(7)
    torch.testing.assert_close(ours_out, peft_model(x), rtol=1e-12, atol=1e-12)


def test_detach_saves_memory_for_backward():
    from wdanalysis.train.memory import saved_tensor_bytes

    with_detach = saved_tensor_bytes(detach_norm=True, layers=2, width=64, tokens=8)
    without = saved_tensor_bytes(detach_norm=False, layers=2, width=64, tokens=8)
    assert with_detach < without


@pytest.mark.parametrize("conv1d", [False, True])
def test_fused_and_general_dora_paths_agree(conv1d):
    """The float64 fast path ((m/C)(W0 x + s B A x) + b) and PEFT's rescaled form (taken
    under bf16 or dropout) give the same output and gradients on the same layer."""
    _, _, layer = _random_adapter_pair("dora", conv1d, rslora=False, seed=3)
    x = torch.randn(4, 6, IN, dtype=torch.float64)
    outputs, grads = [], []
    for force_general in (False, True):
        layer.zero_grad()
        if force_general:  # an identity "dropout" module sends the forward down PEFT's path
            layer.lora_dropout = nn.Dropout(0.0)
        y = layer(x)
        (y * torch.linspace(-1, 2, y.shape[-1], dtype=y.dtype)).sum().backward()
        outputs.append(y.detach())
        grads.append([p.grad.clone() for p in (layer.lora_A.weight, layer.lora_B.weight)])
        grads[-1].append(layer.lora_magnitude_vector.grad.clone())
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-12, atol=1e-12)
    for fused, general in zip(*grads, strict=True):
        torch.testing.assert_close(fused, general, rtol=1e-12, atol=1e-12)
