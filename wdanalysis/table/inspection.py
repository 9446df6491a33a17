"""``wdanalysis inspect``: say what a path holds before analysing it."""

from __future__ import annotations

import math
from pathlib import Path

from wdanalysis.engine import c_kernel as kernel
from wdanalysis.errors import WDAnalysisError
from wdanalysis.loaders.formats import fp8quant, openclip, stacked_experts
from wdanalysis.loaders.named_adapters import open_runs
from wdanalysis.loaders.runs import AdapterCheckpoint, FullModel
from wdanalysis.weights.fused import fused_layouts
from wdanalysis.weights.selection import module_path, select_targets


def inspect(path: str | Path) -> dict:
    """A description of a checkpoint or run: format, kind, dtypes, steps, adapted modules.

    ``path`` may be a cached hub id ``org/name[@revision]`` (:mod:`wdanalysis.storage.hub_cache`).
    """
    runs = open_runs(path)  # a folder of named PEFT adapters: one run each
    run = runs[0]
    first = run.checkpoints[0]
    info = {
        "path": str(path),
        "kind": "run" if len(run.checkpoints) > 1 or run.skipped else first.kind,
        "method": run.method + (" (full weights)" if run.method == "FT" else ""),
        "steps": [c.step if c.step is not None else "unknown" for c in run.checkpoints],
        "skipped": [f"{p.name}: {why}" for p, why in run.skipped],
    }
    info.update(_describe_full(first) if isinstance(first, FullModel) else _describe_adapter(first))
    if len(runs) > 1:  # each is analysed as its own run, labelled by its name
        info["adapters"] = [f"{r.label} ({r.method})" for r in runs]
    info["sums_backend"] = kernel.describe()  # what compare would run on this machine's CPU
    return info


def _describe_full(ckpt: FullModel) -> dict:
    fused = openclip.present_as_clip(ckpt, [])  # what compare reads: q/k/v apart
    stacked_experts.present_stacked(ckpt, [])  # gpt-oss experts: one (out, in) each
    store = ckpt.store
    shapes = {k: store.shape(k) for k in store.keys()}
    in_out = getattr(store, "in_out", frozenset())
    layouts = fused_layouts(ckpt.path, shapes, lambda k: k in in_out or ckpt.transposed(k))
    try:
        selected, parts = select_targets(shapes, None, str(ckpt.path), layouts)
    except WDAnalysisError:
        selected, parts = [], {}
    names = {p.name for ps in parts.values() for p in ps}
    names |= {module_path(k).rsplit(".", 1)[-1] for k in selected if k not in parts}
    return {
        "format": store.format,
        "dtypes": sorted(store.dtypes()),
        "tensors": len(shapes),
        "parameters": sum(math.prod(s) for s in shapes.values()),
        "model_type": ckpt.model_type,
        "layout": {True: "Conv1D (in, out)", False: "Linear (out, in)"}.get(
            ckpt.conv1d_layout(), "undecided: c_* weights as Conv1D or Linear (no config.json)"
        ),
        "default_modules": sorted(names),
        "default_weights": sum(len(parts.get(k, [k])) for k in selected),
        **({"notes": [_OPENCLIP_NOTE]} if fused else {}),
        **(store.describe() if isinstance(store, fp8quant.Fp8Store) else {}),
        **({"fused_projections": _fused_note(layouts)} if layouts.parts or layouts.refused else {}),
    }


_OPENCLIP_NOTE = (
    "OpenCLIP text encoder: q/k/v rows of attn.in_proj_weight read as self_attn.q_proj/"
    "k_proj/v_proj under text_model.encoder.layers.N"
)


def _describe_adapter(ckpt: AdapterCheckpoint) -> dict:
    adapter = ckpt.adapter
    config = adapter.config
    adapted = adapter.adapted
    ranks = sorted({adapter.store.shape(m.lora_a)[0] for m in adapted.values() if m.lora_a})
    leaves = sorted({name.rsplit(".", 1)[-1] for name in adapted})
    if hasattr(adapter, "describe"):  # other ecosystems (wdanalysis.loaders.formats)
        return {
            "dtypes": sorted(adapter.store.dtypes()),
            "modules_adapted": len(adapted),
            "module_names": leaves if all("." in n for n in adapted) else "—",
            "ranks": ranks,
            **adapter.describe(),
        }
    info = {
        "format": {
            "peft": f"PEFT {'DoRA' if config.use_dora else 'LoRA'} adapter",
            "dora-authors": "DoRA authors' LLM adapter (peft_type DORA)",
            "dora-vlbart": "DoRA authors' VL-BART state dict",
        }[config.format]
        + f" ({adapter.store.format})",
        "dtypes": sorted(adapter.store.dtypes()),
        "modules_adapted": len(adapted),
        "module_names": leaves,
        "ranks": ranks,
        "magnitude_only_modules": sum(1 for m in adapted.values() if not m.lora_b),
        "fan_in_fan_out": config.fan_in_fan_out,
        "base_model": config.raw.get("base_model_name_or_path") or "not named",
    }
    if config.base_init:  # PiSSA/OLoRA/KaSA (wdanalysis.loaders.lora_inits)
        info["format"] = f"PEFT {adapter.method} adapter ({adapter.store.format})"
        info["weight"] = _INIT_WEIGHTS[config.base_init]
    if config.notes:
        info["notes"] = list(config.notes)
    wrapped = stacked_experts.wrapped_parameters(adapter)
    if wrapped:  # PEFT ParamWrapper: one factor pair over all experts, r·experts rows
        info["target_parameters"] = wrapped + ["(LoRA per expert of stacked experts)"]
    if config.format == "dora-vlbart":
        info["scaling"] = "1.0 (VL-BART code applies B@A unscaled)"
    else:
        rule = "alpha/sqrt(r)" if config.use_rslora else "alpha/r"
        info["scaling"] = (
            f"{rule} = {config.lora_alpha:g}/{'sqrt(' if config.use_rslora else ''}{config.r}"
            f"{')' if config.use_rslora else ''} = "
            f"{config.rank_and_scaling('', config.r, ckpt.path)[1]:.6g}"
            + (
                " (rank_pattern/alpha_pattern override some modules)"
                if config.rank_pattern or config.alpha_pattern
                else ""
            )
        )
    return info


_INIT_WEIGHTS = {
    "pissa": "W0 + s·(B@A − B₀A₀), B₀A₀ = PEFT's PiSSA init recomputed from W0 (float32 SVD)",
    "olora": "W0 + s·(B@A − B₀A₀), B₀A₀ = PEFT's OLoRA init recomputed from W0 (float32 QR)",
    "kasa": "W0 − T + s·B·diag(lora_diag)·A, T = the r smallest singular components of W0",
}


def format_inspection(info: dict) -> str:
    """The description :func:`inspect` returns as aligned text, one ``field  value`` a line
    (what ``wdanalysis inspect`` prints)."""
    width = max(len(k) for k in info)
    lines = []
    for key, value in info.items():
        if isinstance(value, list):
            value = ", ".join(str(v) for v in value) if value else "—"
        lines.append(f"{key.replace('_', ' '):<{width}}  {value}")
    return "\n".join(lines)


def _fused_note(layouts) -> str:
    """How many fused weights are split into q/k/v (or gate/up), and why others are not."""
    if layouts.refused:
        return f"{len(layouts.refused)} cannot be split: {next(iter(layouts.refused.values()))}"
    names = sorted({p.name for parts in layouts.parts.values() for p in parts})
    return f"{len(layouts.parts)} split by config.json into {', '.join(names)}"
