"""Live ΔM/ΔD while training: the callback under a real ``transformers.Trainer``.

The proof: the callback's rows at step s equal :func:`wdanalysis.compare` on the checkpoint
the same Trainer saved at step s, for FT, PEFT LoRA and PEFT DoRA, on a tiny BERT whose
selected weights include a non-square one (``intermediate.dense``, 48x32). Then resume,
crash safety, a wrong base (reported, the training goes on), and a failure inside the
callback.
"""

from __future__ import annotations

import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from wdanalysis import (  # noqa: E402
    COLUMNS,
    WeightDecompositionCallback,
    compare,
    tracking,  # noqa: E402
)

MODULES = ["query", "value", "intermediate.dense"]
KEYS = ["step", "parameter"]


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny_bert_base")
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=48,
        max_position_embeddings=32,
        num_labels=2,
    )
    transformers.BertForSequenceClassification(config).save_pretrained(folder)
    return folder


class _Data(torch.utils.data.Dataset):
    def __init__(self, n: int = 64, length: int = 12):
        gen = torch.Generator().manual_seed(1)
        self.ids = torch.randint(1, 64, (n, length), generator=gen)
        self.labels = (self.ids[:, 0] > 32).long()

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


def _model(base_dir: Path, method: str, dtype: torch.dtype):
    model = transformers.BertForSequenceClassification.from_pretrained(base_dir)
    if method != "ft":
        config = peft.LoraConfig(
            r=4,
            lora_alpha=8,
            target_modules=MODULES,
            use_dora=method == "dora",
            task_type=peft.TaskType.SEQ_CLS,
        )
        model = peft.get_peft_model(model, config)
    return model.to(dtype)


def _train(base_dir, out_dir, method, callback, dtype=torch.float64, max_steps=6, resume=None):
    torch.manual_seed(0)
    args = transformers.TrainingArguments(
        output_dir=str(out_dir),
        max_steps=max_steps,
        per_device_train_batch_size=8,
        learning_rate=5e-3,
        save_strategy="steps",
        save_steps=2,
        logging_steps=100,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    trainer = transformers.Trainer(
        model=_model(base_dir, method, dtype),
        args=args,
        train_dataset=_Data(),
        callbacks=[callback],
    )
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def _callback(base_dir, out, **kwargs):
    return WeightDecompositionCallback(base_dir, every=2, out=out, modules=MODULES, **kwargs)


@pytest.mark.parametrize(
    ("method", "dtype", "rtol", "axis"),
    [
        ("ft", torch.float64, 1e-9, "out"),
        ("lora", torch.float64, 1e-9, "out"),
        ("dora", torch.float64, 1e-9, "out"),
        ("dora", torch.float32, 1e-6, "out"),
        ("dora", torch.float64, 1e-9, "in"),
    ],
)
def test_callback_rows_equal_compare_on_the_saved_checkpoints(
    base_dir, tmp_path, method, dtype, rtol, axis
):
    run = tmp_path / method
    out = tmp_path / "tracking.csv"
    _train(base_dir, run, method, _callback(base_dir, out, axis=axis), dtype=dtype)
    live = pd.read_csv(out)
    assert list(live.columns) == COLUMNS
    assert sorted(live["step"].unique()) == [2, 4, 6]
    offline = compare(base_dir, run, modules=MODULES, axis=axis, progress=False)
    assert sorted(offline["step"].unique()) == [2, 4, 6]
    assert set(live["axis"]) == {axis}
    assert (
        set(live["method"])
        == set(offline["method"])
        == {{"ft": "FT", "lora": "LoRA", "dora": "DoRA"}[method]}
    )
    assert set(live["run"]) == set(offline["run"])
    merged = offline.merge(live, on=KEYS, suffixes=("_offline", "_live"), validate="1:1")
    assert len(merged) == len(offline) == len(live) == 3 * 3 * 2
    for column in ("delta_m", "delta_d"):
        want, got = merged[f"{column}_offline"], merged[f"{column}_live"]
        assert (want > 0).all()  # the weights really moved
        np.testing.assert_allclose(got, want, rtol=rtol, atol=0)
    assert (merged["n_vectors_live"] == merged["n_vectors_offline"]).all()
    # the non-square weight is there: 48 output rows of 32 inputs
    assert set(merged["n_vectors_live"]) == ({32, 48} if axis == "out" else {32})


def test_resumed_run_continues_the_table_without_duplicate_steps(base_dir, tmp_path):
    run, out = tmp_path / "lora", tmp_path / "tracking.csv"
    _train(base_dir, run, "lora", _callback(base_dir, out), max_steps=4)
    first = pd.read_csv(out)
    assert sorted(first["step"].unique()) == [2, 4]
    # resume from step 2: steps 4 (already there) and 6 follow; 4 must not be written twice
    _train(
        base_dir,
        run,
        "lora",
        _callback(base_dir, out),
        max_steps=6,
        resume=str(run / "checkpoint-2"),
    )
    table = pd.read_csv(out)
    assert sorted(table["step"].unique()) == [2, 4, 6]
    assert not table.duplicated(KEYS).any()
    pd.testing.assert_frame_equal(table[table["step"] <= 4], first)


def _train_warned(*args, **kwargs) -> tuple[object, list[str]]:
    """Train, recording the tracking warnings (the training must reach its last step)."""
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        trainer = _train(*args, **kwargs)
    said = [str(w.message) for w in seen if "weight tracking" in str(w.message)]
    return trainer, said


def test_wrong_base_is_reported_when_training_begins_and_training_goes_on(base_dir, tmp_path):
    other = tmp_path / "other"
    torch.manual_seed(5)  # same architecture, other weights
    transformers.BertForSequenceClassification(
        transformers.BertConfig.from_pretrained(base_dir)
    ).save_pretrained(other)
    small = tmp_path / "small"
    config = transformers.BertConfig.from_pretrained(base_dir)
    config.intermediate_size = 40
    transformers.BertForSequenceClassification(config).save_pretrained(small)
    cases = {
        tmp_path / "missing": "no such file",
        other: "different models",
        small: "shape",
    }
    for method in ("ft", "lora"):
        for wrong, words in cases.items():
            out = tmp_path / f"{method}.csv"
            trainer, said = _train_warned(
                base_dir, tmp_path / "run", method, _callback(wrong, out), max_steps=2
            )
            assert trainer.state.global_step == 2  # the training was not ended
            assert len(said) == 1, said
            assert "could not begin, training goes on" in said[0] and words in said[0]
            assert "\n" not in said[0]
            assert not out.exists()


def test_failure_inside_the_callback_does_not_stop_training(base_dir, tmp_path, monkeypatch):
    out = tmp_path / "tracking.csv"
    real = tracking.Tracker.compute
    calls = []

    def flaky(self, step):
        calls.append(step)
        if step == 4:
            raise RuntimeError("simulated failure")
        return real(self, step)

    monkeypatch.setattr(tracking.Tracker, "compute", flaky)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        trainer = _train(base_dir, tmp_path / "run", "lora", _callback(base_dir, out), max_steps=8)
    assert trainer.state.global_step == 8  # training went on to the end
    assert calls == [2, 4]  # tracking stopped after the failure
    stopped = [w for w in seen if "tracking stopped" in str(w.message)]
    assert len(stopped) == 1 and "simulated failure" in str(stopped[0].message)
    table = pd.read_csv(out)
    assert sorted(table["step"].unique()) == [2]  # the rows written before stay whole


def test_a_killed_writer_leaves_whole_lines_only(tmp_path):
    """Kill a process appending big batches at random moments: the table is always whole."""
    out = tmp_path / "t.csv"
    script = f"""
import sys
import pandas as pd
from pathlib import Path
from wdanalysis.table.comparison import COLUMNS
from wdanalysis.tracking.tracker import append_rows, read_steps
out = Path({str(out)!r})
rows = pd.DataFrame(
    [[f"m{{i}}" * 50] + [i] * (len(COLUMNS) - 1) for i in range(2000)], columns=COLUMNS
)
step = max(read_steps(out), default=-1) + 1
while True:
    rows["step"] = step
    append_rows(out, rows)
    print(step, flush=True)
    step += 1
"""
    root = str(Path(tracking.__file__).parents[1])
    for delay in (0.0, 0.023, 0.061):
        proc = subprocess.Popen(
            [sys.executable, "-c", script], stdout=subprocess.PIPE, env={"PYTHONPATH": root}
        )
        try:
            assert proc.stdout.readline(), "the writer wrote nothing"
            time.sleep(delay)
        finally:
            proc.kill()
            proc.wait()
        assert out.read_bytes().endswith(b"\n")
        table = pd.read_csv(out)
        assert list(table.columns) == COLUMNS
        sizes = table.groupby("step").size()
        assert (sizes == 2000).all() and list(sizes.index) == list(range(len(sizes)))


def test_importing_wdanalysis_does_not_import_transformers():
    code = (
        "import sys, wdanalysis; assert 'transformers' not in sys.modules; "
        "from wdanalysis import WeightDecompositionCallback as C; "
        "assert 'transformers' in sys.modules; "
        "import transformers; assert issubclass(C, transformers.TrainerCallback)"
    )
    root = str(Path(tracking.__file__).parents[1])
    subprocess.run([sys.executable, "-c", code], check=True, env={"PYTHONPATH": root})


def test_tracker_refuses_a_table_of_other_columns(base_dir, tmp_path):
    out = tmp_path / "tracking.csv"
    out.write_text("a,b\n1,2\n")
    trainer, said = _train_warned(
        base_dir, tmp_path / "run", "ft", _callback(base_dir, out), max_steps=2
    )
    assert trainer.state.global_step == 2
    assert len(said) == 1 and "not a wdanalysis table" in said[0]
    assert out.read_text() == "a,b\n1,2\n"


def test_a_fresh_run_refuses_a_table_of_an_earlier_run(base_dir, tmp_path):
    out = tmp_path / "tracking.csv"
    _train(base_dir, tmp_path / "a", "ft", _callback(base_dir, out), max_steps=2)
    before = out.read_bytes()
    trainer, said = _train_warned(
        base_dir, tmp_path / "b", "ft", _callback(base_dir, out), max_steps=2
    )
    assert trainer.state.global_step == 2
    assert len(said) == 1 and "earlier run" in said[0]
    assert out.read_bytes() == before


def test_plot_draws_the_same_fits_and_figures_from_a_live_table(base_dir, tmp_path, capsys):
    from wdanalysis.cli import main

    run, out = tmp_path / "dora", tmp_path / "tracking.csv"
    _train(base_dir, run, "dora", _callback(base_dir, out))
    assert main(["plot", str(out), "--out", str(tmp_path / "live"), "--dpi", "40"]) == 0
    assert "wrote" in capsys.readouterr().out
    argv = ["compare", str(base_dir), str(run), "--out", str(tmp_path / "offline")]
    assert main([*argv, "--modules", *MODULES, "--quiet", "--no-figures"]) == 0
    deltas = tmp_path / "offline" / "deltas.csv"
    assert main(["plot", str(deltas), "--out", str(tmp_path / "again"), "--dpi", "40"]) == 0
    live = pd.read_csv(tmp_path / "live" / "fits.csv")
    offline = pd.read_csv(tmp_path / "again" / "fits.csv")
    pd.testing.assert_frame_equal(live, offline, rtol=1e-9, check_exact=False)
    names = {p.name for p in (tmp_path / "live").iterdir()}
    assert names == {p.name for p in (tmp_path / "again").iterdir()}
    assert {"figure2.png", "trajectories.png", "index.html"} <= names


def test_plot_refuses_a_table_that_is_not_one(tmp_path, capsys):
    from wdanalysis.cli import main

    bad = tmp_path / "bad.csv"
    bad.write_text("a,b\n1,2\n")
    assert main(["plot", str(bad), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "bad.csv" in err and "lacks column" in err
    assert main(["plot", str(tmp_path / "none.csv"), "--out", str(tmp_path / "o")]) == 2
    assert "no such file" in capsys.readouterr().err


@pytest.mark.parametrize("method", ["ft", "lora"])
def test_tracking_holds_no_copy_of_the_model(base_dir, tmp_path, method):
    """The engine is handed the model's own tensors; FT's base is streamed from disk."""
    from wdanalysis.storage.tensor_store import TensorStore

    model = _model(base_dir, method, torch.float32)
    tracker = tracking.Tracker(base_dir, tmp_path / "t.csv", every=1, modules=MODULES)
    tracker.begin(model, 0)
    live = tracker.live
    own = {p.data_ptr() for p in model.parameters()}
    stores = [live.bound.checkpoint.store] if method == "ft" else [live.base.store]
    if method != "ft":
        stores.append(live.bound.checkpoint.adapter.store)
    for store in stores:
        assert all(store.get(key).data_ptr() in own for key in store.keys())
    if method == "ft":
        assert isinstance(live.base.store, TensorStore)  # read block by block from disk
        assert all(live.base.store.infos[k].file.suffix == ".safetensors" for k in tracker.selected)


def test_a_tracking_table_of_an_older_version_is_refused_by_name(tmp_path):
    """A tracking.csv written before the label column cannot take new rows: one line says
    so (not "not a wdanalysis table"); ``wdanalysis plot`` still reads it."""
    from wdanalysis.errors import WDAnalysisError
    from wdanalysis.table.schema import COLUMNS, read_table
    from wdanalysis.tracking.tracker import read_steps

    old = tmp_path / "tracking.csv"
    columns = [c for c in COLUMNS if c != "label"]
    row = {c: 0 for c in columns} | {"method": "DoRA", "run": "r", "module": "q", "step": 2}
    pd.DataFrame([row], columns=columns).to_csv(old, index=False)
    with pytest.raises(WDAnalysisError, match="older wdanalysis"):
        read_steps(old)
    assert read_table(old)["label"].tolist() == ["DoRA"]
