"""How runs are named: after the folder that names them, never after a step folder or a
format-named file, and told apart by as many more path parts as it takes."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

STEP_FOLDER = re.compile(
    r"^(?:checkpoint|step|epoch|global_step|global-step|iter)[-_]?(\d+)$", re.IGNORECASE
)
# Single-file checkpoints named by step, e.g. the DoRA authors' VL-BART ``Epoch05.pth``.
STEP_FILE_SUFFIXES = {".pth", ".pt", ".bin", ".ckpt", ".safetensors"}

# Weight and config files named by their format, not by the run (shards included).
_GENERIC_FILE = re.compile(
    r"^(adapter_model|adapters|adapter_config|model|pytorch_model|diffusion_pytorch_model)"
    r"([-.].*)?\.(safetensors|bin|json|pt|pth|ckpt|npz)$"
)


def _names_nothing(part: str) -> bool:
    """A path part that names a step or a file format, not a run (``checkpoint-10``,
    ``Epoch05.pth``, ``adapter_model.safetensors``)."""
    stem = Path(part).stem if Path(part).suffix in STEP_FILE_SUFFIXES else part
    return bool(STEP_FOLDER.match(part) or STEP_FOLDER.match(stem) or _GENERIC_FILE.match(part))


def run_name(path: Path, parts: int = 1, steps: bool = False) -> str:
    """A run's name: the last ``parts`` parts of its path that name it, skipping step
    folders (kept with ``steps``) and format-named files (``runs/ft/checkpoint-10`` → ``ft``,
    ``runs/lora/checkpoint-5/adapter_model.safetensors`` → ``lora``); the path's own name
    when none does."""
    named = [
        p
        for p in Path(path).absolute().parts[1:]
        if (_GENERIC_FILE.match(p) is None if steps else not _names_nothing(p))
    ]
    return "/".join(named[-parts:]) if named else Path(path).absolute().name


def unique_names(runs: list[Any]) -> None:
    """Runs with the same name but different paths get as many more parts of their paths
    as tell them apart (``a/ft``, ``b/ft``; else the full paths); the same path given
    twice (warned about) gets ``#2``, ``#3``."""
    by_name: dict[str, list[Any]] = {}  # Runs (``name``, ``path``)
    for run in runs:
        by_name.setdefault(run.name, []).append(run)
    for same in by_name.values():
        given = {same_file(run.path): str(Path(run.path).absolute()) for run in same}
        if len(given) < 2 or any(Path(run.name).is_absolute() for run in same):
            continue
        names = _distinct_names(list(given.values()))
        for run in same:
            run.name = names[given[same_file(run.path)]]
    seen: dict[str, int] = {}
    for run in runs:
        seen[run.name] = seen.get(run.name, 0) + 1
        if seen[run.name] > 1:
            run.name = f"{run.name}#{seen[run.name]}"


def _distinct_names(paths: list[str]) -> dict[str, str]:
    """The fewest trailing parts that tell ``paths`` apart: run folders first
    (``a/ft``, ``b/ft``), then with their step folders (``ft/checkpoint-10``)."""
    longest = max(len(Path(p).parts) for p in paths)
    for steps in (False, True):
        for parts in range(2, longest + 1):
            names = {p: run_name(Path(p), parts, steps) for p in paths}
            if len(set(names.values())) == len(paths):
                return names
    return {p: p for p in paths}


def same_file(path: Path) -> str:
    """One string per file or folder, however it was written (``./a``, ``a/``, a link)."""
    try:
        return str(Path(path).resolve())
    except OSError:
        return str(Path(path).absolute())
