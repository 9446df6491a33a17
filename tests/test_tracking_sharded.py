"""Live tracking under FSDP2 sharding: 2 CPU processes (gloo), no hang, unsharded numbers.

The worker (``tests/sharded_tracking_worker.py``) trains a tiny Llama sharded over two
ranks and tracks it with the callback. Here, the rows it wrote at each tracked step must
equal those of an unsharded :class:`~wdanalysis.tracking.Tracker` on the same weights
(gathered whole by the worker at that step), for DoRA and full fine-tuning; a base that
only rank 1 cannot open stops tracking on every rank at train begin, and training goes on.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import warnings
from pathlib import Path

import pandas as pd
import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from test_tracking_qlora import tiny_llama_config  # noqa: E402

from wdanalysis.tracking import Tracker  # noqa: E402

MODULES = ["q_proj", "k_proj"]
WORKER = Path(__file__).with_name("sharded_tracking_worker.py")


def _free_port() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return str(sock.getsockname()[1])


@pytest.fixture(scope="module")
def sharded_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("llama_base")
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(tiny_llama_config()).save_pretrained(base)
    out = tmp_path_factory.mktemp("sharded")
    root = str(Path(__file__).parents[1])
    env = {"PYTHONPATH": f"{root}:{WORKER.parent}", "OMP_NUM_THREADS": "1", "PATH": "/usr/bin"}
    try:
        done = subprocess.run(
            [sys.executable, str(WORKER), str(base), str(out), _free_port()],
            env=env,
            capture_output=True,
            text=True,
            timeout=1500,  # a hang, not a slow machine: the collectives time out at 30 min
        )
    except subprocess.TimeoutExpired:
        pytest.fail("the sharded run hung")
    assert done.returncode == 0, done.stderr[-3000:]
    return base, out


def _unsharded(base: Path, method: str, weights: dict):
    model = transformers.LlamaForCausalLM.from_pretrained(base)
    if method != "ft":
        config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=MODULES, use_dora=True)
        model = peft.get_peft_model(model, config)
    missing = set(weights) - set(model.state_dict())
    assert not missing, missing
    model.load_state_dict(weights, strict=False)
    return model


@pytest.mark.parametrize("method", ["dora", "ft"])
def test_sharded_rows_equal_the_unsharded_tracker_on_the_same_weights(sharded_run, method):
    base, out = sharded_run
    table = pd.read_csv(out / f"{method}.csv")
    assert sorted(table["step"].unique()) == [2, 4]
    for rank in (0, 1):
        log = (out / f"{method}_rank{rank}.log").read_text()
        assert "trained 4" in log and "weight tracking" not in log  # no failure on any rank
    for step in (2, 4):
        weights = torch.load(out / f"{method}_{step}.pt", weights_only=True)
        model = _unsharded(base, method, weights)
        tracker = Tracker(base, out / "unused.csv", every=1, modules=MODULES)
        tracker.begin(model, step)
        want = tracker.compute(step).reset_index(drop=True)
        got = table[table["step"] == step].reset_index(drop=True)
        assert len(got) == 2 * len(MODULES) and (got["delta_d"] > 0).all()
        for column in ("parameter", "method", "n_vectors"):
            assert list(got[column]) == list(want[column])
        for column in ("delta_m", "delta_d"):
            pd.testing.assert_series_equal(got[column], want[column], rtol=1e-12)


def test_a_failure_on_one_rank_stops_tracking_on_all_and_training_goes_on(sharded_run):
    _, out = sharded_run
    assert not (out / "rank1_fails.csv").exists()
    for rank in (0, 1):
        said = (out / f"rank1_fails_rank{rank}.log").read_text().splitlines()
        assert said[-1] == "trained 4"
        assert len(said) == 2 and "could not begin, training goes on" in said[0], said
    assert "no such file" in (out / "rank1_fails_rank1.log").read_text()
    assert "another rank" in (out / "rank1_fails_rank0.log").read_text()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing is left half-written
        assert not any(out.glob("*.tmp*"))


def test_fsdp1_is_told_apart_not_read_as_another_model(tmp_path):
    """FSDP1's flat parameters are refused by name (the callback reports it, training goes on)."""
    from wdanalysis.errors import WDAnalysisError

    base = tmp_path / "base"
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(tiny_llama_config()).save_pretrained(base)
    FullyShardedDataParallel = type("FullyShardedDataParallel", (torch.nn.Module,), {})
    model = transformers.LlamaForCausalLM.from_pretrained(base)
    model.model.layers[0] = torch.nn.Sequential(FullyShardedDataParallel())  # as FSDP1 wraps
    with pytest.raises(WDAnalysisError, match="FSDP1") as caught:
        Tracker(base, tmp_path / "t.csv", every=1, modules=MODULES).begin(model, 0)
    assert "--fsdp_version 2" in str(caught.value) and "\n" not in str(caught.value)
