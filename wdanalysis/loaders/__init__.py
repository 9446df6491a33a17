"""Loaders: what a path holds (full model, PEFT adapter, training run) and the other
ecosystems' ``formats/``. May import :mod:`~wdanalysis.storage` and :mod:`~wdanalysis.errors`."""
