"""Adapters of other ecosystems, read where they lie: mlx-lm, kohya-ss/LyCORIS, diffusers,
torchtune. Each is presented in the PEFT representation of :mod:`wdanalysis.loaders.peft_adapter`
(see :mod:`wdanalysis.loaders.formats.foreign`); these hooks let ``checkpoints`` find them."""

from __future__ import annotations

import warnings
from pathlib import Path

from wdanalysis.loaders.checkpoint_kinds import AdapterCheckpoint
from wdanalysis.loaders.formats import (
    diffusers,
    kohya,
    mlx,
    moe,
    openclip,
    stacked_experts,
    torchtune,
)
from wdanalysis.loaders.formats.foreign import ForeignAdapter
from wdanalysis.loaders.key_alignment import KeyAligner
from wdanalysis.storage.tensor_store import TensorStore, open_tensor_file

# Full-weight file names of the diffusers layout (a UNet / transformer folder).
DIFFUSERS_WEIGHT_FILES = (
    "diffusion_pytorch_model.safetensors.index.json",
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.bin",
)
_FULL_NAMES = ("model.safetensors", "pytorch_model.bin", "model-0", "hf_model_")


def open_folder(folder: Path, step: int | None):
    """The checkpoint a folder holds in one of these formats, or ``None``."""
    if mlx.is_mlx_folder(folder):
        final = folder / mlx.FINAL_FILE
        if not final.is_file():  # only numbered saves: the last one
            final = mlx.step_files(folder, config_needed=False)[-1][1]
        return mlx.open_mlx(final, step)
    if (folder / torchtune.WEIGHT_FILE).is_file():
        full = any(p.name.startswith(_FULL_NAMES) for p in folder.iterdir())
        if full:
            warnings.warn(
                f"{folder}: holds merged full weights and a torchtune adapter; "
                "analysing the adapter",
                stacklevel=3,
            )
        return torchtune.open_torchtune(folder / torchtune.WEIGHT_FILE, step, full)
    if (folder / diffusers.WEIGHT_FILE).is_file() and not (folder / "adapter_config.json").exists():
        path = folder / diffusers.WEIGHT_FILE
        return diffusers.open_diffusers(path, open_tensor_file(path), step)
    loose = [p for p in folder.glob("*.safetensors") if not p.name.startswith("adapter_")]
    if len(loose) == 1 and not (folder / "config.json").exists():
        store = open_tensor_file(loose[0])
        if kohya.is_kohya_keys(store.keys()):
            return kohya.open_kohya(loose[0], store, step)
    return None


def open_file(path: Path, store: TensorStore, step: int | None):
    """The checkpoint one weight file holds in one of these formats, or ``None``."""
    keys = store.keys()
    if mlx.is_mlx_keys(keys):
        return mlx.open_mlx(path, step)
    if kohya.is_kohya_keys(keys):
        return kohya.open_kohya(path, store, step)
    if diffusers.is_diffusers_keys(keys):
        return diffusers.open_diffusers(path, store, step)
    if torchtune.is_torchtune_keys(keys):
        return torchtune.open_torchtune(path, step)
    return None


def step_files(folder: Path) -> list[tuple[int, Path]]:
    """Steps saved as files in one folder: mlx-lm ``NNNNNNN_adapters.safetensors``,
    torchtune ``adapter_N.pt``, kohya-ss ``name-000003.safetensors``."""
    return mlx.step_files(folder) or torchtune.step_files(folder) or kohya.step_files(folder)


def prepare_base(base, runs: list) -> None:
    """What the base must settle before selection and layout: stacked expert weights that
    an adapter adapts are presented per expert (:mod:`.moe`), and mlx-lm factors are told
    apart as Linear or Embedding ones by the base shapes (:func:`.mlx.orient`)."""
    stacked_experts.present_stacked(base, runs)  # gpt-oss (experts, in, out) parameters
    moe.split_experts(base, runs)
    openclip.present_as_clip(base, runs)  # fused q/k/v of SD2.x/SDXL single files
    adapters = [
        c.adapter
        for run in runs
        for c in run.checkpoints
        if isinstance(c, AdapterCheckpoint)
        and isinstance(c.adapter, ForeignAdapter)
        and c.adapter.ecosystem == "mlx-lm"
    ]
    if adapters:
        aligner = KeyAligner(base.store.keys())
        shapes = {k: base.store.shape(k) for k in base.store.keys()}
        for adapter in adapters:
            mlx.orient(adapter, aligner, shapes)
