"""``WeightDecompositionCallback``: live ΔM/ΔD for a ``transformers.Trainer``.

A thin shell over :class:`wdanalysis.tracking.tracker.Tracker`::

    from wdanalysis import WeightDecompositionCallback

    trainer = Trainer(model, args, ..., callbacks=[
        WeightDecompositionCallback("path/to/base", every=50, out="run/tracking.csv")
    ])

``transformers`` stays optional: the class is built on first use, so importing wdanalysis
never imports it.
"""

from __future__ import annotations

from pathlib import Path

from wdanalysis.tracking.tracker import Tracker


def _build():
    try:
        from transformers import TrainerCallback
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError(
            "WeightDecompositionCallback needs transformers: pip install transformers"
        ) from error

    class WeightDecompositionCallback(TrainerCallback):
        """ΔM/ΔD of the selected weights every ``every`` optimizer steps and at the end.

        ``base``: the pretrained model (file or folder) the training started from.
        ``out``: the CSV table (columns of ``deltas.csv``) the rows are appended to.
        ``modules``/``axis``: as in :func:`wdanalysis.compare`. ``run``: the ``run`` column
        (default: the name of the Trainer's ``output_dir``, as ``compare`` names that run).

        Works for full fine-tuning, PEFT LoRA and PEFT DoRA models. A wrong base is refused
        when training begins; a failure later stops the tracking, never the training.
        """

        def __init__(
            self,
            base: str | Path,
            every: int,
            out: str | Path,
            modules: list[str] | None = None,
            axis: str = "out",
            run: str | None = None,
        ):
            self.tracker = Tracker(base, out, every, modules, axis, run)

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            tracker = self.tracker
            if tracker.run_name is None and getattr(args, "output_dir", None):
                tracker.run_name = Path(args.output_dir).name
            if _is_main(state):
                tracker.begin(model, state.global_step)

        def on_step_end(self, args, state, control, **kwargs):
            if self.tracker.due(state.global_step):
                self.tracker.track(state.global_step)

        def on_train_end(self, args, state, control, **kwargs):
            if self.tracker.active:
                self.tracker.track(state.global_step)

    return WeightDecompositionCallback


def _is_main(state) -> bool:
    return bool(getattr(state, "is_world_process_zero", True))


def __getattr__(name: str):
    if name == "WeightDecompositionCallback":
        cls = _build()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
