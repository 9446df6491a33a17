"""Every store the engine reads satisfies the declared :class:`WeightStore` interface, and
``get_slice`` reads a part of a file only where the store returns tensors as stored."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from wdanalysis.engine.live_model import LiveStore
from wdanalysis.errors import CheckpointFormatError
from wdanalysis.loaders.formats.foreign import ViewStore, transposed
from wdanalysis.loaders.formats.mlxquant import DequantizedStore
from wdanalysis.loaders.formats.moe import ExpertStore, expert_key
from wdanalysis.loaders.formats.openclip import ClipViewStore, clip_views
from wdanalysis.storage.store_protocol import WeightStore
from wdanalysis.storage.tensor_store import TensorStore, open_tensor_file

FUSED = "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"
STACK = "layers.0.switch_mlp.gate_proj.weight"


@pytest.fixture
def file_store(tmp_path) -> TensorStore:
    gen = torch.Generator().manual_seed(0)
    tensors = {
        "w": torch.randn(4, 3, generator=gen),
        STACK: torch.randn(2, 4, 3, generator=gen),  # (experts, out, in)
        FUSED: torch.randn(6, 2, generator=gen),  # OpenCLIP's stacked q/k/v
    }
    save_file(tensors, tmp_path / "model.safetensors")
    return open_tensor_file(tmp_path / "model.safetensors")


def every_store(file_store: TensorStore) -> dict[str, object]:
    """One real instance of each store class, over ``file_store``'s file."""
    view = ViewStore.over(file_store, "view")
    view.add("w.T", "w", (3, 4), transposed)
    return {
        "TensorStore": file_store,
        "LiveStore": LiveStore(file_store.path, {"w": torch.ones(4, 3)}),
        "DequantizedStore": DequantizedStore(file_store.path, "mlx", dict(file_store.infos)),
        "ExpertStore": ExpertStore.split(file_store, {STACK}),
        "ViewStore": view,
        "ClipViewStore": ClipViewStore.over(file_store, clip_views(file_store)),
    }


def test_every_store_satisfies_the_protocol(file_store):
    for name, store in every_store(file_store).items():
        assert isinstance(store, WeightStore), name
        for key in store.keys():  # and the members do what the engine expects of them
            assert key in store, name
            assert tuple(store.get(key).shape) == tuple(store.shape(key)), (name, key)
            assert store.get(key).dtype == store.dtype(key), (name, key)
            if key in store.infos:
                assert store.infos[key].shape == store.shape(key), (name, key)


def test_the_protocol_check_fails_for_a_missing_member(file_store):
    members = {
        "path": file_store.path,
        "format": "fake",
        "infos": {},
        "keys": lambda self: [],
        "__contains__": lambda self, key: False,
        "shape": lambda self, key: (),
        "dtype": lambda self, key: torch.float32,
        "get": lambda self, key: torch.zeros(()),
    }
    assert isinstance(type("Whole", (), members)(), WeightStore)
    for missing in members:
        partial = {name: v for name, v in members.items() if name != missing}
        assert not isinstance(type("Partial", (), partial)(), WeightStore), missing


def test_only_a_plain_file_store_reads_as_stored(file_store):
    # The old rule was ``type(store) is TensorStore``: every subclass transforms on read.
    for name, store in every_store(file_store).items():
        if isinstance(store, TensorStore):
            assert store.reads_as_stored is (type(store) is TensorStore), name


def test_an_expert_is_a_slice_of_the_stack_whatever_the_source(file_store, tmp_path):
    stack = file_store.get(STACK)
    assert torch.equal(file_store.get_slice(STACK, 1), stack[1])
    experts = ExpertStore.split(file_store, {STACK})
    assert torch.equal(experts.get(expert_key(STACK, 1)), stack[1])
    # A store that transforms on read is indexed after its own ``get``.
    dequantized = DequantizedStore(file_store.path, "mlx", dict(file_store.infos))
    assert torch.equal(ExpertStore.split(dequantized, {STACK}).get(expert_key(STACK, 0)), stack[0])
    # .bin files have no slices: the tensor is read whole, then indexed.
    torch.save({STACK: stack}, tmp_path / "model.bin")
    bin_store = open_tensor_file(tmp_path / "model.bin")
    assert torch.equal(ExpertStore.split(bin_store, {STACK}).get(expert_key(STACK, 1)), stack[1])


def test_a_slice_of_a_damaged_file_is_a_one_line_error(file_store):
    experts = ExpertStore.split(file_store, {STACK})
    file_store.path.write_bytes(b"not a safetensors file any more")
    with pytest.raises(CheckpointFormatError) as caught:
        experts.get(expert_key(STACK, 0))
    assert caught.value.path == file_store.path
    assert caught.value.problem.startswith(f"cannot read tensor {STACK!r}: ")
    assert "\n" not in str(caught.value)
