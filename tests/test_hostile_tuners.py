"""Issue 34: the patterns of a tuner config PEFT merges itself (LoHa here) are decided by
RE2 for the one module merged, with PEFT's rule (checked against PEFT's own merge), so a
catastrophic pattern added to the file cannot hang PEFT's backtracking ``re``."""

from __future__ import annotations

import json

import pytest
from builders import check_table
from test_peft_tuners import _reference, _trained, base  # noqa: F401 - base: a fixture

import wdanalysis
from wdanalysis.errors import CheckpointFormatError

pytest.importorskip("peft", reason="peft is not installed")

EVIL = "(.*.*)*XYZ$"
TARGETS = r".*\.(q_proj|v_proj|down_proj)"


def test_tuner_patterns_decided_by_re2(base, tmp_path):  # noqa: F811
    model, base_folder = base
    folder = tmp_path / "run" / "checkpoint-5"
    extra = {"target_modules": TARGETS, "rank_pattern": {r"layers\.1\..*q_proj": 2}}
    _trained(model, "LOHA", folder, **extra).save_pretrained(folder)
    expected = _reference(model, folder, "LOHA")
    modules = ["q_proj", "v_proj", "down_proj"]
    table = wdanalysis.compare(base_folder, tmp_path / "run", modules=modules, progress=False)
    assert check_table(table, expected, rtol=1e-9, atol=1e-15) == len(table) == 6

    config_file = folder / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config["target_modules"] = f"{EVIL}|{TARGETS}"  # same modules, a hang for Python's re
    config["rank_pattern"] = {EVIL: 3, **config["rank_pattern"]}
    config["alpha_pattern"] = {EVIL: 1.0}
    config_file.write_text(json.dumps(config))
    again = wdanalysis.compare(base_folder, tmp_path / "run", modules=modules, progress=False)
    assert check_table(again, expected, rtol=1e-9, atol=1e-15) == len(again) == 6

    config["modules_to_save"] = ["(a+)+b"]
    config_file.write_text(json.dumps(config))
    with pytest.raises(CheckpointFormatError, match="not a plain module name"):
        wdanalysis.compare(base_folder, tmp_path / "run", modules=modules, progress=False)
