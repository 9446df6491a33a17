"""How much of each dose-study run's ΔM the weight decay alone accounts for.

Decoupled weight decay multiplies every decayed weight by ∏ₜ(1 − lrₜ·wd) (``shrink`` in a
run's ``decay_dose`` record), whatever the gradient does, so with no gradient at all a row of
norm ‖w₀‖ would end with ΔM = (1 − shrink)·‖w₀‖. This script divides each layer's final ΔM
(paper Eq. 2: the mean over rows of |m_T − m₀|) by that decay-only ΔM, (1 − shrink) times the
mean row norm of the base weight, and averages over layers:

* ≈ 1: the run's magnitude change is the decay's uniform shrinkage; the gradient neither adds
  to it nor pushes it back;
* ≫ 1: the gradient moves the magnitudes far more than the decay does.

FT decays the weight itself and DoRA its magnitude vector, so both are comparable; LoRA
decays its factors and never the merged weight, so it has no such ratio and is left out.

    python scripts/decay_share.py figures/       # reads figures/dose_study/*.json

prints a Markdown table and writes ``figures/dose_decay_share.csv`` (atomically).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pandas as pd

from wdanalysis.storage.atomic_write import write_csv_atomic

OUT_FILE = "dose_decay_share.csv"
DECAYED = {"ft": "FT", "dora": "DoRA"}  # methods whose analysed W or m is decayed


def base_row_norms(model_dir: Path, keys) -> dict[str, float]:
    """Mean row norm of each base weight named in ``keys`` (the cells' ``parameter``
    column, the stored key the analysis read), read lazily one tensor at a time."""
    from safetensors import safe_open

    with safe_open(str(model_dir / "model.safetensors"), "pt") as f:
        return {k: f.get_tensor(k).double().norm(dim=1).mean().item() for k in sorted(set(keys))}


def decay_share(cell: dict, norms: dict[str, float]) -> list[dict]:
    """One row per module of a decayed method's cell JSON: final ΔM over decay-only ΔM."""
    method = cell["cell"]["method"]
    if method not in DECAYED:
        return []
    shrink = cell["record"]["decay_dose"]["groups"][0]["shrink"]
    deltas = pd.DataFrame(cell["deltas"])
    last = deltas.loc[deltas["step"] == deltas["step"].max()]
    rows = []
    for module, part in last.groupby("module", sort=True):
        decay_only = [(1.0 - shrink) * norms[key] for key in part["parameter"]]
        ratios = part["delta_m"].to_numpy() / decay_only
        rows.append(
            {
                **{k: cell["cell"][k] for k in ("level", "steps", "seed")},
                "method": DECAYED[method],
                "module": module,
                "decay_dose": cell["summary"][0]["decay_dose"],
                "shrink": shrink,
                "dm_over_decay_only": float(ratios.mean()),
                "dm_over_decay_only_min": float(ratios.min()),
                "dm_over_decay_only_max": float(ratios.max()),
            }
        )
    return rows


def main(folder: str) -> pd.DataFrame:
    from wdanalysis.demo.reproduction import model_path

    root = Path(folder)
    cells = [json.loads(p.read_text()) for p in sorted((root / "dose_study").glob("*.json"))]
    norms = base_row_norms(model_path(), (d["parameter"] for c in cells for d in c["deltas"]))
    table = pd.DataFrame([row for cell in cells for row in decay_share(cell, norms)])
    table = table.sort_values(["steps", "level", "seed", "method", "module"], ignore_index=True)
    write_csv_atomic(table, root / OUT_FILE)
    print("| level | steps | seed | method | module | dose | ΔM / decay-only ΔM [layer min, max] |")
    print("|---|---|---|---|---|---|---|")
    for r in table.itertuples():
        print(
            f"| {r.level} | {r.steps} | {r.seed} | {r.method} | {r.module} | {r.decay_dose:.2g} "
            f"| {r.dm_over_decay_only:.2f} [{r.dm_over_decay_only_min:.2f}, "
            f"{r.dm_over_decay_only_max:.2f}] |"
        )
    return table


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "figures")
