"""Module paths of wdanalysis before the package was grouped into subpackages.

``from wdanalysis.stats import fit_lines`` and ``import wdanalysis.demo`` name subpackages
that re-export the old module's contents. The modules that moved into a subpackage under a
new name (``wdanalysis.streaming`` → ``wdanalysis.engine.streaming``) are found here: the
old name imports the module at its new place (the same module object, not a copy) and
says, in a :class:`DeprecationWarning`, where it lives now.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

#: old dotted path (below ``wdanalysis.``) → new one
MOVED: dict[str, str] = {
    "adapter_config": "loaders.peft_config",
    "adapters": "loaders.peft_adapter",
    "analysis": "table.comparison",
    "atomic": "storage.atomic_write",
    "autobase": "loaders.auto_base",
    "bound": "weights.bound_checkpoint",
    "callback": "tracking.trainer_callback",
    "checkpoint_types": "loaders.checkpoint_kinds",
    "checkpoints": "loaders.runs",
    "commands": "cli.analysis_commands",
    "decomposition": "engine.decomposition",
    "demo_cli": "cli.demo_command",
    "demo_summary": "demo.summary",
    "formats": "loaders.formats",
    "hub": "storage.hub_cache",
    "inspection": "table.inspection",
    "kernel": "engine.c_kernel",
    "keymatch": "loaders.key_alignment",
    "layers": "loaders.layer_shapes",
    "live": "engine.live_model",
    "modules": "weights.selection",
    "plotting": "plots.figures",
    "reader": "storage.row_reader",
    "report": "plots.report",
    "resampling": "stats.resampling",
    "seedplot": "plots.seed_correlations",
    "st_refusal": "storage.safetensors_refusal",
    "streaming": "engine.streaming",
    "study": "demo.studies",
    "tensors": "storage.tensor_store",
    "tokens": "loaders.trainable_tokens",
    "train.cli": "cli.train_command",
}
_PREFIX = "wdanalysis."


def new_path(old: str) -> str | None:
    """``wdanalysis.formats.mlx`` → ``wdanalysis.loaders.formats.mlx``; ``None``: not moved."""
    if not old.startswith(_PREFIX):
        return None
    rest = head = old[len(_PREFIX) :]
    while head and head not in MOVED:
        head = head.rpartition(".")[0]
    return _PREFIX + MOVED[head] + rest[len(head) :] if head else None


class _OldPathFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds an old module path and hands back the module from its new place."""

    def __init__(self) -> None:
        self._specs: dict = {}

    def find_spec(self, fullname, path=None, target=None):
        new = new_path(fullname)
        if new is None:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec):
        new = new_path(spec.name)
        warnings.warn(
            f"{spec.name} has moved to {new}; import it from there",
            DeprecationWarning,
            stacklevel=2,
        )
        module = importlib.import_module(new)
        self._specs[module.__name__] = module.__spec__
        return module

    def exec_module(self, module) -> None:
        # The import system has just set the old name's spec on the module: give it back
        # its own, so that it keeps its real name and place.
        module.__spec__ = self._specs.pop(module.__name__, module.__spec__)


def install() -> None:
    """Put the finder first on :data:`sys.meta_path`, once: before the path finder, which
    would otherwise load a second copy of ``wdanalysis.formats.mlx`` from the new folder."""
    if not any(isinstance(f, _OldPathFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _OldPathFinder())
