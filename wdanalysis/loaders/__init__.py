"""Loaders: what a path holds (full model, PEFT adapter — LoRA/DoRA, or another PEFT tuner
merged by PEFT itself —, training run) and the other
ecosystems' ``formats/``. May import :mod:`~wdanalysis.storage` and :mod:`~wdanalysis.errors`."""
