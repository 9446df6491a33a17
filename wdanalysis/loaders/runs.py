"""What a path holds: a full model, an adapter, or a training run of many checkpoints.

Reads only headers and configs; tensors are read later, one at a time, by the analysis.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from wdanalysis.errors import (
    CheckpointFormatError,
    IncompleteCheckpointError,
    NumericalError,
    WDAnalysisError,
)
from wdanalysis.loaders import formats, peft_tuners
from wdanalysis.loaders.checkpoint_kinds import AdapterCheckpoint, FullModel
from wdanalysis.loaders.formats import fp8quant, mlxquant, pipeline
from wdanalysis.loaders.key_alignment import KeyAligner
from wdanalysis.loaders.peft_adapter import (
    VLBART_CONFIG,
    Adapter,
    AdapterConfig,
    group_adapter_keys,
    read_adapter_config,
)
from wdanalysis.loaders.peft_config import refuse_missing_magnitude
from wdanalysis.loaders.run_checks import refuse_odd_path, still_growing, warn_left_out
from wdanalysis.loaders.run_names import (  # ``X as X``: re-exported, names users held
    STEP_FILE_SUFFIXES as STEP_FILE_SUFFIXES,
)
from wdanalysis.loaders.run_names import STEP_FOLDER as STEP_FOLDER
from wdanalysis.loaders.run_names import run_name as run_name
from wdanalysis.loaders.run_names import same_file as same_file
from wdanalysis.loaders.run_names import unique_names as unique_names
from wdanalysis.storage.hub_cache import resolve_model_path
from wdanalysis.storage.small_files import read_json
from wdanalysis.storage.tensor_store import (
    TensorStore,
    open_shard_files,
    open_sharded,
    open_tensor_file,
)

ADAPTER_WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
FULL_WEIGHT_FILES = (
    "model.safetensors.index.json",
    "model.safetensors",
    "pytorch_model.bin.index.json",
    "pytorch_model.bin",
    *formats.DIFFUSERS_WEIGHT_FILES,
)
# What a save writes beside the weights: found without any weights, the save is unfinished.
SAVED_BESIDE_WEIGHTS = ("config.json", "trainer_state.json", "training_args.bin", "optimizer.pt")
KNOWN_FILES = (
    "adapter_config.json",
    *ADAPTER_WEIGHT_FILES,
    *FULL_WEIGHT_FILES,
    *SAVED_BESIDE_WEIGHTS,
)
_VLBART_MARKERS = (".weight_m", ".lora_A", ".lora_B")

Checkpoint = FullModel | AdapterCheckpoint


@dataclass
class Run:
    """One training run: its checkpoints sorted by step, and what was skipped."""

    path: Path
    name: str
    checkpoints: list[Checkpoint]
    skipped: list[tuple[Path, str]] = field(default_factory=list)  # being written
    refused: list[tuple[Path, str]] = field(default_factory=list)  # left out (--skip-bad)
    label: str | None = None  # the user's display name (table column label); None: method

    @property
    def method(self) -> str:
        methods = {c.method for c in self.checkpoints}
        return methods.pop() if len(methods) == 1 else "/".join(sorted(methods))


# ------------------------------------------------------------------------------ opening


def open_checkpoint(path: str | Path, step: int | None = None) -> Checkpoint:
    """Open one checkpoint (file or folder) by looking at its files and headers.

    A hub id ``org/name[@revision]`` that is not a local path is opened from the local
    Hugging Face cache (:mod:`wdanalysis.storage.hub_cache`).
    """
    path = resolve_model_path(path)
    refuse_odd_path(path)
    if not path.exists():
        raise CheckpointFormatError("no such file or folder", path, "check the path")
    if step is None:
        step = step_of(path)
    if path.is_file():
        return _open_file(path, step)
    if pipeline.is_pipeline(path):  # a diffusers pipeline: its components as one model
        return FullModel(path, pipeline.open_pipeline(path), None, step)
    for name in KNOWN_FILES:  # e.g. adapter_config.json → /dev/zero: named, not skipped
        if os.path.lexists(path / name):
            refuse_odd_path(path / name)
    found = formats.open_folder(path, step)
    if found is not None:
        return found
    if (path / "adapter_config.json").is_file():
        return _open_adapter_folder(path, step)
    for name in FULL_WEIGHT_FILES:
        if (path / name).is_file():
            return _full(path, _open_weights(path / name), step)
    loose = sorted(p for p in path.glob("*.safetensors") if not p.name.startswith("adapter_"))
    if loose:
        return _full(path, open_shard_files(loose, path), step)
    if any(path.glob("adapter_model.*")):
        raise IncompleteCheckpointError(
            "adapter weights without adapter_config.json", path, "copy the config beside them"
        )
    if not any(path.iterdir()):
        raise IncompleteCheckpointError(
            "empty folder",
            path,
            "point at the folder holding model.safetensors, pytorch_model.bin, an adapter, "
            "or checkpoint-N sub-folders",
        )
    if any((path / name).is_file() for name in SAVED_BESIDE_WEIGHTS):
        raise IncompleteCheckpointError(
            "a save without its weights (config or trainer state, no weight file)",
            path,
            "the save was cut short or is still being written",
        )
    raise CheckpointFormatError(
        "no recognisable checkpoint (expected model.safetensors, pytorch_model.bin, "
        "an adapter_config.json, or checkpoint-N sub-folders)",
        path,
    )


def _open_weights(path: Path) -> TensorStore:
    return open_sharded(path) if path.name.endswith(".index.json") else open_tensor_file(path)


def _open_file(path: Path, step: int | None) -> Checkpoint:
    if path.name == "adapter_config.json":
        return _open_adapter_folder(path.parent, step)
    if path.name.endswith(".index.json"):
        return _full(path, open_sharded(path), step)
    store = open_tensor_file(path)
    found = formats.open_file(path, store, step)
    if found is not None:
        return found
    if any(k.endswith(_VLBART_MARKERS) for k in store.keys()):
        return _adapter(path, store, VLBART_CONFIG, step)
    beside = path.parent / "adapter_config.json"
    if path.name in ADAPTER_WEIGHT_FILES and beside.is_file():  # e.g. a LoHa's tensors
        return _adapter(path, store, read_adapter_config(beside), step)
    if any(".lora_A." in k or ".lora_B." in k for k in store.keys()):
        config_file = path.parent / "adapter_config.json"
        if config_file.is_file():
            return _adapter(path, store, read_adapter_config(config_file), step)
        raise CheckpointFormatError(
            "LoRA weights without adapter_config.json", path, "put the config beside the file"
        )
    return _full(path, store, step)


def _full(path: Path, store: TensorStore, step: int | None) -> FullModel:
    folder = path if path.is_dir() else path.parent
    store = mlxquant.dequantized(store, folder)  # mlx -q models: exact float64 on read
    store = fp8quant.dequantized(store, folder)  # FP8 with scales: exact float64 on read
    return FullModel(path, store, _model_type(folder), step)


def _open_adapter_folder(folder: Path, step: int | None) -> AdapterCheckpoint:
    config = read_adapter_config(folder / "adapter_config.json")
    for name in ADAPTER_WEIGHT_FILES:
        if (folder / name).is_file():
            return _adapter(folder, open_tensor_file(folder / name), config, step)
    raise IncompleteCheckpointError(
        "adapter_config.json found but no adapter_model.safetensors or adapter_model.bin",
        folder,
        "the save was cut short or the weights were not copied; copy them beside the config",
    )


def _adapter(path: Path, store: TensorStore, config: AdapterConfig, step) -> AdapterCheckpoint:
    if config.format == "peft-tuner":  # LoHa, VeRA, OFT, …: merged by PEFT itself
        return peft_tuners.open_tuner(path, store, config, step)
    lora = config.format == "peft" and str(config.raw.get("peft_type", "LORA")).upper() == "LORA"
    modules = group_adapter_keys(store.keys(), path, config.raw if lora else None)
    refuse_missing_magnitude(config, modules, path)
    return AdapterCheckpoint(path, Adapter(path, store, config, modules), step)


def _model_type(folder: Path) -> str | None:
    try:
        return read_json(folder / "config.json").get("model_type")
    except (OSError, ValueError, AttributeError):
        return None


# --------------------------------------------------------------------------------- steps


def step_of(path: Path) -> int | None:
    """The training step of a checkpoint: from its folder name, else ``trainer_state.json``."""
    folder = path if path.is_dir() else path.parent
    for name in (path.name if path.is_dir() else path.stem, folder.name):
        match = STEP_FOLDER.match(name)
        if match:
            return int(match.group(1))
    try:
        return int(read_json(folder / "trainer_state.json")["global_step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def step_folders(path: Path) -> list[tuple[int, Path]]:
    """``checkpoint-N`` style sub-folders (or ``EpochNN.pth`` style weight files), sorted by
    N as a number (not as text). An entry named like a step that is neither (a symbolic link
    loop, a dangling link, a FIFO) is listed too, so that opening it says what it is."""
    found = []
    for child in path.iterdir() if path.is_dir() else ():
        if child.is_dir():
            match = STEP_FOLDER.match(child.name)
        elif child.suffix in STEP_FILE_SUFFIXES:
            match = STEP_FOLDER.match(child.stem)
        elif not child.is_file():  # not a folder nor a file: say why when opening it
            match = STEP_FOLDER.match(child.name)
        else:
            match = None
        if match:
            found.append((int(match.group(1)), child))
    if not found and path.is_dir():  # steps saved as files (mlx-lm, torchtune, kohya-ss)
        found = formats.step_files(path)
    return sorted(found)


def open_run(path: str | Path, name: str | None = None, skip_bad: bool = False) -> Run:
    """A run folder of ``checkpoint-N`` sub-folders, or a single checkpoint as a one-step run.

    A checkpoint still being written or whose save was cut short
    (:class:`~wdanalysis.errors.IncompleteCheckpointError`) is skipped with a warning and
    listed in ``Run.skipped``. Any other refusal fails the run, unless ``skip_bad``: then it
    is left out with a warning and listed in ``Run.refused``. A cached hub id is opened
    from its snapshot folder and named by the id; a local path by :func:`run_name` (a
    single checkpoint ``runs/ft/checkpoint-10`` by its run folder: ``ft``).
    """
    resolved = resolve_model_path(path)
    refuse_odd_path(resolved)
    if not resolved.exists():
        raise CheckpointFormatError("no such file or folder", path, "check the path")
    name = name or (run_name(Path(path)) if resolved == Path(path) else str(path))
    path = resolved
    folders = step_folders(path)
    if not folders:
        return Run(path, name, [open_checkpoint(path)])
    run = Run(path, name, [])
    for step, folder in folders:
        add_checkpoint(run, folder, step, skip_bad)
    warn_left_out(run)
    if not run.checkpoints:
        skipped = run.skipped + run.refused
        what = "could be read" if run.refused else "is complete"
        raise CheckpointFormatError(
            f"none of the {len(folders)} checkpoint folders {what} "
            f"(first: {skipped[0][0].name}: {skipped[0][1]})",
            path,
        )
    return run


def add_checkpoint(
    run: Run, folder: Path, step: int | None, skip_bad: bool, path: Path | None = None
) -> None:
    """Open the checkpoint at ``path`` (default ``folder``) into ``run``: one still being
    written or cut short is listed in ``run.skipped``; any other refusal fails, unless
    ``skip_bad``: then it is listed in ``run.refused``."""
    try:
        run.checkpoints.append(open_checkpoint(path or folder, step))
    except IncompleteCheckpointError as error:
        run.skipped.append((folder, error.problem))
    except WDAnalysisError as error:
        if still_growing(folder):  # a save in progress, not a bad checkpoint
            run.skipped.append((folder, f"its files are still growing ({error.problem})"))
            return
        if not skip_bad:
            error.hint = "; ".join(filter(None, [error.hint, "--skip-bad leaves it out"]))
            error.args = (error._format(),)
            raise error from None
        run.refused.append((folder, error.problem))


def open_base(path: str | Path) -> FullModel:
    base = open_checkpoint(path)
    if not isinstance(base, FullModel):
        raise CheckpointFormatError(
            "the base must be a full model, not an adapter",
            path,
            "pass the pretrained model the adapter was trained on",
        )
    return base


def aligner_for(base: FullModel) -> KeyAligner:
    return KeyAligner(base.store.keys())


def is_float(dtype: torch.dtype | str) -> bool:
    """A float dtype the analysis computes with (FP8 only once dequantized with its scale)."""
    return isinstance(dtype, torch.dtype) and dtype.is_floating_point and not fp8quant.is_fp8(dtype)


def refuse_unreadable(store: TensorStore, key: str) -> None:
    """Raise why ``key`` cannot be read, if its store says so (an FP8 weight whose scale
    is missing or not understood: :mod:`wdanalysis.loaders.formats.fp8quant`)."""
    refusal = getattr(store, "refusal", None)
    error = refusal(key) if refusal is not None else None
    if error is not None:
        raise error


# Companion tensors that quantization schemes save beside (or instead of) ``.weight``.
_QUANTIZATION_MARKERS = (  # (suffixes, scheme)
    (
        (
            ".absmax",
            ".quant_map",
            ".nested_absmax",
            ".quant_state.bitsandbytes__nf4",
            ".quant_state.bitsandbytes__fp4",
        ),
        "bitsandbytes 4-bit",
    ),
    ((".SCB", ".weight_format"), "bitsandbytes 8-bit"),
    ((".qweight", ".qzeros", ".g_idx"), "GPTQ/AWQ"),
    (
        (".weight_scale", ".weight_scale_inv", ".weight_packed", ".input_scale"),
        "scaled fp8/int (compressed-tensors)",
    ),
)


def quantization_of(store: TensorStore) -> tuple[str, str] | None:
    """``(scheme, example key)`` when the store holds quantized weights, else ``None``."""
    for key in store.keys():
        for suffixes, scheme in _QUANTIZATION_MARKERS:
            if key.endswith(suffixes):
                return scheme, key
    packed = mlxquant.packed_weights(store)  # left packed only where it could not be read
    return ("mlx", packed[0]) if packed else None


def refuse_quantized(store: TensorStore, role: str) -> None:
    """Quantized weights need their scales applied; only mlx's affine mode is dequantized
    (:mod:`wdanalysis.loaders.formats.mlxquant`), on opening."""
    found = quantization_of(store)
    if found:
        scheme, key = found
        raise NumericalError(
            f"the {role} is {scheme} quantized (e.g. {key!r}); quantized weights are not supported",
            store.infos[key].file,
            mlxquant.FIX if scheme == "mlx" else "analyse the unquantized (fp32/fp16/bf16) model",
        )
