"""The exact shrink factor decoupled weight decay has applied so far, per parameter group.

``torch.optim.AdamW`` multiplies every parameter of a group by ``1 - lr * weight_decay``
(``param.mul_(1 - lr * weight_decay)``, the group's current ``lr``) before it adds the
Adam step. After ``t`` updates a decayed tensor is therefore ``W_t = S_t·W_0 + L_t`` with
``S_t = Π_{s<t} (1 − lr_s·wd)``: ``S_t·W_0`` has ``W_0``'s direction, so the decay alone
moves the DoRA paper's ΔM and never its ΔD (issue 36). :class:`ShrinkTracker` multiplies
the very factors AdamW uses, read from the optimizer's groups before each update, in
float64, and each checkpoint gets them as ``decay_shrink.json``:

``{"step": t, "groups": [{"weight_decay": wd, "shrink": S_t, "sum_lr": Σ_{s<t} lr_s,
"updates": t, "parameters": [names of the model's parameters in the group]}]}``

A parameter in no group did not train, hence was never decayed (``S = 1``): LoRA's frozen
base, for example. ``wdanalysis compare`` reads the file (``decay_shrink`` and
``delta_m_learned`` columns).
"""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from wdanalysis.errors import CheckpointFormatError
from wdanalysis.loaders.decay_shrink import SHRINK_FILE, read_shrink
from wdanalysis.storage.atomic_write import write_text_atomic


class ShrinkTracker:
    """Running ``S`` and ``Σ lr`` of every optimizer group (same order as the groups)."""

    def __init__(self, model: nn.Module, groups: list[dict]):
        names = {id(p): name for name, p in model.named_parameters()}
        self.names = [[names.get(id(p), "?") for p in group["params"]] for group in groups]
        self.group_of = {id(p): i for i, group in enumerate(groups) for p in group["params"]}
        self.shrink = [1.0] * len(groups)
        self.sum_lr = [0.0] * len(groups)
        self.updates = 0

    def before_update(self, optimizer) -> None:
        """Take the factor of the update about to run, from the optimizer's own groups."""
        for i, group in enumerate(optimizer.param_groups):
            lr, wd = float(group["lr"]), float(group["weight_decay"])
            if wd != 0:  # AdamW skips the multiplication entirely at wd = 0
                self.shrink[i] *= 1 - lr * wd  # the very expression AdamW evaluates
            self.sum_lr[i] += lr
        self.updates += 1

    def of(self, param) -> float:
        """``S`` of ``param`` now; 1 for a parameter in no group (never decayed)."""
        group = self.group_of.get(id(param))
        return 1.0 if group is None else self.shrink[group]

    def record(self, optimizer) -> dict:
        groups = []
        for i, group in enumerate(optimizer.param_groups):
            groups.append(
                {
                    "weight_decay": float(group["weight_decay"]),
                    "shrink": self.shrink[i],
                    "sum_lr": self.sum_lr[i],
                    "updates": self.updates,
                    "parameters": self.names[i],
                }
            )
        return {"step": self.updates, "groups": groups}

    def restore(self, record: dict, step: int, path: Path) -> None:
        """Continue from a checkpoint's record (``--resume``)."""
        groups = record.get("groups", [])
        if record.get("step") != step or len(groups) != len(self.shrink):
            raise CheckpointFormatError(
                f"decay record does not match the run (step {record.get('step')}, "
                f"{len(groups)} groups; expected step {step}, {len(self.shrink)} groups)",
                path=path,
            )
        self.shrink = [float(g["shrink"]) for g in groups]
        self.sum_lr = [float(g["sum_lr"]) for g in groups]
        self.updates = step

    def replay(self, optimizer, factors: list[float], peak_lr: float) -> None:
        """Rebuild ``S`` of a run resumed from a checkpoint written before this record
        existed: the schedule's lrs (``peak_lr · factor``, as ``LambdaLR`` forms them)."""
        for factor in factors:
            for i, group in enumerate(optimizer.param_groups):
                lr, wd = peak_lr * factor, float(group["weight_decay"])
                if wd != 0:
                    self.shrink[i] *= 1 - lr * wd
                self.sum_lr[i] += lr
            self.updates += 1


def write_shrink(folder: Path, record: dict) -> Path:
    return write_text_atomic(folder / SHRINK_FILE, json.dumps(record, indent=1) + "\n")


def restore_shrink(
    shrink: ShrinkTracker, optimizer, warmup: int, steps: int, peak_lr, last
) -> None:
    """The decay record at the checkpoint ``last = (step, folder)`` resumed from; replayed
    from the schedule for a checkpoint written before the record existed."""
    from wdanalysis.train.diagnostics import lr_factors

    step, folder = last
    record = read_shrink(folder)
    if record is not None:
        shrink.restore(record, step, Path(folder) / SHRINK_FILE)
        return
    shrink.replay(optimizer, lr_factors(warmup, steps)[:step], peak_lr)
