"""``torchrun -m wdanalysis compare`` with 2 CPU ranks (gloo) writes one process's files.

The real command line runs in a subprocess under ``python -m torch.distributed.run``; its
output folder is compared byte for byte with an in-process single-process run.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import save_file

from wdanalysis.cli import main
from wdanalysis.table.distributed import weight_share

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="torch without gloo"
)
REPO = Path(__file__).resolve().parents[1]
TIMEOUT = 600  # a launch takes ~10 s on 2 cores; a hung job waits for the collective timeout
LAYERS = 4


def _state(seed: int, scale: float = 0.0) -> dict[str, torch.Tensor]:
    """Query (24, 16) and value (8, 16) weights of 4 layers: non-square, unequal sizes."""
    gen = torch.Generator().manual_seed(0)
    noise = torch.Generator().manual_seed(seed)
    state = {}
    for layer in range(LAYERS):
        for name, rows in (("q_proj", 24), ("v_proj", 8)):
            w = torch.randn(rows, 16, generator=gen)
            w = w * (1 + scale * torch.randn(rows, 1, generator=noise))
            state[f"model.layers.{layer}.self_attn.{name}.weight"] = w + scale * torch.randn(
                rows, 16, generator=noise
            )
    return state


def _save(state, folder: Path) -> Path:
    folder.mkdir(parents=True)
    save_file(state, str(folder / "model.safetensors"))
    return folder


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("inputs")
    base = _save(_state(0), root / "base")
    runs = []
    for run in (1, 2):
        for step in (10, 20):
            _save(
                _state(10 * run + step, 0.02 * step / 10), root / f"run{run}" / f"checkpoint-{step}"
            )
        runs.append(root / f"run{run}")
    return base, runs


def _torchrun(args: list[str]) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--nproc_per_node", "2", "-m", "wdanalysis", *args]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        command, env=env, capture_output=True, text=True, timeout=TIMEOUT, check=False
    )


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def test_two_ranks_write_the_same_bytes_as_one_process(tmp_path, inputs):
    base, runs = inputs
    args = ["compare", str(base), *map(str, runs), "--quiet", "--workers", "1"]
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    done = _torchrun([*args, "--out", str(tmp_path / "two")])
    assert done.returncode == 0, done.stderr[-3000:]
    one, two = _files(tmp_path / "one"), _files(tmp_path / "two")
    assert "deltas.csv" in one and "fits.csv" in one and any(n.endswith(".png") for n in one)
    assert sorted(two) == sorted(one)
    for name, content in one.items():
        assert two[name] == content, name
    assert done.stdout.count("wrote ") == sum(1 for _ in one)  # written once, by rank 0


def test_a_failing_rank_ends_the_job_with_its_one_line_error(tmp_path, inputs, capsys):
    """NaN in the base's last weight, which only rank 1 reads: one process's error, from
    rank 1, and no file in --out."""
    _, runs = inputs
    state = _state(0)
    state[f"model.layers.{LAYERS - 1}.self_attn.v_proj.weight"][3, 2] = float("nan")
    bad = _save(state, tmp_path / "bad_base")
    args = ["compare", str(bad), *map(str, runs), "--quiet", "--no-figures"]
    assert main([*args, "--out", str(tmp_path / "one")]) == 2
    one_line = capsys.readouterr().err.strip()
    done = _torchrun([*args, "--out", str(tmp_path / "two")])
    assert done.returncode != 0
    lines = [line for line in done.stderr.splitlines() if line.startswith("wdanalysis: error:")]
    assert len(lines) == 1, done.stderr[-3000:]
    assert "rank 1: " in lines[0] and lines[0].replace("rank 1: ", "") == one_line
    assert "NaN/Inf" in lines[0]
    # torchrun reports a failed child with its own traceback; none comes from our ranks
    assert not [
        line for line in done.stderr.splitlines() if "wdanalysis/" in line and "File" in line
    ]
    assert not (tmp_path / "two").exists()  # nothing written, not even the folder


def test_weight_shares_are_contiguous_balanced_and_cover_every_key():
    keys = [f"w{i}" for i in range(7)]
    sizes = [100, 10, 10, 10, 100, 50, 50]
    shares = [weight_share(keys, sizes, rank, 3) for rank in range(3)]
    assert [key for share in shares for key in share] == keys
    assert [sum(sizes[keys.index(k)] for k in share) for share in shares] == [110, 120, 100]
    lone = [weight_share(keys[:1], sizes[:1], rank, 3) for rank in range(3)]
    assert sorted(lone) == [[], [], ["w0"]]  # more ranks than weights: some read nothing
