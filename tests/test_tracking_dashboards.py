"""Live ΔM/ΔD on the dashboards ``report_to`` names, read back with each library's reader.

One ``Trainer`` run reports to TensorBoard, W&B (offline) and MLflow (a local ``file:``
store) at once; no server, no network. Each must hold, per module and tracked step, the
layer means of ΔM and ΔD and the across-layer Pearson r, computed here from the tracking
table with numpy, and at the end one Figure-2 image per module.
"""

from __future__ import annotations

import json
import struct
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
pytest.importorskip("tensorboard")
wandb = pytest.importorskip("wandb")
mlflow = pytest.importorskip("mlflow")

from test_tracking_qlora import _Data, tiny_llama_config  # noqa: E402

from wdanalysis import WeightDecompositionCallback  # noqa: E402

MODULES = ["q_proj", "k_proj"]
STEPS = [2, 4]


@pytest.fixture(scope="module")
def dashboard_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dashboards")
    config = tiny_llama_config()
    config.num_hidden_layers = 3  # three layers: a Pearson r that is not just ±1
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp / "base")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("WANDB_MODE", "offline")
        patch.setenv("WANDB_SILENT", "true")
        patch.setenv("WANDB_DIR", str(tmp))
        patch.setenv("WANDB_PROJECT", "wdanalysis-test")
        patch.setenv("MLFLOW_TRACKING_URI", (tmp / "mlruns").as_uri())
        patch.setenv("MLFLOW_EXPERIMENT_NAME", "wdanalysis-test")
        patch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # mlflow 3: file store opt-in
        patch.delenv("TENSORBOARD_LOGGING_DIR", raising=False)
        model = transformers.LlamaForCausalLM.from_pretrained(tmp / "base")
        lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=MODULES, use_dora=True)
        model = peft.get_peft_model(model, lora)
        out = tmp / "tracking.csv"
        callback = WeightDecompositionCallback(tmp / "base", every=2, out=out, modules=MODULES)
        args = transformers.TrainingArguments(
            output_dir=str(tmp / "run"),
            max_steps=4,
            per_device_train_batch_size=4,
            learning_rate=2e-2,
            save_strategy="no",
            logging_steps=2,
            report_to=["tensorboard", "wandb", "mlflow"],
            use_cpu=True,
            disable_tqdm=True,
            seed=0,
        )
        trainer = transformers.Trainer(
            model=model, args=args, train_dataset=_Data(), callbacks=[callback]
        )
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            trainer.train()
            wandb.finish()
    said = [
        str(w.message)
        for w in seen
        if "wdanalysis" in str(w.message) or "tracking" in str(w.message)
    ]
    assert not said, said
    return tmp, pd.read_csv(out)


def _expected(table: pd.DataFrame) -> dict[tuple[str, int], float]:
    """Per (tag, step): layer means and the Pearson r, written out with numpy."""
    want = {}
    for (module, step), group in table.groupby(["module", "step"]):
        group = group.sort_values("layer")
        assert len(group) == 3
        prefix = f"wdanalysis/{module}"
        want[f"{prefix}/delta_m", step] = float(np.mean(group["delta_m"]))
        want[f"{prefix}/delta_d", step] = float(np.mean(group["delta_d"]))
        r = np.corrcoef(group["delta_d"], group["delta_m"])[0, 1]
        want[f"{prefix}/pearson_r", step] = float(r)
        # the Trainer's AdamW: S is known, so the learned ΔM is logged beside ΔM (issue 36)
        assert group["delta_m_learned"].notna().all()
        want[f"{prefix}/delta_m_learned", step] = float(np.mean(group["delta_m_learned"]))
        r = np.corrcoef(group["delta_d"], group["delta_m_learned"])[0, 1]
        want[f"{prefix}/pearson_r_learned", step] = float(r)
    assert len(want) == 5 * len(MODULES) * len(STEPS)
    return want


def _check(got: dict[tuple[str, int], float], table: pd.DataFrame) -> None:
    want = _expected(table)
    assert set(got) == set(want)
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-6, abs=1e-12), key


def test_tensorboard_holds_the_scalars_and_the_figures(dashboard_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tmp, table = dashboard_run
    events = EventAccumulator(str(tmp / "run" / "runs" / "wdanalysis"), size_guidance={"images": 0})
    events.Reload()
    tags = events.Tags()
    got = {
        (tag, event.step): event.value for tag in tags["scalars"] for event in events.Scalars(tag)
    }
    _check(got, table)
    assert sorted(tags["images"]) == [f"wdanalysis/{m}/figure2" for m in sorted(MODULES)]
    image = events.Images("wdanalysis/q_proj/figure2")[-1]
    assert image.step == 4 and image.width > 100 and image.height > 100
    assert image.encoded_image_string.startswith(b"\x89PNG")


def test_mlflow_holds_the_scalars_and_the_figures(dashboard_run):
    tmp, table = dashboard_run
    client = mlflow.MlflowClient(tracking_uri=(tmp / "mlruns").as_uri())
    experiment = client.get_experiment_by_name("wdanalysis-test")
    (run,) = client.search_runs([experiment.experiment_id])
    tags = [k for k in run.data.metrics if k.startswith("wdanalysis/")]
    got = {
        (tag, m.step): m.value
        for tag in tags
        for m in client.get_metric_history(run.info.run_id, tag)
    }
    _check(got, table)
    names = {a.path for a in client.list_artifacts(run.info.run_id, "wdanalysis")}
    assert names == {f"wdanalysis/figure2_{m}.png" for m in MODULES}


def _wandb_records(path: Path):
    """The records of a ``.wandb`` file: W&B's LevelDB-style log of its own protobufs.

    wandb 0.31 ships no Python reader for it (the datastore moved into wandb-core), so the
    framing is read here: a 7-byte file header (``:W&B``, magic, version), then 32 KiB
    blocks of chunks (CRC32C, length, type FULL/FIRST/MIDDLE/LAST) carrying ``Record``s.
    """
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, pending = 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # too little room left for a chunk header: padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 0 and length == 0:
            continue
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


def test_wandb_offline_run_holds_the_scalars_and_the_figures(dashboard_run):
    tmp, table = dashboard_run
    (path,) = (tmp / "wandb").glob("offline-run-*/run-*.wandb")
    got, images = {}, set()
    for record in _wandb_records(path):
        if record.WhichOneof("record_type") != "history":
            continue
        items, nested = {}, {}
        for item in record.history.item:
            path = list(item.nested_key) or [item.key]
            if len(path) > 1:  # a logged media object, one field per item
                nested.setdefault(path[0], {})[path[-1]] = json.loads(item.value_json)
            else:
                items[path[0]] = json.loads(item.value_json)
        step = items.get("train/global_step")
        for key, value in items.items():
            if key.startswith("wdanalysis/"):
                got[key, step] = value
        for key, value in nested.items():
            if key.startswith("wdanalysis/"):
                assert value.get("_type") == "image-file" and step == 4, value
                assert value["width"] > 100 and value["format"] == "png"
                images.add(key)
    _check(got, table)
    assert images == {f"wdanalysis/{m}/figure2" for m in MODULES}


def test_a_dashboard_that_fails_is_reported_once_and_the_rows_go_on(tmp_path, monkeypatch):
    from torch.utils.tensorboard import SummaryWriter

    real = SummaryWriter.add_scalar

    def broken(self, *args, **kwargs):  # ours only: the Trainer's own writer works
        if Path(self.log_dir).name == "wdanalysis":
            raise OSError("disk full")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(SummaryWriter, "add_scalar", broken)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(tiny_llama_config()).save_pretrained(tmp_path / "base")
    model = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "base")
    model = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=MODULES))
    out = tmp_path / "tracking.csv"
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "run"),
        max_steps=4,
        per_device_train_batch_size=4,
        save_strategy="no",
        report_to=["tensorboard"],
        use_cpu=True,
        disable_tqdm=True,
    )
    callback = WeightDecompositionCallback(tmp_path / "base", every=2, out=out, modules=MODULES)
    trainer = transformers.Trainer(
        model=model, args=args, train_dataset=_Data(), callbacks=[callback]
    )
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        trainer.train()
    said = [str(w.message) for w in seen if "dashboards failed" in str(w.message)]
    assert len(said) == 1 and "disk full" in said[0]
    assert trainer.state.global_step == 4
    assert sorted(pd.read_csv(out)["step"].unique()) == STEPS


class _Recorder:
    """A sink that keeps what it was given (the Dashboards' sink interface)."""

    def __init__(self):
        self.values, self.images, self.closed = {}, [], False

    def scalars(self, values, step):
        self.values.update({(tag, step): value for tag, value in values.items()})

    def image(self, tag, figure, pixels, step):
        self.images.append((tag, step, pixels.shape))

    def close(self):
        self.closed = True


def test_t5_kinds_get_a_tag_each_named_by_their_full_identity(tmp_path):
    """T5's encoder self-, decoder self- and decoder cross-attention ``q`` are three kinds:
    three tags (``encoder_self_q``, ``decoder_self_q``, ``decoder_cross_q``), each holding
    its own kind's layer means and r, written out here with numpy; one figure per kind."""
    from builders import finetuned, save_model

    from wdanalysis import compare
    from wdanalysis.tracking.dashboards import Dashboards, step_scalars

    config = transformers.T5Config(
        vocab_size=40, d_model=24, d_kv=8, d_ff=20, num_layers=3, num_decoder_layers=3,
        num_heads=2,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.T5ForConditionalGeneration(config)
    state = save_model(model, tmp_path / "base")
    for step in STEPS:
        save_model(
            finetuned(state, seed=step), tmp_path / "run" / f"checkpoint-{step}", config=config
        )
    table = compare(tmp_path / "base", tmp_path / "run", modules=["q"], progress=False)
    table.to_csv(tmp_path / "tracking.csv", index=False)

    recorder = _Recorder()
    dashboards = Dashboards({"recorder": recorder})
    for step in STEPS:
        dashboards.log(table[table["step"] == step], step)
    want = {}
    for (stack, attention, step), group in table.groupby(["stack", "attention", "step"]):
        prefix = f"wdanalysis/{stack}_{attention}_q"
        assert len(group) == 3
        want[f"{prefix}/delta_m", step] = float(np.mean(group["delta_m"]))
        want[f"{prefix}/delta_d", step] = float(np.mean(group["delta_d"]))
        want[f"{prefix}/pearson_r", step] = float(
            np.corrcoef(group["delta_d"], group["delta_m"])[0, 1]
        )
    kinds = {tag.split("/")[1] for tag, _ in want}
    assert kinds == {"encoder_self_q", "decoder_self_q", "decoder_cross_q"}
    _check_close(recorder.values, want)

    dashboards.finish(tmp_path / "tracking.csv")
    assert sorted(tag for tag, _, _ in recorder.images) == sorted(
        f"wdanalysis/{kind}/figure2" for kind in kinds
    )
    assert all(step == STEPS[-1] and shape[2] == 3 for _, step, shape in recorder.images)
    assert recorder.closed
    # a model without such distinctions (LLaMA, BERT: every identity value empty)
    from wdanalysis.tracking.dashboards import kind_tag

    assert kind_tag({"component": "", "stack": "", "attention": ""}, "query") == "query"
    assert set(step_scalars(table[table["step"] == 2].assign(stack="", attention=""))) == {
        f"wdanalysis/q/{name}" for name in ("delta_m", "delta_d", "pearson_r")
    }


def _check_close(got: dict, want: dict) -> None:
    assert set(got) == set(want)
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-6, abs=1e-12), key
