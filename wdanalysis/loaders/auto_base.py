"""``base="auto"``: the base model the runs' adapters name in ``base_model_name_or_path``.

PEFT records the model an adapter was trained on in ``adapter_config.json``; that name is a
local path (relative to where training ran, as PEFT itself reads it) or a hub id, which is
looked up in the local Hugging Face cache (:mod:`wdanalysis.storage.hub_cache`). Every
checkpoint of every run must name the same model; full fine-tuned checkpoints name none.
"""

from __future__ import annotations

from pathlib import Path

from wdanalysis.errors import CheckpointFormatError, WDAnalysisError
from wdanalysis.loaders.runs import AdapterCheckpoint, Run
from wdanalysis.storage.hub_cache import resolve_model_path

AUTO = "auto"
_PASS_BASE = "pass the base model explicitly as BASE instead of auto"


def is_auto(base: object) -> bool:
    """``"auto"`` as a string (a ``Path("auto")`` is a folder named auto)."""
    return isinstance(base, str) and base == AUTO


def base_named_by(runs: list[Run]) -> str:
    """The one base model all adapters of ``runs`` name, as they name it.

    Raises a one-line :class:`WDAnalysisError` when a checkpoint holds full weights, an
    adapter names no base, the named base is neither a local path nor cached, or two
    checkpoints name different models.
    """
    found: dict[Path, tuple[str, Path]] = {}  # resolved folder → (name, config that names it)
    for run in runs:
        for ckpt in run.checkpoints:
            name, where = _named(ckpt)
            found.setdefault(_locate(name, where), (name, where))
    if len(found) > 1:
        (first, first_where), (second, second_where) = list(found.values())[:2]
        raise WDAnalysisError(
            f"the runs name {len(found)} different base models in base_model_name_or_path: "
            f"{first!r} ({first_where}) and {second!r} ({second_where})",
            hint=_PASS_BASE,
        )
    return next(iter(found.values()))[0]


def _named(ckpt) -> tuple[str, Path]:
    """``(base_model_name_or_path, the file it was read from)`` of one checkpoint."""
    if not isinstance(ckpt, AdapterCheckpoint):
        raise WDAnalysisError(
            "holds full fine-tuned weights, which do not name their base model",
            ckpt.path,
            _PASS_BASE,
        )
    folder = ckpt.path if ckpt.path.is_dir() else ckpt.path.parent
    config = folder / "adapter_config.json"
    where = config if config.is_file() else ckpt.path
    name = ckpt.adapter.config.raw.get("base_model_name_or_path")
    if not isinstance(name, str) or not name.strip():
        raise WDAnalysisError(
            f"the adapter names no base model (base_model_name_or_path is {name!r})",
            where,
            _PASS_BASE,
        )
    return name, where


def _locate(name: str, where: Path) -> Path:
    """The folder ``name`` stands for here, so that two spellings of one base agree."""
    try:
        folder = resolve_model_path(name)
    except WDAnalysisError as error:
        raise CheckpointFormatError(
            f"base_model_name_or_path {name!r}: {error.problem}",
            where,
            f"{error.hint}; or {_PASS_BASE}" if error.hint else _PASS_BASE,
        ) from None
    if not folder.exists():
        raise CheckpointFormatError(
            f"base_model_name_or_path {name!r} is not a file or folder here (nor a hub id "
            "org/name)",
            where,
            _PASS_BASE,
        )
    return folder.resolve()
