"""ΔM/ΔD of a model while it trains: rows appended to a table, no checkpoint needed.

:class:`Tracker` is the framework-free core behind
:class:`~wdanalysis.tracking.trainer_callback.WeightDecompositionCallback`
(``transformers.Trainer``) and ``wdanalysis train --track-every N``:

* ``begin(model, step)`` opens the base, matches it to the model and refuses, with the
  one-line :class:`~wdanalysis.errors.WDAnalysisError`, a base that is missing or belongs to
  another model. It reads the steps already in the table, so a resumed run adds no
  duplicates. Its two halves, ``bind`` (local) and ``check`` (reads a weight whole), let
  the ranks of a sharded run agree in between (:mod:`wdanalysis.tracking.ranks`).
* Over a bitsandbytes-quantized base (QLoRA) W0 is the dequantized base the model computes
  with, said once in a note.
* ``track(model, step)`` computes the rows of one step through the streaming engine (on the
  model's device, float64 sums: the numbers ``compare`` gives for a checkpoint saved at
  that step) and writes them. A failure here is reported once as a warning and stops the
  tracking; the training and the rows already written are untouched.

The table has the columns of ``deltas.csv``. Every write replaces the file atomically
(temporary file, fsync, rename), so a process killed at any moment leaves the table as it
was before or after the write: whole lines only.
"""

from __future__ import annotations

import glob
import io
import warnings
from dataclasses import replace
from pathlib import Path

import pandas as pd
import torch
from torch import nn

from wdanalysis.engine.decomposition import AXES
from wdanalysis.engine.live_model import LiveModel, bind_model, check_same_weights
from wdanalysis.engine.streaming import Engine
from wdanalysis.errors import WDAnalysisError
from wdanalysis.loaders.runs import Run, aligner_for, open_base, refuse_quantized
from wdanalysis.storage.atomic_write import atomic_path
from wdanalysis.storage.out_folder import acquire_lock, release_lock
from wdanalysis.storage.small_files import regular_file
from wdanalysis.table.schema import COLUMNS, deltas_row
from wdanalysis.tracking import decay
from wdanalysis.weights.fused import fused_layouts
from wdanalysis.weights.identity import identity_namer
from wdanalysis.weights.layout import stored_transposed
from wdanalysis.weights.selection import select_targets

TRACKING_BUDGET = 32 << 20  # bytes of base blocks in flight (FT): small beside a model


class Tracker:
    """Computes and appends the ΔM/ΔD rows of a model being trained; see module docstring."""

    def __init__(
        self,
        base: str | Path,
        out: str | Path,
        every: int,
        modules: list[str] | None = None,
        axis: str = "out",
        run: str | None = None,
    ):
        if axis not in AXES:
            raise WDAnalysisError(f"axis must be 'out' or 'in', got {axis!r}")
        if int(every) < 1:
            raise WDAnalysisError(f"every must be a positive number of steps, got {every!r}")
        self.base_path, self.out, self.every = Path(base), Path(out), int(every)
        self.modules, self.axis, self.run_name = modules, axis, run
        self.live: LiveModel | None = None
        self.parts: dict = {}  # fused base key -> the parts selected of it
        self.done: set[int] = set()
        self.active = False
        self.failure: BaseException | None = None
        self.writes = True  # False on the other ranks of a sharded run: they compute only
        self.bound: tuple | None = None
        self.last_rows: pd.DataFrame | None = None  # the rows of the last tracked step
        self.lock: Path | None = None  # the table's lock file while this tracker writes
        # S of the weight decay (decay_shrink/delta_m_learned): the bundled trainer's
        # ShrinkTracker or a callback's LiveShrink; None: unknown, the columns stay empty
        self.shrink: decay.ShrinkSource | None = None
        self.decay_note = ""  # why decay_shrink is empty, where it is

    # -- begin ----------------------------------------------------------------------

    def begin(self, model: nn.Module, step: int = 0) -> None:
        """Bind ``model`` to the base and read the table's steps; refuses a wrong base."""
        self.bind(model, step)
        self.check(step)

    def bind(self, model: nn.Module, step: int = 0) -> None:
        """Match ``model`` to the base on disk (no collective call, even when sharded)."""
        base = open_base(self.base_path)
        refuse_quantized(base.store, "base model")
        shapes = {k: base.store.shape(k) for k in base.store.keys()}
        layout = stored_transposed(base, [], None, aligner_for(base))  # the rule compare applies
        fused = fused_layouts(base.path, shapes, layout)  # q/k/v of fused weights apart
        selected, self.parts = select_targets(shapes, self.modules, str(self.base_path), fused)
        name = self.run_name or self.out.parent.name or "run"
        run = Run(self.out.parent, name, [])
        live = bind_model(model, self.base_path, selected, base, run, layout)
        self.bound = (live, selected, base)
        if live.quantized and self.writes:
            warnings.warn(
                f"note: W0 is the quantized base ({live.quantized}), dequantized as "
                "bitsandbytes does: ΔM/ΔD measure the adapter's change of the weights the "
                "model computes with (compare against the full-precision base measures "
                "something else)",
                UserWarning,
                stacklevel=3,
            )

    def check(self, step: int = 0, done: set[int] | None = None) -> None:
        """Refuse a base that is not the model's; read (or take) the steps already written.

        Reads one weight of the model whole: under sharding, a collective call.
        """
        live, selected, base = self.bound
        if live.method != "FT" or step == 0:  # FT weights have moved once training began
            check_same_weights(live, base, selected[0], self.base_path)
        if self.writes and self.lock is None:  # one writer per table; stale temporaries go
            self.lock = acquire_lock(self.out)
            remove_stale_temporaries(self.out)
        self.done = read_steps(self.out) if done is None else set(done)
        if step == 0 and self.done:
            raise WDAnalysisError(
                f"the table already holds steps up to {max(self.done)} of an earlier run, "
                "and this training starts from step 0",
                self.out,
                "delete it, choose another out, or resume the earlier run",
            )
        self.live, self.selected, self.active = live, selected, True
        self.name_of = identity_namer(base)

    # -- each step ------------------------------------------------------------------

    def due(self, step: int) -> bool:
        return self.active and step % self.every == 0 and step not in self.done

    def track(self, step: int) -> bool:
        """Write the rows of ``step`` unless already there; ``False`` once tracking stopped."""
        if not self.active or step in self.done:
            return self.active
        try:
            rows = self.compute(step)
            if self.writes:
                append_rows(self.out, rows)
        except Exception as error:  # noqa: BLE001 - the training must go on
            self.stop(error)
            return False
        self.done.add(step)
        self.last_rows = rows
        return True

    def compute(self, step: int) -> pd.DataFrame:
        """The rows of the model as it is now, labelled ``step``."""
        live = self.live
        live.bound.checkpoint.step = step
        self.decay_note = decay.fill(live, self.selected, self.shrink)
        if self.decay_note and self.shrink is not None and self.writes:
            self.warn_once(
                f"note: decay_shrink and delta_m_learned are left empty ({self.decay_note})",
                UserWarning,
            )
        rows: list[dict] = []
        live_args = (live.base, [live.bound], self.axis, live.transposed, live.device, 1)
        engine = Engine(*live_args, TRACKING_BUDGET, self.parts)

        def on_result(key, item, change):
            if change is None:
                # The model's own weights failed (e.g. NaN/Inf): stop the run at once, with
                # the failure the engine keeps for its one checkpoint, rather than read the
                # base for every weight still to come.
                raise engine.failures[0]
            shrink = live.bound.decay_shrink.get(key)
            rows.append(_row(live, self.name_of(key), step, self.axis, change, shrink))

        with torch.no_grad():
            engine.run(list(self.selected), on_result)
        table = pd.DataFrame(rows, columns=COLUMNS)
        order = ["component", "stack", "attention", "layer", "module"]
        return table.sort_values(order, kind="stable")

    def hook(self, last_step: int):
        """``on_step(step, model)`` for :func:`wdanalysis.train.train`.

        Its first call (before the first step) begins; later calls track every ``every``
        steps and at ``last_step``.
        """

        def on_step(step: int, model: nn.Module) -> None:
            if self.live is None:
                self.begin(model, step)
            elif self.due(step) or step == last_step:
                self.track(step)

        def use_shrink(source: decay.ShrinkSource) -> None:
            self.shrink = source  # the trainer's exact S (decay_shrink.json's)

        on_step.use_shrink = use_shrink  # called by wdanalysis.train.train
        return on_step

    def stop(self, error: BaseException) -> None:
        """Report a failure once and stop tracking; rows already written stay as they are."""
        began = self.live is not None
        self.active, self.failure = False, error
        self.close()
        text = " ".join(str(error).split()) or type(error).__name__
        what = "stopped" if began else "could not begin"
        self.warn_once(f"weight tracking {what}, training goes on ({self.out}): {text}")

    def close(self) -> None:
        """Let another process write the table (the lock also dies with this process)."""
        if self.lock is not None:
            release_lock(self.lock)
            self.lock = None

    def warn_once(self, message: str, category: type[Warning] = RuntimeWarning) -> None:
        """A warning (``RuntimeWarning``), given once per tracker for each message."""
        said = self.__dict__.setdefault("_said", set())
        if message not in said:
            said.add(message)
            warnings.warn(message, category, stacklevel=4)


def _row(live: LiveModel, name, step: int, axis: str, change, shrink=None) -> dict:
    # live: no checkpoint file behind the row
    if change.part is not None:  # a part of a fused weight: q_proj, k_proj, …
        name = replace(name, module=change.part)
    run = live.bound.run.name
    return deltas_row(live.method, run, step, name, axis, change, decay_shrink=shrink)


def read_steps(path: Path) -> set[int]:
    """Steps already in a tracking table (none when it does not exist yet)."""
    if not path.exists():
        return set()
    regular_file(path)  # a FIFO or device as the table would block or never end
    try:
        columns = list(pd.read_csv(path, nrows=0).columns)
        if columns == [c for c in COLUMNS if c != "label"]:
            raise WDAnalysisError(
                "written by an older wdanalysis (no label column): new rows cannot be "
                "appended to it",
                path,
                "move it aside (wdanalysis plot still reads it) and track afresh",
            )
        if columns != COLUMNS:
            raise ValueError(f"its columns are {columns[:4]}..., not those of deltas.csv")
        table = pd.read_csv(path, usecols=["step"])
    except (ValueError, pd.errors.ParserError, UnicodeDecodeError) as error:
        raise WDAnalysisError(
            f"not a wdanalysis table: {' '.join(str(error).split())}",
            path,
            "choose another out path, or delete the file to start afresh",
        ) from None
    return {int(s) for s in table["step"].dropna()}


def remove_stale_temporaries(path: Path) -> None:
    """The ``.<table>.XXXX.tmp`` files a process killed mid-write left beside ``path``."""
    for stale in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        stale.unlink(missing_ok=True)


def append_rows(path: Path, rows: pd.DataFrame) -> None:
    """Add ``rows`` to the table at ``path`` atomically (the header when it is new)."""
    old = path.read_bytes() if path.exists() else b""
    buffer = io.StringIO()
    rows.to_csv(buffer, index=False, header=not old, lineterminator="\n")
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as handle:
            handle.write(old)
            handle.write(buffer.getvalue().encode("utf-8"))
            handle.flush()
