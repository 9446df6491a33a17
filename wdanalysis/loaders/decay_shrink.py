"""What decoupled weight decay did to a checkpoint's weights: the factor ``S`` (issue 36).

AdamW-style decay multiplies a decayed tensor by ``1 − lr_t·wd`` at every update, so after
``t`` updates ``W_t = S_t·W_0 + L_t`` with ``S_t = Π_{s<t} (1 − lr_s·wd)``: ``S_t·W_0`` keeps
``W_0``'s direction, so the decay moves ΔM and never ΔD, and the magnitude change training
learned is ``ΔM_learned = mean_n |m_t[n] − S_t·m_0[n]|``. Where ``S`` comes from, best first:

1. the bundled trainer's ``decay_shrink.json`` in the checkpoint (exact, per parameter
   group; a tensor in no group never trained, ``S = 1``);
2. ``--decay-shrink`` given for the run (``S``, or ``STEP:S,...`` for a run of several
   checkpoints);
3. ``--weight-decay`` with the learning rates of the checkpoint's ``trainer_state.json``
   log, which must hold every update's rate (``logging_steps=1``); the logged rate of step
   ``k`` is read as the rate update ``k`` used, as the HF Trainer logs it (it reads the
   rate before the scheduler steps).

Which tensor carries a weight's norms decides which ``S`` applies (the *carrier*): the
weight itself in a full checkpoint, DoRA's magnitude ``m``, a ``modules_to_save`` copy; a
LoRA-type update leaves the frozen base undecayed, ``S = 1`` whatever the optimizer.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from wdanalysis.errors import CheckpointFormatError, WDAnalysisError

SHRINK_FILE = "decay_shrink.json"
TRAINER_STATE = "trainer_state.json"
PEFT_PREFIX = "base_model.model."

#: carrier key (as stored in the checkpoint) → S, or None where it is unknown
Lookup = Callable[[str], float | None]


@dataclass(frozen=True)
class DecayOptions:
    """What the user told ``compare`` about one run's decay (both None: nothing)."""

    weight_decay: float | None = None
    shrink: Mapping[int | None, float] | None = None  # step → S; None key: any step


def read_shrink(folder: str | Path) -> dict | None:
    """A checkpoint's ``decay_shrink.json``, or None when it has none (another trainer)."""
    path = Path(folder) / SHRINK_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        for group in record["groups"]:
            shrink = float(group["shrink"])
            if not (math.isfinite(shrink) and isinstance(group["parameters"], list)):
                raise ValueError(f"shrink {shrink!r}")
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise CheckpointFormatError(f"unreadable decay record ({error})", path=path) from None
    return record


def parse_shrink(text: str) -> dict[int | None, float] | None:
    """``--decay-shrink`` of one run: ``0.61`` (a run of one checkpoint), ``125:0.9,250:0.8``
    (per step) or ``-`` (unknown)."""
    text = text.strip()
    if text in ("-", ""):
        return None
    found: dict[int | None, float] = {}
    try:
        for item in text.split(","):
            step, _, value = item.rpartition(":")
            found[int(step) if step else None] = _factor(float(value))
    except ValueError:
        raise WDAnalysisError(
            f"--decay-shrink {text!r} is not S, STEP:S[,STEP:S...] or -",
            hint="S is the product of (1 − lr·wd) over the updates, in (0, 1]",
        ) from None
    return found


def _factor(value: float) -> float:
    if not (math.isfinite(value) and 0 < value <= 1):
        raise ValueError(value)
    return value


def shrink_from_log(folder: Path, step: int, weight_decay: float) -> tuple[float | None, str]:
    """``Π_{k=1..step} (1 − lr_k·wd)`` from the checkpoint's logged learning rates, or
    ``(None, why)`` when the log lacks a rate of some update."""
    if weight_decay == 0:
        return 1.0, ""
    path = Path(folder) / TRAINER_STATE
    try:
        history = json.loads(path.read_text(encoding="utf-8")).get("log_history", [])
    except (OSError, ValueError, AttributeError):
        return None, f"no readable {TRAINER_STATE} in {folder}"
    rates = {
        int(e["step"]): float(e["learning_rate"])
        for e in history
        if isinstance(e, dict) and "learning_rate" in e and "step" in e
    }
    missing = [k for k in range(1, step + 1) if k not in rates]
    if missing:
        return None, (
            f"{path} logs the learning rate of {step - len(missing)} of the {step} updates "
            "(log every step, logging_steps=1, or pass --decay-shrink)"
        )
    shrink = 1.0
    for k in range(1, step + 1):
        shrink *= 1 - rates[k] * weight_decay  # the factor AdamW applies
    return shrink, ""


def record_lookup(record: dict) -> Lookup:
    """S of a stored tensor by the trainer's record; a tensor in no group did not train."""
    by_name = {}
    for group in record["groups"]:
        for name in group["parameters"]:
            by_name[_plain(name)] = float(group["shrink"])
    return lambda key: by_name.get(_plain(key), 1.0)


def _plain(name: str) -> str:
    return name.removeprefix(PEFT_PREFIX).replace(".base_layer.", ".")


def checkpoint_lookup(
    folder: Path | None, step: int | None, options: DecayOptions
) -> tuple[Lookup | None, str]:
    """The lookup for one checkpoint (None, with the reason, where S is unknown)."""
    record = read_shrink(folder) if folder is not None and folder.is_dir() else None
    if record is not None:
        return record_lookup(record), ""
    if options.shrink is not None:
        shrink = options.shrink.get(step, options.shrink.get(None))
        if shrink is None:
            return None, f"--decay-shrink gives no S for step {step}"
        return (lambda key: shrink), ""
    if options.weight_decay is not None:
        if folder is None or step is None:
            return None, "--weight-decay needs a checkpoint folder with its trainer_state.json"
        shrink, why = shrink_from_log(folder, step, options.weight_decay)
        return (None, why) if shrink is None else ((lambda key: shrink), "")
    return None, "no decay_shrink.json, --weight-decay or --decay-shrink"
