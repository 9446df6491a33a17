"""Results do not depend on the engine's own choice of torch threads.

The engine runs its per-block work on one torch thread (``cpu_profile.one_torch_thread``).
The merges it does whole reproduce another library's float32 computation — PEFT's PiSSA
SVD and OLoRA QR of ``W0``, C3A's FFT, … — and MKL rounds those differently with 1 and 2
threads (a few 1e-7 of the result). They must run as PEFT ran them in this process, under
the caller's thread count: otherwise an untrained PiSSA adapter's ΔM was ≈ 4e-9 instead of
0 with 2 threads. Each test sets torch's thread count itself, so it checks this whatever
``OMP_NUM_THREADS`` the suite runs with.
"""

from __future__ import annotations

import copy

import pytest
import torch
from builders import check_table, llama_config, reference_delta

import wdanalysis
from wdanalysis.engine import adapter_sums, streaming

peft = pytest.importorskip("peft", reason="peft is not installed")
transformers = pytest.importorskip("transformers", reason="transformers is not installed")

from peft import C3AConfig, LoraConfig, PeftModel, get_peft_model  # noqa: E402

TARGETS = ["q_proj", "k_proj", "down_proj"]  # (64, 48), (32, 48), (48, 80): none square


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    config = llama_config(
        vocab_size=32, hidden_size=48, intermediate_size=80, num_key_value_heads=2, head_dim=16
    )
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("threads") / "base"
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    return folder


@pytest.fixture
def threads(request):
    """torch's intra-op thread count for the test (restored after)."""
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


def _spy(monkeypatch, module, name: str) -> list[int]:
    """Record torch's thread count at each call of ``module.name``."""
    seen, real = [], getattr(module, name)

    def spy(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, spy)
    return seen


def _save(base, folder, seed=None, config=None, **options):
    model = transformers.AutoModelForCausalLM.from_pretrained(base)
    config = config or LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, **options)
    tuned = get_peft_model(model, config)
    if seed is not None:  # a random step on the factors
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in tuned.parameters():
                if p.requires_grad:
                    p.add_(0.05 * torch.randn(p.shape, generator=gen))
    tuned.save_pretrained(folder)


@pytest.mark.parametrize("threads", [1, 2], indirect=True)
@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_untrained_base_changing_init_is_zero_whatever_the_threads(
    base, tmp_path, monkeypatch, threads, init
):
    """PEFT inits the adapter (SVD/QR of W0 in float32) under ``threads``; wdanalysis
    recomputes that init in its run and must find exactly no change."""
    seen = _spy(monkeypatch, streaming, "effective_weight")
    _save(base, tmp_path / "run" / "checkpoint-0", init_lora_weights=init)
    table = wdanalysis.compare(base, tmp_path / "run", modules=TARGETS)
    assert len(table) == 6 and seen == [threads] * 6
    assert (table["delta_m"] < 1e-12).all() and (table["delta_d"] < 1e-12).all()
    assert torch.get_num_threads() == threads  # restored after the run


@pytest.mark.parametrize("threads", [2], indirect=True)
def test_adapter_blocks_still_run_on_one_thread(base, tmp_path, monkeypatch, threads):
    """The streamed LoRA sums (issue 35's CPU per byte) keep the engine's one thread."""
    seen = _spy(monkeypatch, adapter_sums, "add_block")
    _save(base, tmp_path / "run" / "checkpoint-1", seed=1)
    table = wdanalysis.compare(base, tmp_path / "run", modules=TARGETS)
    assert len(table) == 6 and (table["delta_m"] > 0).all()
    assert seen and set(seen) == {1} and torch.get_num_threads() == threads


@pytest.mark.parametrize("threads", [2], indirect=True)
def test_c3a_equals_peft_merge_with_two_threads(base, tmp_path, threads):
    """C3A's delta is a float32 FFT (MKL: rounding per thread count), merged by PEFT."""
    folder = tmp_path / "run" / "checkpoint-1"
    _save(base, folder, seed=1, config=C3AConfig(target_modules=TARGETS, block_size=16))
    model = transformers.AutoModelForCausalLM.from_pretrained(base)
    start = copy.deepcopy(model).double()
    merged = PeftModel.from_pretrained(start, folder).double().merge_and_unload().state_dict()
    before = {k: v.double() for k, v in model.state_dict().items()}
    expected = {
        (None, None, k): reference_delta(before[k].numpy(), merged[k].numpy())
        for k in before
        if k.endswith(".weight") and not torch.equal(before[k], merged[k])
    }
    table = wdanalysis.compare(base, tmp_path / "run", modules=TARGETS)
    assert len(expected) == 6 and check_table(table, expected, rtol=1e-9, atol=1e-15) == 6
