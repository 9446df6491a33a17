"""A warning every checkpoint of a run repeats is said once for the run, not once per
checkpoint (a PEFT classifier saved with ``modules_to_save`` that the base lacks)."""

from __future__ import annotations

import warnings

from builders import make_peft_adapter, save_model, tiny_model

import wdanalysis


def test_left_out_module_is_warned_once_per_run(tmp_path):
    model = tiny_model("bert-cls")
    save_model(model.bert, tmp_path / "base")  # the base has no classifier
    for step, seed in ((10, 1), (20, 2), (30, 3)):
        make_peft_adapter(
            model,
            tmp_path / "lora" / f"checkpoint-{step}",
            seed=seed,
            r=2,
            lora_alpha=4,
            target_modules=["query", "value"],
            modules_to_save=["classifier"],
        )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        table = wdanalysis.compare(tmp_path / "base", tmp_path / "lora", progress=False)
    left_out = [str(w.message) for w in caught if "left out" in str(w.message)]
    assert len(left_out) == 1, left_out
    assert "'classifier" in left_out[0] and "2 more checkpoint(s) of lora" in left_out[0]
    assert sorted(table["step"].unique()) == [10, 20, 30]  # every checkpoint still analysed
