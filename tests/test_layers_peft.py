"""Conv and embedding layers (issue 11): PEFT LoRA/DoRA adapters and FT checkpoints.

The adapters are built and saved by PEFT itself (``get_peft_model`` + ``save_pretrained``)
on ``nn.Conv1d/2d/3d`` and ``nn.Embedding`` layers with non-square weights and every LoRA
factor randomised; the ground truth is PEFT's own ``merge_and_unload`` on a float64 copy
of the model loaded back from the saved files, and ΔM/ΔD are computed from it by
``builders.reference_delta`` (numpy, explicit norms). The conventions under test:

* conv: vectors are rows of ``W.reshape(out, -1)`` (``--axis out``), columns for ``in``;
* embedding ``(num_embeddings, embedding_dim)``: vectors are its columns (one per
  embedding dimension, PEFT's DoRA magnitude axis) for ``out``, its rows for ``in``.
"""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import pytest
import torch
from builders import check_table, reference_delta
from safetensors.torch import save_file
from torch import nn

import wdanalysis
import wdanalysis.cli
from wdanalysis.errors import WDAnalysisError

peft = pytest.importorskip("peft", reason="peft is a test dependency (pip install peft)")

# leaf → (kind) of every layer under test; shapes chosen so that out ≠ in·k everywhere.
CONVS = ("c1", "c2", "c3", "pw")
EMBEDDINGS = ("tok",)
LAYERS = CONVS + EMBEDDINGS


class Net(nn.Module):
    def __init__(self, in_channels: int = 3):
        super().__init__()
        self.tok = nn.Embedding(11, 6)  # (11, 6): 6 embedding dims, 11 tokens
        self.c1 = nn.Conv1d(in_channels, 5, 3)  # (5, 3, 3) → (5, 9)
        self.c2 = nn.Conv2d(in_channels, 4, (3, 2))  # (4, 3, 3, 2) → (4, 18)
        self.c3 = nn.Conv3d(2, 3, (1, 2, 2))  # (3, 2, 1, 2, 2) → (3, 8)
        self.pw = nn.Conv2d(6, 4, 1)  # 1×1: PEFT's matmul branch, (4, 6)


def base_model(seed: int = 0, **kwargs) -> Net:
    torch.manual_seed(seed)
    return Net(**kwargs)


def save_base(model: nn.Module, folder: Path) -> Path:
    folder.mkdir(parents=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / "model.safetensors"))
    return folder


def randomize(peft_model, seed: int) -> None:
    """Every LoRA factor random and non-zero (PEFT zeroes lora_B / lora_embedding_A at
    init), every DoRA magnitude moved off the base norms."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_magnitude_vector" in name:
                param.mul_(1 + 0.2 * torch.randn(param.shape, generator=gen))
            elif "lora_" in name:
                param.copy_(0.3 * torch.randn(param.shape, generator=gen))


def peft_adapter(base: Net, folder: Path, seed: int, **config) -> dict[str, torch.Tensor]:
    """Save a randomised PEFT adapter; return PEFT's own float64 merge of the saved files."""
    config = {"r": 2, "lora_alpha": 5, "target_modules": list(LAYERS), **config}
    model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**config))
    randomize(model, seed)
    model.save_pretrained(str(folder))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base).double(), str(folder))
    merged = loaded.merge_and_unload().state_dict()
    return {k: v.detach().clone() for k, v in merged.items()}


def reference(w0: torch.Tensor, wt: torch.Tensor, leaf: str, axis: str) -> tuple[float, float]:
    """ΔM, ΔD by the conventions in the module docstring (numpy float64 reference)."""
    if leaf in EMBEDDINGS:  # (num_embeddings, embedding_dim) is PEFT's (in, out)
        return reference_delta(w0, wt, axis, transposed=True)
    return reference_delta(w0.reshape(w0.shape[0], -1), wt.reshape(wt.shape[0], -1), axis)


def expected_rows(base: Net, merged: dict, run: str, axis: str) -> dict:
    w0 = base.state_dict()
    return {
        (run, None, f"{leaf}.weight"): reference(
            w0[f"{leaf}.weight"], merged[f"{leaf}.weight"], leaf, axis
        )
        for leaf in LAYERS
    }


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One base; PEFT LoRA and DoRA (rsLoRA, a rank pattern) and FT checkpoints of it."""
    root = tmp_path_factory.mktemp("layers")
    base = base_model()
    base_dir = save_base(base, root / "base")
    merged = {
        "LoRA": peft_adapter(base, root / "lora", seed=1),
        "DoRA": peft_adapter(
            base, root / "dora", seed=2, use_dora=True, use_rslora=True, rank_pattern={"c2": 3}
        ),
    }
    ft = base_model()
    with torch.no_grad():
        for param in ft.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=torch.Generator().manual_seed(3)))
    save_base(ft, root / "ft")
    merged["FT"] = {k: v.double() for k, v in ft.state_dict().items()}
    paths = {"LoRA": root / "lora", "DoRA": root / "dora", "FT": root / "ft"}
    return base, base_dir, paths, merged


@pytest.mark.parametrize("axis", ["out", "in"])
def test_conv_and_embedding_match_peft_merge(runs, axis):
    base, base_dir, paths, merged = runs
    table = wdanalysis.compare(base_dir, paths, modules=list(LAYERS), axis=axis, progress=False)
    expected = {}
    for run, path in paths.items():  # table rows are named after the run folders
        expected.update(expected_rows(base, merged[run], path.name, axis))
    assert check_table(table, expected, rtol=1e-9, atol=1e-15) == 3 * len(LAYERS)
    assert set(table["method"]) == {"FT", "LoRA", "DoRA"}
    # vector counts: conv rows (out) / in·k columns; embedding columns (out) / tokens (in)
    counts = dict(zip(table["parameter"], table["n_vectors"], strict=False))
    out_in = {"c1": (5, 9), "c2": (4, 18), "c3": (3, 8), "pw": (4, 6), "tok": (6, 11)}
    for leaf, (n_out, n_in) in out_in.items():
        assert counts[f"{leaf}.weight"] == (n_out if axis == "out" else n_in)


def test_dora_magnitudes_are_peft_shapes(runs):
    """PEFT stores conv magnitudes (1, out, 1, …) and embedding magnitudes (embedding_dim,)."""
    from safetensors import safe_open

    _, _, paths, _ = runs
    with safe_open(str(paths["DoRA"] / "adapter_model.safetensors"), "pt") as handle:
        shapes = {k: tuple(handle.get_slice(k).get_shape()) for k in handle.keys()}
    assert shapes["base_model.model.c2.lora_magnitude_vector"] == (1, 4, 1, 1)
    assert shapes["base_model.model.c3.lora_magnitude_vector"] == (1, 3, 1, 1, 1)
    assert shapes["base_model.model.tok.lora_magnitude_vector"] == (6,)
    assert shapes["base_model.model.tok.lora_embedding_A"] == (2, 11)
    assert shapes["base_model.model.c2.lora_B.weight"] == (4, 3, 1, 1)  # rank_pattern c2: 3


def test_ft_conv_from_bin_matches(runs, tmp_path):
    """A full fine-tuned conv checkpoint read whole (.bin, no pread streaming)."""
    base, base_dir, _, merged = runs
    folder = tmp_path / "ft-bin"
    folder.mkdir()
    state = {k: v.float() for k, v in merged["FT"].items()}
    torch.save(state, folder / "pytorch_model.bin")
    table = wdanalysis.compare(base_dir, {"FT": folder}, modules=list(CONVS), progress=False)
    expected = {
        k: v
        for k, v in expected_rows(base, merged["FT"], "ft-bin", "out").items()
        if k[2] != "tok.weight"
    }
    assert check_table(table, expected, rtol=1e-9, atol=1e-15) == len(CONVS)


def test_inspect_reads_conv_dora(runs, capsys):
    _, _, paths, _ = runs
    assert wdanalysis.cli.main(["inspect", str(paths["DoRA"])]) == 0
    assert "DoRA" in capsys.readouterr().out


# ---------------------------------------------------------------------------- bad input


def one_line_error(call, *words: str) -> str:
    with pytest.raises(WDAnalysisError) as caught:
        call()
    message = str(caught.value)
    assert "\n" not in message
    for word in words:
        assert word in message, message
    return message


def test_conv_adapter_for_another_model_is_one_line(tmp_path, runs):
    """A conv adapter trained on 2 input channels, against a base with 3."""
    _, base_dir, _, _ = runs
    other = base_model(in_channels=2)
    peft_adapter(other, tmp_path / "other", seed=4, target_modules=["c1", "c2"])
    one_line_error(
        lambda: wdanalysis.compare(base_dir, tmp_path / "other", modules=["c2"], progress=False),
        "does not fit the base weight",
        str(tmp_path / "other"),
    )


def test_grouped_conv_adapter_refused_like_peft(tmp_path):
    """PEFT trains conv LoRA with groups > 1 but cannot merge it; we refuse it by name."""

    class Grouped(nn.Module):
        def __init__(self):
            super().__init__()
            self.g = nn.Conv2d(4, 6, 3, groups=2)

    torch.manual_seed(0)
    model = Grouped()
    base_dir = save_base(model, tmp_path / "base")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        adapter = peft.get_peft_model(
            copy.deepcopy(model), peft.LoraConfig(r=2, target_modules=["g"])
        )
        with pytest.raises(NotImplementedError):  # PEFT itself
            copy.deepcopy(adapter).merge_and_unload()
    adapter.save_pretrained(str(tmp_path / "grouped"))
    one_line_error(
        lambda: wdanalysis.compare(base_dir, tmp_path / "grouped", modules=["g"], progress=False),
        "grouped convolution",
        "PEFT cannot merge it",
    )


def test_embedding_adapter_on_a_conv_weight(tmp_path, runs):
    """Embedding factors whose module is a conv kernel in this base: refused by name."""
    _, base_dir, paths, _ = runs
    folder = tmp_path / "renamed"
    folder.mkdir()
    config = json.loads((paths["LoRA"] / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps(config))
    a = torch.randn(2, 11)
    b = torch.randn(6, 2)
    save_file(
        {"base_model.model.c2.lora_embedding_A": a, "base_model.model.c2.lora_embedding_B": b},
        str(folder / "adapter_model.safetensors"),
    )
    one_line_error(
        lambda: wdanalysis.compare(base_dir, folder, modules=["c2"], progress=False),
        "not an embedding table",
    )


@pytest.mark.parametrize("fan_in_fan_out", [True, False])
def test_layout_override_leaves_conv_and_embedding_alone(runs, fan_in_fan_out):
    """``--fan-in-fan-out`` is about Linear/Conv1D weights: conv kernels are never (in, out)
    and embeddings always are, so forcing it changes nothing here."""
    base, base_dir, paths, merged = runs
    chosen = {"DoRA": paths["DoRA"]}
    table = wdanalysis.compare(
        base_dir, chosen, modules=list(LAYERS), fan_in_fan_out=fan_in_fan_out, progress=False
    )
    expected = expected_rows(base, merged["DoRA"], paths["DoRA"].name, "out")
    assert check_table(table, expected, rtol=1e-9, atol=1e-15) == len(LAYERS)


def test_ft_embedding_named_like_one_uses_embedding_columns(tmp_path):
    """Without an adapter to say so, a weight named ``embed_tokens`` is an embedding."""
    torch.manual_seed(5)
    w0 = torch.randn(11, 6)
    wt = w0 + 0.1 * torch.randn(11, 6)
    for name, weight in (("base", w0), ("ft", wt)):
        (tmp_path / name).mkdir()
        save_file({"model.embed_tokens.weight": weight}, str(tmp_path / name / "model.safetensors"))
    table = wdanalysis.compare(
        tmp_path / "base", tmp_path / "ft", modules=["embed_tokens"], progress=False
    )
    expected = {("ft", None, "model.embed_tokens.weight"): reference_delta(w0, wt, transposed=True)}
    assert check_table(table, expected, rtol=1e-9, atol=1e-15) == 1
    assert table["n_vectors"].tolist() == [6]


def test_conv3d_kernel_1x1xk_matches_peft_forward(tmp_path):
    """PEFT's own merge fails on a Conv3d kernel (1, 1, k) (its 1×1 shortcut looks at two
    kernel dims only), but its forward is well defined: our merged weight reproduces it."""
    from torch.nn import functional as F

    from wdanalysis.loaders.runs import aligner_for, open_base, open_checkpoint

    class Net3(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = nn.Conv3d(2, 3, (1, 1, 2))

        def forward(self, x):
            return self.c(x)

    torch.manual_seed(6)
    model = Net3().double()
    base_dir = save_base(model, tmp_path / "base")
    for dora in (False, True):
        folder = tmp_path / f"adapter{int(dora)}"
        wrapped = peft.get_peft_model(
            copy.deepcopy(model), peft.LoraConfig(r=2, target_modules=["c"], use_dora=dora)
        )
        randomize(wrapped, seed=7)
        wrapped.save_pretrained(str(folder))
        base, adapter = open_base(base_dir), open_checkpoint(folder).adapter
        shapes = {k: base.store.shape(k) for k in base.store.keys()}
        module = adapter.bind(aligner_for(base), shapes, lambda key: False)["c.weight"]
        merged = adapter.effective_weight(module, base.store.get("c.weight"), False)
        x = torch.randn(2, 2, 3, 4, 5, dtype=torch.float64)
        with torch.no_grad():
            expected = wrapped(x)
        assert torch.allclose(F.conv3d(x, merged, model.c.bias), expected, rtol=1e-10, atol=1e-12)
