"""Folders holding several named PEFT adapters, each analysed as its own run.

PEFT's ``save_pretrained`` on a model with several adapters writes the one named
``default`` into the folder itself and every other adapter into a sub-folder of its name
(``selected_adapters`` chooses which are written, so the folder itself may hold none). A
Trainer run saves each ``checkpoint-N`` that way. Every adapter becomes a run of its own,
named ``<run>/<adapter>`` and labelled by the adapter's name (the method column), so that
none is left out or mixed with another.
"""

from __future__ import annotations

from pathlib import Path

from wdanalysis.errors import CheckpointFormatError
from wdanalysis.loaders.run_checks import warn_left_out
from wdanalysis.loaders.runs import (
    STEP_FOLDER,
    Run,
    add_checkpoint,
    open_checkpoint,
    open_run,
    run_name,
    step_folders,
)
from wdanalysis.storage.hub_cache import resolve_model_path

CONFIG = "adapter_config.json"
DEFAULT = "default"  # the adapter PEFT saves in the folder itself
_WEIGHT_SUFFIXES = {".safetensors", ".bin", ".pt", ".pth", ".ckpt"}


def adapter_names(folder: Path) -> list[str]:
    """Names of the adapters saved in sub-folders of ``folder`` (step folders excluded):
    beside an adapter of the folder itself, or in a folder that holds no model of its own
    (a diffusers pipeline's components are not named adapters)."""
    if not folder.is_dir():
        return []
    if not (folder / CONFIG).is_file() and _holds_a_model(folder):
        return []
    return sorted(
        child.name
        for child in folder.iterdir()
        if child.is_dir() and (child / CONFIG).is_file() and not STEP_FOLDER.match(child.name)
    )


def open_runs(path: str | Path, name: str | None = None, skip_bad: bool = False) -> list[Run]:
    """The runs ``path`` holds: one, or one per named adapter of a multi-adapter save.

    A single adapter (or a full model) gives :func:`~wdanalysis.loaders.runs.open_run`'s
    run unchanged; several give the ``default`` one (when saved) and one per sub-folder
    adapter, each labelled by its adapter name.
    """
    folder = resolve_model_path(path)
    name = name or (run_name(Path(path)) if folder == Path(path) else str(path))
    steps = step_folders(folder) if folder.is_dir() else []
    names = sorted({n for _, f in steps for n in adapter_names(f)}) if steps else []
    if not steps:
        names = adapter_names(folder)
    if not names:
        return [open_run(path, name, skip_bad)]
    runs = []
    if _has_default(folder, steps):
        root = open_run(path, name, skip_bad)
        root.name, root.label = f"{name}/{DEFAULT}", DEFAULT
        runs.append(root)
    for adapter in names:
        runs.append(_named_run(folder, steps, adapter, f"{name}/{adapter}", skip_bad))
    return runs


def _holds_a_model(folder: Path) -> bool:
    own = ("model_index.json", "config.json")
    return any(
        child.name in own or child.suffix in _WEIGHT_SUFFIXES
        for child in folder.iterdir()
        if child.is_file()
    )


def _has_default(folder: Path, steps: list[tuple[int, Path]]) -> bool:
    if not steps:
        return (folder / CONFIG).is_file()
    return any((step_folder / CONFIG).is_file() for _, step_folder in steps)


def _named_run(folder: Path, steps, adapter: str, run_name: str, skip_bad: bool) -> Run:
    """The adapter ``adapter`` of every step (or of the folder itself), as one run: a step
    without it is skipped, a refused one fails unless ``skip_bad`` (as :func:`open_run`)."""
    if not steps:
        run = Run(folder / adapter, run_name, [open_checkpoint(folder / adapter)])
    else:
        run = Run(folder, run_name, [])
        for step, step_folder in steps:
            if not (step_folder / adapter).is_dir():
                run.skipped.append((step_folder, f"no adapter {adapter!r}"))
                continue
            add_checkpoint(run, step_folder, step, skip_bad, step_folder / adapter)
        warn_left_out(run)
        if not run.checkpoints:
            raise CheckpointFormatError(
                f"adapter {adapter!r}: none of the {len(steps)} checkpoints holds it complete",
                folder,
            )
    run.label = adapter
    return run
