"""A diffusers pipeline folder (``model_index.json`` + one sub-folder per component) read
as one model.

``save_pretrained`` of a pipeline, and a hub snapshot of a diffusers repository, hold
``unet/diffusion_pytorch_model.safetensors``, ``text_encoder/model.safetensors``, … Their
keys are presented as ``<component>.<key>`` (``unet.down_blocks.0…``,
``text_encoder.text_model…``), the names diffusers LoRA files use, so a LoRA that adapts
the UNet and both text encoders of SDXL binds to each exactly. Tensors are read from the
component files where they lie (the key inside the file is kept on each ``TensorInfo``).

The VAE, safety checker and image encoder are left out: LoRA/DoRA trainers do not adapt
them, and their unchanged attention projections would add zero rows to a full
fine-tune's table. Pass ``sd15/vae`` itself to analyse one.
"""

from __future__ import annotations

from pathlib import Path

from wdanalysis.errors import CheckpointFormatError
from wdanalysis.storage.small_files import read_json
from wdanalysis.storage.tensor_store import (
    TensorInfo,
    TensorStore,
    open_shard_files,
    open_sharded,
    real_key,
)

INDEX_FILE = "model_index.json"
LEFT_OUT = {"vae", "safety_checker", "image_encoder", "feature_extractor"}
_STEMS = ("diffusion_pytorch_model", "model", "pytorch_model")


def is_pipeline(folder: Path) -> bool:
    return (folder / INDEX_FILE).is_file()


def components(folder: Path) -> dict[str, list[Path]]:
    """The components of ``model_index.json`` with weights, in its order → their files."""
    try:
        index = read_json(folder / INDEX_FILE)
    except (OSError, ValueError) as error:
        raise CheckpointFormatError(f"unreadable {INDEX_FILE}: {error}", folder) from None
    if not isinstance(index, dict):
        raise CheckpointFormatError(f"malformed {INDEX_FILE}: not an object", folder)
    found = {}
    for name, value in index.items():
        if not name.startswith("_") and name not in LEFT_OUT and isinstance(value, list):
            files = _weights_of(folder / name)
            if files is not None:
                found[name] = files
    return found


def _weights_of(folder: Path) -> list[Path] | None:
    """The weight file(s) of one component folder: an index, else one file, else shards;
    the default (no variant) save preferred to ``.fp16``-style variants."""
    if not folder.is_dir():
        return None
    for suffix in (".safetensors.index.json", ".safetensors", ".bin.index.json", ".bin"):
        for stem in _STEMS:
            if (folder / f"{stem}{suffix}").is_file():
                return [folder / f"{stem}{suffix}"]
    indexes = sorted(folder.glob("*.safetensors.index.*.json"))  # variant, sharded
    if indexes:
        return indexes[:1]
    files = sorted(p for p in folder.glob("*.safetensors") if p.name.startswith(_STEMS))
    variants = {p.name.split("-0")[0].removesuffix(".safetensors") for p in files}
    if files:  # one variant (e.g. only .fp16 saved): its file or its shards
        first = sorted(variants)[0]
        return [p for p in files if p.name.startswith(first)]
    return None


def _open_component(folder: Path, files: list[Path]) -> TensorStore:
    if files[0].name.endswith(".json"):
        return open_sharded(files[0])
    return open_shard_files(files, folder)


def open_pipeline(folder: Path) -> TensorStore:
    """One store over the pipeline's trainable components, keys ``<component>.<key>``."""
    found = components(folder)
    if not found:
        raise CheckpointFormatError(
            f"a diffusers pipeline ({INDEX_FILE}) without weights for any component "
            f"(other than {', '.join(sorted(LEFT_OUT))})",
            folder,
            "download the weights too (hf download ID), or pass a component folder",
        )
    infos: dict[str, TensorInfo] = {}
    kinds = []
    for name, files in found.items():
        store = _open_component(folder / name, files)
        kinds.append(f"{name}: {store.format}")
        for key, info in store.infos.items():
            infos[f"{name}.{key}"] = TensorInfo(
                info.shape, info.dtype, info.file, real_key(info, key)
            )
    return TensorStore(folder, f"diffusers pipeline ({'; '.join(kinds)})", infos)
