"""``WeightDecompositionCallback``: live ΔM/ΔD for a ``transformers.Trainer``.

A thin shell over :class:`wdanalysis.tracking.tracker.Tracker`:

```python
from wdanalysis import WeightDecompositionCallback

trainer = Trainer(model, args, ..., callbacks=[
    WeightDecompositionCallback("path/to/base", every=50, out="run/tracking.csv")
])
```

A tracking problem never ends the training: every hook is guarded, and a setup that
cannot be tracked (a wrong base, an unreadable table, a model not understood) is said once,
as a warning, when training begins; the training goes on untracked. Under FSDP2 or ZeRO-3
every rank takes part in reading the sharded weights (:mod:`wdanalysis.tracking.ranks`);
rank 0 writes. With ``report_to`` naming TensorBoard, W&B or MLflow, the layer means and
Pearson r go there too (:mod:`wdanalysis.tracking.dashboards`).

``transformers`` stays optional: the class is built on first use, so importing wdanalysis
never imports it.
"""

from __future__ import annotations

from pathlib import Path

from wdanalysis.errors import WDAnalysisError
from wdanalysis.loaders.quantized_training import write_marker
from wdanalysis.tracking import ranks
from wdanalysis.tracking.dashboards import Dashboards
from wdanalysis.tracking.decay import LiveShrink
from wdanalysis.tracking.tracker import Tracker, read_steps


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

        Works for full fine-tuning, PEFT LoRA and PEFT DoRA models, over full-precision or
        bitsandbytes 4/8-bit bases (QLoRA), unsharded or under FSDP2/ZeRO-3. A base that is
        wrong is reported when training begins; any failure stops the tracking, never the
        training.
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
            self.shrink = LiveShrink()  # the decay's S, from the optimizer's groups
            self.start = 0
            self.sharded = False
            self.dashboards: Dashboards | None = None

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            tracker = self.tracker
            self.shrink, self.start = LiveShrink(), state.global_step
            if state.global_step:  # resumed: the updates before it were not seen
                self.shrink.unknown = (
                    f"resumed at step {state.global_step}: the decay of the earlier updates "
                    "is unknown to the callback"
                )
            tracker.shrink = self.shrink
            if tracker.run_name is None and getattr(args, "output_dir", None):
                tracker.run_name = Path(args.output_dir).name
            self.sharded = _guard(tracker, lambda: _model_sharded(model), False)
            if not (self.sharded or _is_main(state)):
                return
            tracker.writes = _is_main(state)
            if not self.sharded:
                _guard(tracker, lambda: tracker.begin(model, state.global_step))
            else:
                _begin_on_every_rank(tracker, model, state.global_step)
            if tracker.active and tracker.writes:
                self.dashboards = _guard(tracker, lambda: Dashboards.open(args, tracker), None)

        def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
            if optimizer is not None and self.tracker.active:
                _count(self.shrink, lambda: self.shrink.before_update(optimizer))

        def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
            if optimizer is not None and self.tracker.active:
                _count(self.shrink, lambda: self.shrink.after_update(optimizer))

        def on_step_end(self, args, state, control, **kwargs):
            seen = self.shrink.calls + self.start
            if seen != state.global_step and not self.shrink.unknown:  # an update not seen
                self.shrink.unknown = (
                    f"the callback saw {self.shrink.calls} of the "
                    f"{state.global_step - self.start} optimizer updates"
                )
            if self.tracker.due(state.global_step):
                self._track(state.global_step)

        def on_save(self, args, state, control, **kwargs):
            live, tracker = self.tracker.live, self.tracker
            if tracker.writes and live is not None and live.quantized:
                folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
                _guard(tracker, lambda: folder.is_dir() and write_marker(folder, live.quantized))

        def on_train_end(self, args, state, control, **kwargs):
            if self.tracker.active:
                self._track(state.global_step)
            self.tracker.close()  # the table may be written by another run now
            if self.dashboards is not None:
                dashboards, self.dashboards = self.dashboards, None
                _guard(self.tracker, lambda: dashboards.finish(self.tracker.out), None, True)

        def _track(self, step: int) -> None:
            tracker = self.tracker
            ok = _guard(tracker, lambda: tracker.track(step), False)
            if self.sharded and not ranks.all_agree(ok, tracker.live.device) and tracker.active:
                tracker.stop(RuntimeError(f"tracking failed on another rank at step {step}"))
            if ok and self.dashboards is not None and tracker.last_rows is not None:
                _guard(tracker, lambda: self.dashboards.log(tracker.last_rows, step), None, True)

    return WeightDecompositionCallback


def _guard(tracker: Tracker, call, failed=None, keep_tracking: bool = False):
    """``call()``, or ``failed`` after reporting the error once (the training goes on).

    ``keep_tracking``: a dashboard failure is reported but the rows go on being written.
    """
    try:
        return call()
    except Exception as error:  # noqa: BLE001 - a tracking problem never ends the training
        if keep_tracking:
            tracker.warn_once(f"logging to the dashboards failed: {error}")
        elif tracker.failure is None:
            tracker.stop(error)
        return failed


def _count(shrink: LiveShrink, call) -> None:
    """Follow the decay's S; a failure only leaves ``delta_m_learned`` empty."""
    try:
        call()
    except Exception as error:  # noqa: BLE001 - a tracking problem never ends the training
        shrink.unknown = f"reading the optimizer's groups failed: {error}"


def _begin_on_every_rank(tracker: Tracker, model, step: int) -> None:
    """Begin on every rank of a sharded run, agreeing before each collective call."""
    device = _device(model)
    bound = _guard(tracker, lambda: tracker.bind(model, step) or True, False)
    if not ranks.all_agree(bound, device):
        if tracker.failure is None:
            tracker.stop(WDAnalysisError("tracking could not begin on another rank"))
        return
    # The steps already written, as rank 0 reads them (or why it could not).
    done = None
    if tracker.writes:
        try:
            done = read_steps(tracker.out)
        except Exception as error:  # noqa: BLE001 - sent to the other ranks as text
            done = str(error)
    done = ranks.from_first(done)
    if isinstance(done, str):
        tracker.stop(WDAnalysisError(done))
        return
    checked = _guard(tracker, lambda: tracker.check(step, done) or True, False)  # collective
    if not ranks.all_agree(checked, device) and tracker.active:
        tracker.stop(WDAnalysisError("tracking could not begin on another rank"))


def _model_sharded(model) -> bool:
    from wdanalysis.engine.live_tensors import is_sharded

    return any(is_sharded(p) for p in model.parameters())


def _device(model):
    return next(iter(model.parameters())).device


def _is_main(state) -> bool:
    return bool(getattr(state, "is_world_process_zero", True))


def __getattr__(name: str):
    if name == "WeightDecompositionCallback":
        cls = _build()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
