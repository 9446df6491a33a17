"""Whether an adapter checkpoint was trained over a quantized base (QLoRA).

A saved PEFT adapter does not say so: ``adapter_config.json`` names the base model, not
how it was loaded, and PEFT 0.21's model card means to list the bitsandbytes config but
skips it (``create_or_update_model_card`` tests ``hasattr`` on a dict). So the live
tracking callback, which sees the quantized layers, leaves :data:`MARKER` in each
checkpoint folder the Trainer saves; a model card that does list the config counts too.

Offline ``compare`` of such a checkpoint against the full-precision base measures the
adapter's update applied to the unquantized weights, not the change of the quantized model
the adapter was trained on; :func:`quantized_base` lets it say so.
"""

from __future__ import annotations

import json
from pathlib import Path

from wdanalysis.storage.atomic_write import write_text_atomic
from wdanalysis.storage.small_files import read_json, read_small_bytes

__all__ = ["MARKER", "quantized_base", "write_marker"]

MARKER = "wdanalysis_quantized_base.json"
_CARD_PREFIX = "`bitsandbytes` quantization config was used during training"


def write_marker(folder: str | Path, scheme: str) -> Path:
    """Record in checkpoint ``folder`` that its adapter trained over a ``scheme`` base."""
    text = json.dumps({"quantized_base": scheme, "written_by": "wdanalysis live tracking"})
    return write_text_atomic(Path(folder) / MARKER, text + "\n")


def quantized_base(folder: str | Path) -> str | None:
    """The quantization the checkpoint's adapter was trained against, if it is known."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    try:
        marker = read_json(folder / MARKER)
        if isinstance(marker, dict) and isinstance(marker.get("quantized_base"), str):
            return marker["quantized_base"]
    except (OSError, ValueError):
        pass
    try:
        card = read_small_bytes(folder / "README.md", 1 << 20).decode("utf-8", "replace")
    except OSError:
        return None
    if _CARD_PREFIX not in card:
        return None
    lines = [line[2:] for line in card.splitlines() if line.startswith("- ")]
    fields = dict(line.split(": ", 1) for line in lines if ": " in line)
    if fields.get("load_in_8bit") == "True":
        return "bitsandbytes int8"
    return f"bitsandbytes 4-bit {fields.get('bnb_4bit_quant_type', '')}".strip()
