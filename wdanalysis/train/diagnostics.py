"""What a run's optimizer actually applied: the decoupled-weight-decay dose of each parameter
group, and how far DoRA's magnitudes moved from their initial norms.

Decoupled weight decay (AdamW, Loshchilov & Hutter 2019) multiplies every decayed tensor by
``1 - lr_t * wd`` at each update, whatever the gradient. Over a run that is a factor
``prod_t (1 - lr_t * wd) ≈ exp(-wd * Σ_t lr_t)`` on every row's norm, with the direction left
alone: it acts on the DoRA paper's ΔM and not on its ΔD. ``wd * Σ_t lr_t`` — the *dose* — is
the quantity to compare between runs of different lengths and learning rates (issue 23: the
DoRA authors' 20-epoch runs applied ≈ 0.05 to FT's weights and ≈ 0.5 to DoRA's magnitude).
"""

from __future__ import annotations

import math
from collections import Counter

import torch
from torch import nn

from wdanalysis.train.layers import DoRALinear, base_weight, is_norm, row_norm


def lr_factor(step: int, warmup_steps: int, max_steps: int) -> float:
    """The schedule's multiplier of the peak learning rate at update ``step`` (0-based).

    Linear warm-up over ``warmup_steps`` updates, then linear decay to zero at
    ``max_steps``: the shape of the HF Trainer's ``get_linear_schedule_with_warmup`` that the
    DoRA authors' VL-T5 trainer uses, except that warm-up starts at 1/(w+1) rather than 0
    (no update is taken at lr 0).
    """
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    return max(0.0, (max_steps - step) / max(1, max_steps - warmup_steps))


def lr_factors(warmup_steps: int, max_steps: int) -> list[float]:
    """The multiplier of every update 0..max_steps-1."""
    return [lr_factor(step, warmup_steps, max_steps) for step in range(max_steps)]


def _kind(name: str, in_norm: bool) -> str:
    """A parameter's role for the record: ``lora_A.weight``, ``lora_magnitude_vector``,
    ``weight``, ``bias``, ``norm.weight`` ..."""
    parts = name.split(".")
    if in_norm:
        return "norm." + parts[-1]
    if len(parts) > 1 and parts[-2] in ("lora_A", "lora_B"):
        return ".".join(parts[-2:])
    return parts[-1]


def decay_dose(
    model: nn.Module, groups: list[dict], peak_lr: float, warmup_steps: int, max_steps: int
) -> dict:
    """The decay dose of each AdamW parameter group over the configured schedule.

    Per group: its weight decay, ``sum_lr`` = Σ_t lr_t, ``dose`` = wd · Σ_t lr_t, the exact
    norm factor ``shrink`` = Π_t (1 − lr_t · wd) that the decay alone applies, and which
    kinds of tensors it holds (so a reader sees e.g. that DoRA's magnitudes are decayed).
    The schedule is the configured one: a run resumed with another ``max_steps`` records the
    new schedule's dose, not the mixture its updates actually followed.
    """
    factors = lr_factors(warmup_steps, max_steps)
    sum_lr = peak_lr * math.fsum(factors)
    norm_ids = {
        id(p)
        for module in model.modules()
        if is_norm(module)
        for p in module.parameters(recurse=False)
    }
    names = {id(p): name for name, p in model.named_parameters()}
    records = []
    for group in groups:
        wd = float(group["weight_decay"])
        params = group["params"]
        kinds = Counter(_kind(names.get(id(p), "?"), id(p) in norm_ids) for p in params)
        log_shrink = math.fsum(math.log1p(-peak_lr * f * wd) for f in factors)
        records.append(
            {
                "weight_decay": wd,
                "sum_lr": sum_lr,
                "dose": wd * sum_lr,
                "shrink": math.exp(log_shrink),
                "tensors": len(params),
                "parameters": int(sum(p.numel() for p in params)),
                "kinds": dict(sorted(kinds.items())),
            }
        )
    return {"updates": max_steps, "peak_lr": peak_lr, "sum_lr": sum_lr, "groups": records}


def decayed_dose(record: dict) -> float:
    """The largest dose any group received (the decayed group's; 0 without decay)."""
    return max((g["dose"] for g in record.get("groups", [])), default=0.0)


@torch.no_grad()
def magnitude_movement(model: nn.Module) -> dict[str, dict[str, float]]:
    """How far every DoRA magnitude moved from its initial value ‖W0‖_c, per module name
    suffix (``query``, ``value`` ...): ``mean_abs`` = mean over modules of
    mean_n |m[n] − ‖W0[n]‖|, ``relative`` = that over the mean initial norm, ``max_abs``.

    DoRA initialises m = ‖W0 + s·B·A‖_c with B = 0, i.e. ‖W0‖_c, and W0 never trains, so the
    reference is recomputed from the frozen base layer. A magnitude that silently stopped
    training (torchtune once shipped one) shows as 0 here.
    """
    moved: dict[str, list[tuple[float, float, float]]] = {}
    for name, layer in model.named_modules():
        if not isinstance(layer, DoRALinear):
            continue
        initial = row_norm(base_weight(layer.base_layer)).double()
        change = (layer.lora_magnitude_vector.double() - initial).abs()
        suffix = name.rsplit(".", 1)[-1]
        row = (change.mean().item(), initial.mean().item(), change.max().item())
        moved.setdefault(suffix, []).append(row)
    return {
        suffix: {
            "mean_abs": sum(r[0] for r in rows) / len(rows),
            "relative": sum(r[0] for r in rows) / sum(r[1] for r in rows),
            "max_abs": max(r[2] for r in rows),
            "modules": len(rows),
        }
        for suffix, rows in sorted(moved.items())
    }
