"""``decay_shrink`` and ``delta_m_learned`` for ``compare``: which weight-decay factor ``S``
applies to each (checkpoint, weight), from the trainer's record or the user's options
(:mod:`wdanalysis.loaders.decay_shrink`), with one note per run where it is unknown."""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

from wdanalysis.errors import WDAnalysisError
from wdanalysis.loaders.decay_shrink import DecayOptions, checkpoint_lookup, parse_shrink
from wdanalysis.loaders.runs import AdapterCheckpoint, Run
from wdanalysis.weights.bound_checkpoint import BoundCheckpoint

WeightDecayArg = float | Sequence[float | None] | None
ShrinkArg = str | float | Sequence[str | float | Mapping | None] | Mapping | None


def run_options(runs: list[Run], weight_decay: WeightDecayArg, shrink: ShrinkArg) -> list:
    """One :class:`DecayOptions` per run: a single value applies to every run, a list
    gives one per run (``None``/``"-"``: not known for that run)."""
    decays = _per_run(weight_decay, len(runs), "--weight-decay")
    shrinks = _per_run(shrink, len(runs), "--decay-shrink")
    options = []
    for run, wd, s in zip(runs, decays, shrinks, strict=True):
        if wd is not None and not (math.isfinite(float(wd)) and float(wd) >= 0):
            raise WDAnalysisError(f"--weight-decay must be a non-negative number, got {wd!r}")
        steps = _as_steps(s)
        if steps is not None and None in steps and len(run.checkpoints) > 1:
            raise WDAnalysisError(
                f"--decay-shrink gives one S for run {run.name}, which has "
                f"{len(run.checkpoints)} checkpoints: S differs per step",
                hint="give STEP:S for each step (e.g. 125:0.9,250:0.8), or --weight-decay",
            )
        options.append(DecayOptions(None if wd is None else float(wd), steps))
    return options


def _per_run(value, n: int, name: str) -> list:
    if value is None or isinstance(value, (str, int, float, Mapping)):
        return [value] * n
    values = list(value)
    if len(values) == 1:
        return values * n
    if len(values) != n:
        raise WDAnalysisError(f"{name}: got {len(values)} values for {n} runs")
    return values


def _as_steps(value) -> dict | None:
    if value is None:
        return None
    if isinstance(value, Mapping):
        return {None if k is None else int(k): float(v) for k, v in value.items()}
    if isinstance(value, (int, float)):
        return parse_shrink(repr(float(value)))
    return parse_shrink(str(value))


#: PEFT tuners whose update is exactly zero (LoHa: ``hada_w2_b``; VeRA: ``λ_b``; OFT: the
#: rotation's generator) at PEFT's default init and stays zero when the decay alone scales
#: their parameters: over a frozen base the decay never scales W0, ``S = 1``.
ZERO_UPDATE_TUNERS = {"LOHA": "init_weights", "VERA": "init_weights", "OFT": "init_weights"}


def carrier(item: BoundCheckpoint, key: str) -> str | float | None:
    """The stored tensor whose decay scales base weight ``key``'s norms in this checkpoint,
    or S itself where no optimizer setting can change it (1: a frozen, undecayed base);
    None where no exact split ``W_t = S·W0 + L_t`` is known (:func:`unknown_reason`)."""
    if not isinstance(item.checkpoint, AdapterCheckpoint):
        return item.keys[key]  # a full checkpoint: the weight itself
    module = item.keys.get(key)
    if module is None:
        return 1.0  # not adapted: the base, unchanged
    if getattr(module, "base_init", None):
        return None  # PiSSA/OLoRA/KaSA: the decay shrinks s·B₀A₀, not a scalar times W0
    if getattr(module, "magnitude", None):
        return module.magnitude  # DoRA: m is what the decay shrinks
    if getattr(module, "lora_b", None):
        return 1.0  # LoRA-type update on a frozen base: the base is never decayed
    tensors = getattr(module, "tensors", ())
    if tensors:  # a PEFT tuner other than LoRA
        return _tuner_carrier(item.checkpoint.adapter, tensors)
    return getattr(module, "replacement", None)  # modules_to_save: the copy; else unknown


def _tuner_carrier(adapter, tensors: tuple[str, ...]) -> str | float | None:
    peft_type = getattr(adapter, "peft_type", "")
    config = getattr(adapter, "peft_config", None)
    if peft_type == "IA3" and getattr(config, "init_ia3_weights", None) is True:
        # W_t = l_t ⊙ W0 with l₀ = 1 decayed like any weight: l_t = S·1 + L_t, so
        # W_t = S·W0 + L_t ⊙ W0 exactly; S is the group's of the ia3_l vector.
        found = [t for t in tensors if t.rsplit(".", 1)[-1].startswith("ia3_l")]
        return found[0] if len(found) == 1 else None
    flag = ZERO_UPDATE_TUNERS.get(peft_type)
    if flag is not None and getattr(config, flag, None) is True:
        return 1.0
    return None


def unknown_reason(item: BoundCheckpoint, key: str) -> str:
    """Why :func:`carrier` gives no S for ``key`` (its adapter layout)."""
    module = item.keys.get(key)
    if getattr(module, "base_init", None):
        return (
            f"{module.base_init} init: the decay shrinks the initial factors B₀A₀ taken "
            "out of W0, which is not a scalar times W0, so no exact split exists"
        )
    adapter = getattr(item.checkpoint, "adapter", None)
    peft_type = getattr(adapter, "peft_type", "")
    if peft_type:
        return (
            f"PEFT {peft_type} adapter (at its init settings): no exact split "
            "W_t = S·W0 + L_t is known for it"
        )
    return "an adapter layout with no known S"


def attach(
    bound: list[BoundCheckpoint], keys: Sequence[str], options: list, runs: list
) -> list[str]:
    """Fill every checkpoint's ``decay_shrink`` (base key → S); returns one note per run
    where S stays unknown (``table.attrs["decay_notes"]``, printed by the CLI), and warns
    where the user's ``--weight-decay``/``--decay-shrink`` could not give it."""
    index = {id(run): i for i, run in enumerate(runs)}
    unknown: dict[str, str] = {}
    for item in bound:
        path = Path(item.checkpoint.path)
        folder = path if path.is_dir() else path.parent
        lookup, why = checkpoint_lookup(folder, item.checkpoint.step, options[index[id(item.run)]])
        for key in keys:
            source = carrier(item, key)
            if isinstance(source, float):
                item.decay_shrink[key] = source
            elif source is not None and lookup is not None:
                item.decay_shrink[key] = lookup(source)
            elif source is None:
                unknown.setdefault(item.run.name, unknown_reason(item, key))
            else:
                unknown.setdefault(item.run.name, why)
    notes = []
    asked = {run.name for run, o in zip(runs, options, strict=True) if o != DecayOptions()}
    for run, why in unknown.items():
        note = (
            f"run {run}: the weight decay's shrink factor is unknown ({why}); "
            "decay_shrink and delta_m_learned are left empty there"
        )
        notes.append(note)
        if run in asked:  # the user's option could not be used: say so loudly
            warnings.warn(f"note: {note}", UserWarning, stacklevel=3)
    return notes
