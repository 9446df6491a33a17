"""mlx-lm adapters: ``adapter_config.json`` + ``adapters.safetensors``.

mlx-lm's ``LoRALinear`` computes ``y = x Wᵀ + scale·(x @ lora_a) @ lora_b`` with
``lora_a`` ``(in, r)`` and ``lora_b`` ``(r, out)``, so ``ΔW = scale·(lora_a @ lora_b)ᵀ`` and
``scale`` is used as written (no division by the rank). ``DoRALinear`` keeps ``m`` ``(out,)``
and fuses ``W' = m · V/‖V‖`` with the norm per output row. Training leaves
``NNNNNNN_adapters.safetensors`` beside the final file: those are the run's steps.

``LoRAEmbedding``/``DoRAEmbedding`` store ``lora_a`` ``(num_embeddings, r)`` and ``lora_b``
``(r, dims)`` and fuse ``W + scale·lora_a @ lora_b`` onto the ``(num_embeddings, dims)``
table, DoRA with ``m`` one per token (the table's rows); the base shape tells them from a
Linear's factors (:func:`orient`). ``LoRASwitchLinear`` (mixture of experts; mlx-lm has no
DoRA variant) stores ``lora_a`` ``(experts, r, in)`` and ``lora_b`` ``(experts, out, r)``
and fuses ``W[e] + scale·lora_b[e] @ lora_a[e]``: one module per expert, each bound to its
expert's ``(out, in)`` matrix, so the table has one row per expert (:mod:`.moe`).
"""

from __future__ import annotations

import math
import re
from pathlib import Path

from wdanalysis.errors import AdapterMismatchError, CheckpointFormatError
from wdanalysis.loaders.formats.foreign import (
    ForeignAdapter,
    ForeignModule,
    ViewStore,
    check_rank,
    lora_view,
    plain_config,
)
from wdanalysis.loaders.formats.moe import expert_name
from wdanalysis.loaders.layer_shapes import is_embedding_name
from wdanalysis.storage.small_files import read_json
from wdanalysis.storage.tensor_store import TensorStore, open_tensor_file

FINAL_FILE = "adapters.safetensors"
STEP_FILE = re.compile(r"^(\d+)_adapters\.safetensors$")
_ROLES = (".lora_a", ".lora_b", ".m")
_FIX = "mlx-lm writes it as {'fine_tune_type': 'lora'|'dora', 'lora_parameters': {...}}"


def is_mlx_config(raw: dict) -> bool:
    return "lora_parameters" in raw or "fine_tune_type" in raw


def is_mlx_folder(folder: Path) -> bool:
    config = folder / "adapter_config.json"
    if not config.is_file() or not (
        (folder / FINAL_FILE).is_file() or any(step_files(folder, config_needed=False))
    ):
        return False
    try:
        raw = read_json(config)
    except (OSError, ValueError):
        return True  # read_config reports the broken file
    return isinstance(raw, dict) and is_mlx_config(raw)


def is_mlx_keys(keys: list[str]) -> bool:
    return any(k.endswith((".lora_a", ".lora_b")) for k in keys)


def step_files(folder: Path, config_needed: bool = True) -> list[tuple[int, Path]]:
    """``NNNNNNN_adapters.safetensors`` files, and the final file at ``iters`` when that
    step has no numbered file of its own."""
    if config_needed and not (folder / "adapter_config.json").is_file():
        return []
    found = []
    for child in folder.iterdir() if folder.is_dir() else ():
        match = STEP_FILE.match(child.name)
        if match and child.is_file():
            found.append((int(match.group(1)), child))
    if found and config_needed and (folder / FINAL_FILE).is_file():
        iters = read_config(folder / "adapter_config.json").get("iters")
        if isinstance(iters, int) and iters not in {s for s, _ in found}:
            found.append((iters, folder / FINAL_FILE))
    return sorted(found)


def read_config(path: Path) -> dict:
    try:
        raw = read_json(path)
    except OSError as error:
        raise CheckpointFormatError(f"cannot read adapter config: {error.strerror}", path) from None
    except ValueError as error:
        raise CheckpointFormatError(f"malformed adapter_config.json: {error}", path, _FIX) from None
    if not isinstance(raw, dict):
        raise CheckpointFormatError("malformed adapter_config.json: not an object", path, _FIX)
    return raw


def _scale(raw: dict, path: Path) -> tuple[str, float]:
    kind = raw.get("fine_tune_type", "lora")
    if kind == "full":
        raise CheckpointFormatError(
            "mlx-lm fine_tune_type 'full' saves only the trained layers' weights, not an adapter",
            path,
            "fuse or save the whole model with mlx-lm and pass that folder",
        )
    if kind not in ("lora", "dora"):
        raise CheckpointFormatError(f"unknown mlx-lm fine_tune_type {kind!r}", path, _FIX)
    params = raw.get("lora_parameters")
    scale = params.get("scale") if isinstance(params, dict) else None
    if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not math.isfinite(scale):
        raise CheckpointFormatError(
            f"lora_parameters.scale is missing or not a number ({scale!r})",
            path,
            "mlx-lm needs it too; set the scale used in training",
        )
    return kind, float(scale)


def open_mlx(weights: Path, step: int | None):
    """An mlx-lm adapter file; its ``adapter_config.json`` lies in the same folder."""
    from wdanalysis.loaders.checkpoint_kinds import AdapterCheckpoint

    config_path = weights.parent / "adapter_config.json"
    if not config_path.is_file():
        raise CheckpointFormatError(
            "mlx-lm adapter weights (lora_a/lora_b) without their adapter_config.json",
            weights,
            "the scale is in that file; copy it beside the weights",
        )
    raw = read_config(config_path)
    kind, scale = _scale(raw, config_path)
    source = open_tensor_file(weights)
    store = ViewStore.over(source, source.format)
    modules = _modules(source, store, scale, weights)
    rank = (raw.get("lora_parameters") or {}).get("rank")
    for module in modules.values():
        if module.lora_b and isinstance(rank, int) and module.rank != rank:
            raise AdapterMismatchError(
                f"adapter_config.json gives rank {rank} but {module.name} has rank {module.rank}",
                weights,
                "the config and the weights come from different runs",
            )
    if kind == "dora" and not any(m.magnitude for m in modules.values()):
        raise CheckpointFormatError(
            "fine_tune_type is 'dora' but the file holds no magnitude ('.m') tensors", weights
        )
    config = plain_config("mlx-lm")
    if isinstance(raw.get("model"), str):  # the base mlx-lm trained on, for ``compare auto``
        config.raw = {"base_model_name_or_path": raw["model"]}
    adapter = ForeignAdapter(
        weights,
        store,
        config,
        dict(modules),
        ecosystem="mlx-lm",
        scaling_note="lora_parameters.scale from adapter_config.json, used as written",
    )
    stacks = {m.stacked: m.experts for m in modules.values() if m.experts}
    if stacks:
        adapter.notes.append(
            f"{len(stacks)} mixture-of-experts (SwitchLinear) modules of "
            f"{', '.join(str(n) for n in sorted(set(stacks.values())))} experts: "
            "one row per expert (…experts.<e>.<leaf>.weight)"
        )
    return AdapterCheckpoint(weights, adapter, step)


def _modules(source: TensorStore, store: ViewStore, scale: float, where: Path) -> dict:
    roles: dict[str, dict[str, str]] = {}
    for key in source.keys():
        role = next((r for r in _ROLES if key.endswith(r)), None)
        if role is None:
            raise CheckpointFormatError(
                f"unexpected tensor {key!r} in an mlx-lm adapter (expected lora_a, lora_b, m)",
                where,
            )
        roles.setdefault(key[: -len(role)], {})[role] = key
    modules = {}
    for name, parts in roles.items():
        module = ForeignModule(name)
        if ".lora_a" in parts or ".lora_b" in parts:
            if not (".lora_a" in parts and ".lora_b" in parts):
                raise AdapterMismatchError(f"{name} has only one of lora_a/lora_b", where)
            shapes = source.shape(parts[".lora_a"]), source.shape(parts[".lora_b"])
            if [len(s) for s in shapes] == [3, 3] and ".m" not in parts:
                modules.update(_experts(store, name, parts, scale, where))
                continue
            if any(len(s) != 2 for s in shapes):
                raise AdapterMismatchError(
                    f"{name}: lora_a {list(shapes[0])} and lora_b {list(shapes[1])} are neither "
                    "matrices (Linear, Embedding) nor stacks of them (SwitchLinear, no DoRA)",
                    where,
                    "the adapter file is damaged or not of this format",
                )
            lora_view(store, module, parts[".lora_a"], parts[".lora_b"], True, True)
            check_rank(store, module, where)
            module.scaling = scale
        if ".m" in parts:
            size = math.prod(source.shape(parts[".m"]))
            module.magnitude = store.add(
                name + ".lora_magnitude_vector", parts[".m"], (size,), lambda t: t.reshape(-1)
            )
        modules[name] = module
    return modules


def _experts(store: ViewStore, name: str, parts: dict, scale: float, where: Path) -> dict:
    """``LoRASwitchLinear``: ``lora_a`` ``(experts, r, in)`` and ``lora_b`` ``(experts, out,
    r)``, fused as ``W[e] + scale·lora_b[e] @ lora_a[e]``: one module per expert, bound to
    that expert's ``(out, in)`` matrix of the stacked base weight (:mod:`.moe`)."""
    (n, r, n_in), (n_b, n_out, r_b) = (store.source.shape(parts[k]) for k in _ROLES[:2])
    if n != n_b or r != r_b:
        raise AdapterMismatchError(
            f"{name}: mixture-of-experts factors lora_a {[n, r, n_in]} and lora_b "
            f"{[n_b, n_out, r_b]} disagree on the number of experts or the rank",
            where,
            "the adapter file is damaged or not of this format",
        )
    modules = {}
    for e in range(n):
        module = ForeignModule(expert_name(name, e), stacked=name, experts=n)
        pick = _expert(e)
        module.lora_a = store.add(module.name + ".lora_A.weight", parts[".lora_a"], (r, n_in), pick)
        module.lora_b = store.add(
            module.name + ".lora_B.weight", parts[".lora_b"], (n_out, r), pick
        )
        module.rank, module.scaling = r, scale
        modules[module.name] = module
    return modules


def _expert(e: int):
    return lambda t: t[e]


def orient(adapter, aligner, shapes: dict) -> None:
    """Tell ``LoRAEmbedding``/``DoRAEmbedding`` factors from ``LoRALinear``/``DoRALinear``
    ones by the base weight, before the layout is settled.

    Both store ``lora_a`` ``(rows, r)`` and ``lora_b`` ``(r, cols)``; a Linear fuses
    ``W + scale·(lora_a @ lora_b)ᵀ`` onto its ``(out, in)`` weight, an Embedding
    ``W + scale·lora_a @ lora_b`` onto its ``(num_embeddings, dims)`` table, and
    ``DoRAEmbedding`` keeps ``m = ‖W‖`` per token (row of the table). The base shape decides;
    a square table, which fits both, counts as an embedding when it is named like one
    (``embed_tokens``, ``wte``, … in :data:`wdanalysis.loaders.layer_shapes.EMBEDDING_LEAVES`).
    As everywhere in wdanalysis (and in PEFT) an embedding is an ``(in, out)`` weight: its
    output vectors are the table's columns, so mlx-lm's per-token magnitude lies on the
    ``in`` axis.
    """
    for module in adapter.modules.values():
        if not module.lora_b or module.experts:
            continue
        key = aligner.find(module.name + ".weight")
        if key is None or len(shapes[key]) != 2:
            continue  # binding explains it
        rows, cols = adapter.store.shape(module.lora_a)[1], adapter.store.shape(module.lora_b)[0]
        linear, table = tuple(shapes[key]) == (cols, rows), tuple(shapes[key]) == (rows, cols)
        if not (linear or table):
            raise AdapterMismatchError(
                f"{module.name}: lora_a [{rows}, r] and lora_b [r, {cols}] fit neither a Linear "
                f"weight [{cols}, {rows}] nor an Embedding table [{rows}, {cols}]; the base "
                f"weight {key!r} is {list(shapes[key])}",
                adapter.path,
                "this adapter was trained on a model of another size",
            )
        module.embedding = table and (not linear or is_embedding_name(key, shapes[key]))
        module.magnitude_axis = "in" if module.embedding else "out"
