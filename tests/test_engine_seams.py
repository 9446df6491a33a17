"""The engine's seams: failures are returned by ``Engine.run`` (never written into the
checkpoints it was given), jobs are typed by where their rows come from, and the adapter
module, not the engine, says which layouts are merged whole."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from safetensors.torch import save_file

from wdanalysis.engine.jobs import AdapterJob, DenseJob, FileJob, MergedJob, UnchangedJob, plan_job
from wdanalysis.engine.streaming import Engine
from wdanalysis.errors import NumericalError
from wdanalysis.loaders.checkpoint_kinds import AdapterCheckpoint
from wdanalysis.loaders.formats.foreign import ForeignModule
from wdanalysis.loaders.peft_adapter import Adapter, AdapterConfig, AdapterModule
from wdanalysis.loaders.runs import Run, open_base, open_checkpoint
from wdanalysis.weights.bound_checkpoint import BoundCheckpoint

KEYS = ("layers.0.q_proj.weight", "layers.1.q_proj.weight")


def save(path, state):
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


@pytest.fixture
def models(tmp_path):
    gen = torch.Generator().manual_seed(0)
    base = {key: torch.randn(6, 4, generator=gen) for key in KEYS}
    good = {key: w + 0.01 * torch.randn(6, 4, generator=gen) for key, w in base.items()}
    bad = {key: w.clone() for key, w in good.items()}
    bad[KEYS[1]][0, 0] = float("inf")  # found on the second weight only
    (tmp_path / "dense").mkdir()
    torch.save(good, tmp_path / "dense" / "model.bin")  # .bin: read whole, not streamed
    return (
        open_base(save(tmp_path / "base" / "model.safetensors", base)),
        [
            open_checkpoint(save(tmp_path / "good" / "model.safetensors", good)),
            open_checkpoint(save(tmp_path / "bad" / "model.safetensors", bad)),
            open_checkpoint(tmp_path / "dense" / "model.bin"),
        ],
    )


def bind(checkpoints) -> list[BoundCheckpoint]:
    run = Run(checkpoints[0].path, "run", list(checkpoints))
    return [BoundCheckpoint(run, c, "FT", {k: k for k in KEYS}) for c in checkpoints]


def test_failures_are_returned_and_results_still_reported(models):
    base, checkpoints = models
    bound = bind(checkpoints)
    before = [dict(vars(item)) for item in bound]
    seen = []
    failures = Engine(base, bound, "out", lambda key: False).run(
        list(KEYS), lambda key, item, change: seen.append((key, bound.index(item), change))
    )
    assert list(failures) == [1] and isinstance(failures[1], NumericalError)
    assert "holds 1 NaN/Inf value(s)" in str(failures[1])
    # one call per (weight, checkpoint), the failed one with None from its failure on
    assert [(key, i) for key, i, _ in seen] == [(k, i) for k in KEYS for i in range(3)]
    assert [i for _, i, change in seen if change is None] == [1]
    for item, fields in zip(bound, before, strict=True):  # the inputs are untouched
        assert vars(item).keys() == fields.keys()
        assert all(vars(item)[name] is value for name, value in fields.items())
    assert "error" not in {f.name for f in dataclasses.fields(BoundCheckpoint)}


def test_a_run_starts_with_no_failures(models):
    base, checkpoints = models
    engine = Engine(base, bind(checkpoints[:1]), "out", lambda key: False)
    engine.failures[0] = NumericalError("left over")
    assert engine.run(list(KEYS), lambda *args: None) == {}


def test_jobs_are_typed_by_where_rows_come_from(models):
    base, checkpoints = models
    full = bind([checkpoints[0], checkpoints[2]])
    assert isinstance(plan_job(0, full[0], KEYS[0], "out", False), FileJob)
    assert isinstance(plan_job(1, full[1], KEYS[0], "out", False), DenseJob)  # .bin
    lora = AdapterModule("layers.0.q_proj", lora_a="a", lora_b="b")
    dora = AdapterModule("layers.0.q_proj", lora_a="a", lora_b="b", magnitude="m")
    saved = AdapterModule("layers.0.q_proj", replacement="w")
    config = AdapterConfig("peft", r=None, lora_alpha=None)
    ckpt = AdapterCheckpoint(base.path, Adapter(base.path, base.store, config, {}))
    for module, kind in ((lora, AdapterJob), (dora, AdapterJob), (saved, MergedJob)):
        item = BoundCheckpoint(full[0].run, ckpt, "LoRA", {KEYS[0]: module})
        job = plan_job(0, item, KEYS[0], "out", False)
        assert type(job) is kind
        if kind is AdapterJob:
            assert job.dora is (module is dora)
        assert type(plan_job(0, item, KEYS[1], "out", False)) is UnchangedJob  # not adapted


@pytest.mark.parametrize(
    "fields, axis, transposed, whole",
    [
        ({"lora_b": "b"}, "out", False, False),
        ({"lora_b": "b"}, "in", True, False),
        ({}, "out", False, True),  # a whole saved weight
        ({"lora_b": "b", "saved_base": "v"}, "out", False, True),  # VL-BART weight_v
        ({"magnitude": "m"}, "in", True, True),  # DoRA on the input axis of (in, out)
        ({"magnitude": "m"}, "in", False, False),
        ({"lora_b": "b", "embedding": True}, "out", False, True),
        ({"lora_b": "b", "embedding": True}, "out", True, False),
    ],
)
def test_the_module_says_when_it_is_merged_whole(fields, axis, transposed, whole):
    assert AdapterModule("m", **fields).merged_whole(axis, transposed) is whole
    assert ForeignModule("m", **fields).merged_whole(axis, transposed) is whole


def test_a_magnitude_per_input_channel_is_merged_whole():
    module = ForeignModule("m", lora_b="b", magnitude="m", magnitude_axis="in")
    assert module.merged_whole("out", False)
    assert not ForeignModule("m", lora_b="b", magnitude="m").merged_whole("out", False)


def test_tracking_stops_at_the_models_first_failure(tmp_path):
    from torch import nn

    from wdanalysis.tracking.tracker import Tracker

    torch.manual_seed(0)
    model = nn.Module()
    model.layers = nn.ModuleList(nn.Module() for _ in KEYS)
    for layer in model.layers:
        layer.q_proj = nn.Linear(4, 6, bias=False)
    save(tmp_path / "base" / "model.safetensors", model.state_dict())
    tracker = Tracker(tmp_path / "base", tmp_path / "tracking.csv", every=1)
    tracker.begin(model, step=0)
    with torch.no_grad():
        model.layers[1].q_proj.weight[0, 0] = float("nan")
    with pytest.warns(RuntimeWarning, match="weight tracking stopped.*1 NaN/Inf"):
        assert tracker.track(1) is False
    assert isinstance(tracker.failure, NumericalError) and not tracker.active
    assert not (tmp_path / "tracking.csv").exists()  # nothing half-written
