"""Trainer-style run folders: ``RUN/checkpoint-N/``, each written whole or not at all.

A checkpoint is filled in a hidden temporary folder beside its final place and renamed
into place only once every file is on disk, so a killed run can leave a stray
``.checkpoint-N.*.tmp`` folder (removed on the next start) but never a ``checkpoint-N``
that looks complete and is not. Resume state (optimizer, scheduler, RNG) is saved as plain
tensors and containers, loadable with ``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from wdanalysis.errors import CheckpointFormatError
from wdanalysis.storage.atomic_write import atomic_path, write_text_atomic

CHECKPOINT_RE = re.compile(r"checkpoint-(\d+)")
TRAINER_STATE = "trainer_state.json"
TRAINING_STATE = "training_state.pt"
FULL_WEIGHTS = "model.safetensors"


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run, sorted by step (numerically, not lexically)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = []
    for child in run_dir.iterdir():
        match = CHECKPOINT_RE.fullmatch(child.name)
        if match and (child / TRAINER_STATE).is_file():
            found.append((int(match.group(1)), child))
    return sorted(found)


def remove_stale_temporaries(run_dir: Path) -> None:
    """Delete half-written checkpoint folders left by a killed run."""
    for child in run_dir.glob(".checkpoint-*.tmp"):
        shutil.rmtree(child, ignore_errors=True)


def write_checkpoint(run_dir: Path, step: int, fill: Callable[[Path], None]) -> Path:
    """Let ``fill`` write into a temporary folder, then rename it to ``checkpoint-<step>``."""
    run_dir.mkdir(parents=True, exist_ok=True)
    final = run_dir / f"checkpoint-{step}"
    tmp = Path(tempfile.mkdtemp(prefix=f".checkpoint-{step}.", suffix=".tmp", dir=run_dir))
    try:
        fill(tmp)
        if final.exists():  # an older copy of the same step: swap it out, then drop it
            old = Path(
                tempfile.mkdtemp(prefix=f".checkpoint-{step}.old.", suffix=".tmp", dir=run_dir)
            )
            os.replace(final, old / final.name)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(run_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def full_state_dict(
    model: nn.Module, gathered: dict[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` (or a gathered copy of it) ready for safetensors.

    Tied tensors get their own copy.
    """
    seen: set[int] = set()
    state = {}
    for key, value in (model.state_dict() if gathered is None else gathered).items():
        value = value.detach().to("cpu").contiguous()
        pointer = value.untyped_storage().data_ptr()
        state[key] = value.clone() if pointer in seen else value
        seen.add(pointer)
    return state


def save_full_weights(
    model: nn.Module, folder: Path, gathered: dict[str, torch.Tensor] | None = None
) -> None:
    with atomic_path(folder / FULL_WEIGHTS) as tmp:
        save_file(full_state_dict(model, gathered), str(tmp), metadata={"format": "pt"})
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_json_string"):
        write_text_atomic(folder / "config.json", config.to_json_string())


def read_full_weights(folder: Path) -> dict[str, torch.Tensor]:
    path = folder / FULL_WEIGHTS
    if not path.is_file():
        raise CheckpointFormatError("full weights missing", path=path)
    return load_file(str(path))


def load_full_weights(model: nn.Module, folder: Path) -> None:
    model.load_state_dict(read_full_weights(folder), strict=True)


def write_trainer_state(folder: Path, step: int, max_steps: int, log_history: list[dict]) -> None:
    state = {"global_step": step, "max_steps": max_steps, "log_history": log_history}
    write_text_atomic(folder / TRAINER_STATE, json.dumps(state, indent=2) + "\n")


def read_trainer_state(folder: Path) -> dict:
    path = folder / TRAINER_STATE
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise CheckpointFormatError(f"unreadable trainer state ({error})", path=path) from error


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_training_state(
    folder: Path, optimizer_state: dict, scheduler, step: int, rng: list[dict] | None = None
) -> None:
    """``rng``: one RNG state per process (torchrun ranks); default: this process's."""
    rng = rng or [rng_state()]
    state = {
        "step": step,
        "optimizer": optimizer_state,
        "scheduler": scheduler.state_dict(),
        "rng": rng[0],
    }
    if len(rng) > 1:
        state["rng_ranks"] = rng
    with atomic_path(folder / TRAINING_STATE) as tmp:
        torch.save(state, tmp)


def drop_older_training_states(run_dir: Path, newest: int) -> None:
    """Remove resume state from checkpoints before ``newest``; their weights stay."""
    for step, folder in list_checkpoints(run_dir):
        if step < newest:
            (folder / TRAINING_STATE).unlink(missing_ok=True)


def load_training_state(folder: Path) -> dict:
    """Never unpickles code: ``weights_only=True`` accepts tensors and plain containers only."""
    path = folder / TRAINING_STATE
    if not path.is_file():
        raise CheckpointFormatError("no training state to resume from", path=path)
    return torch.load(path, map_location="cpu", weights_only=True)
