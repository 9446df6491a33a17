"""Memory stays bounded where whole matrices used to be built: a ``modules_to_save`` weight
is streamed from the adapter file in row blocks, trainable tokens compare only their rows,
and a stacked expert weight whose single row exceeds a block is streamed in pieces.

Each test shrinks the engine's block size so that tiny tensors take many blocks, records
every read the engine schedules and the size of its buffers, forbids the whole-matrix merge,
and checks the numbers against an independent float64 computation (PEFT's own merge for
``modules_to_save``). Peak RSS at real sizes: ``benchmarks/bench_memory.py``.
"""

from __future__ import annotations

import pytest
import torch
from builders import check_table, reference_delta
from safetensors.torch import save_file

import wdanalysis
from wdanalysis.engine import jobs, streaming
from wdanalysis.loaders.peft_adapter import Adapter

BLOCK = 384  # bytes per read: a few rows of the tiny matrices below


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks of ``BLOCK`` bytes; returns the reads scheduled and the buffer sizes."""
    monkeypatch.setattr(streaming, "MIN_BLOCK", BLOCK)
    monkeypatch.setattr(streaming, "MAX_BLOCK", BLOCK)
    monkeypatch.setattr(streaming, "MEMORY_BUDGET", 8 * BLOCK)
    seen = {"reads": [], "buffers": []}
    slice_request = streaming.slice_request

    def recording(extent, rows, start, n):
        request = slice_request(extent, rows, start, n)
        seen["reads"].append(request)
        return request

    class Reader(streaming.Reader):
        def __init__(self, requests, n_buffers, size, pin, *args):
            seen["buffers"].append(size)
            super().__init__(requests, n_buffers, size, pin, *args)

    monkeypatch.setattr(streaming, "slice_request", recording)
    monkeypatch.setattr(streaming, "Reader", Reader)
    monkeypatch.setattr(Adapter, "effective_weight", _no_whole_merge)
    return seen


def _no_whole_merge(*args):
    raise AssertionError("the whole-matrix merge ran")


def test_modules_to_save_streams_from_the_adapter_file(tmp_path, small_blocks):
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=40,
        hidden_size=24,
        intermediate_size=40,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "base")
    model = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "base")
    w0 = model.lm_head.weight.detach().double().clone()
    lora = peft.LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"])
    tuned = peft.get_peft_model(model, lora)
    with torch.no_grad():
        for p in tuned.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    tuned.save_pretrained(tmp_path / "adapter")
    wt = tuned.merge_and_unload().lm_head.weight.detach().double()
    for axis in ("out", "in"):
        table = wdanalysis.compare(
            tmp_path / "base",
            [tmp_path / "adapter"],
            modules=["lm_head"],
            axis=axis,
            progress=False,
        )
        expected = {(None, None, "lm_head.weight"): reference_delta(w0, wt, axis)}
        assert check_table(table, expected, rtol=1e-9, atol=1e-15) == 1
    adapter_reads = [r for r in small_blocks["reads"] if r[0].parent.name == "adapter"]
    assert len(adapter_reads) >= 40 // (BLOCK // (24 * 4))  # in row blocks, not whole
    assert max(r[2] for r in small_blocks["reads"]) <= BLOCK
    assert table.attrs["backend"].startswith(("fused C kernel", "torch"))


@pytest.mark.parametrize("axis", ["out", "in"])
def test_stacked_experts_of_ft_runs_stream_in_pieces(tmp_path, small_blocks, axis):
    """(experts, out, in): one stored row is 40·24 values, 20× a block in float64."""
    key = "model.layers.0.block_sparse_moe.switch_mlp.gate_proj.weight"
    gen = torch.Generator().manual_seed(2)
    w0 = torch.randn(3, 40, 24, generator=gen).to(torch.bfloat16)
    wt = w0.double() + 0.02 * torch.randn(3, 40, 24, generator=gen, dtype=torch.float64)
    for name, value in (("base", w0), ("ft", wt.to(torch.bfloat16))):
        (tmp_path / name).mkdir()
        save_file({key: value}, str(tmp_path / name / "model.safetensors"))
    table = wdanalysis.compare(
        tmp_path / "base", [tmp_path / "ft"], modules=["gate_proj"], axis=axis, progress=False
    )
    matrix = (w0.reshape(3, -1), wt.to(torch.bfloat16).reshape(3, -1))
    assert check_table(table, {(None, None, key): reference_delta(*matrix, axis)}) == 1
    assert table["n_vectors"].iloc[0] == (3 if axis == "out" else 40 * 24)
    assert max(small_blocks["buffers"]) <= BLOCK
    assert max(r[2] for r in small_blocks["reads"]) <= BLOCK


def test_trainable_tokens_compare_only_their_rows(monkeypatch):
    """A TokenJob's sums: the base's Σa², and Σa·d, Σd² of the trained rows alone."""
    gen = torch.Generator().manual_seed(3)
    table = torch.randn(30, 6, generator=gen, dtype=torch.float64)
    rows = torch.randn(2, 6, generator=gen, dtype=torch.float64)
    module = type("M", (), {"token_indices": (4, -3), "token_rows": "t"})()
    job = jobs.TokenJob(0, module, n_rows=30)
    job.load_factors(type("S", (), {"get": lambda self, name: rows})(), torch.device("cpu"))
    for mode, n in (("rows", 30), ("cols", 6)):
        job.sums = torch.zeros(3, n, dtype=torch.float64)
        for start in range(0, 30, 7):  # blocks of 7 rows
            job.accumulate(table[start : start + 7], start, mode, "torch")
        new = table.clone()
        new[[4, 27]] = rows
        d = new - table
        dim = 1 if mode == "rows" else 0
        assert torch.allclose(job.sums[1], (table * d).sum(dim), rtol=1e-12, atol=1e-15)
        assert torch.allclose(job.sums[2], (d * d).sum(dim), rtol=1e-12, atol=1e-15)
