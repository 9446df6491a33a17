"""The one-line notices and refusals ``compare`` gives before reading any matrix: bad
options, BASE and RUN that look swapped, the same run given twice, QLoRA runs compared
against a full-precision base, resized vocabularies, and a warning every checkpoint of a
run repeats, said once for the run."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

from wdanalysis.errors import CheckpointFormatError, WDAnalysisError
from wdanalysis.loaders.checkpoint_kinds import FullModel
from wdanalysis.loaders.quantized_training import quantized_base
from wdanalysis.loaders.run_names import same_file
from wdanalysis.loaders.runs import Run, open_checkpoint, step_folders
from wdanalysis.storage.hub_cache import resolve_model_path
from wdanalysis.storage.safe_regex import REGEX_CHARS, check_pattern
from wdanalysis.weights.bound_checkpoint import BoundCheckpoint

SWAPPED = "BASE and RUN look swapped"
SWAP_HINT = "the pretrained model comes first: wdanalysis compare BASE RUN [RUN ...]"


def check_options(modules: Sequence[str] | None, workers: int | None) -> None:
    """Bad options fail at once, in one line (not as a traceback after reading headers)."""
    if workers is not None and (
        isinstance(workers, bool) or not isinstance(workers, int) or workers < 1
    ):
        raise WDAnalysisError(f"workers must be a positive integer, got {workers!r}")
    for name in modules or ():
        if any(ch in name for ch in REGEX_CHARS):  # else a plain name: never compiled
            check_pattern(name, "--modules")  # matched by RE2 in linear time, or refused


def once_per_run(run: Run, bind: Callable) -> list:
    """``bind(checkpoint)`` for every checkpoint of ``run``, in order.

    A warning that several checkpoints repeat (the same text but for the checkpoint's own
    path, e.g. a saved classifier the base lacks) is said once, with how many more
    checkpoints of the run it concerns, instead of once per checkpoint.
    """
    results, said = [], {}
    for ckpt in run.checkpoints:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            results.append(bind(ckpt))
        for w in caught:
            key = (w.category, str(w.message).replace(str(ckpt.path), "\0"))
            said.setdefault(key, [str(w.message), 0])[1] += 1
    for (category, _), (text, count) in said.items():
        more = f" (the same in {count - 1} more checkpoint(s) of {run.name})" if count > 1 else ""
        warnings.warn(text + more, category, stacklevel=3)
    return results


def note_quantized_training(runs: list[Run]) -> None:
    """One line per QLoRA run: W0 here is the full-precision base, not the one it trained on."""
    for run in runs:
        scheme = next(filter(None, (quantized_base(c.path) for c in run.checkpoints)), None)
        if scheme:
            warnings.warn(
                f"note: {run.name}: its adapter was trained against a {scheme} quantization of "
                "the base; W0 here is the base as given (full precision), so ΔM/ΔD measure the "
                "adapter's update applied to those weights, not the change of the quantized "
                "model it trained (the live callback's rows measure that)",
                stacklevel=3,
            )


def warn_rows_added(bound: list[BoundCheckpoint], selected, shapes) -> None:
    """One warning per run whose vocabulary was resized (added tokens)."""
    chosen = set(selected)
    by_run: dict[str, dict[str, int]] = {}
    for item in bound:
        for key, n in item.rows_added.items():
            if key in chosen:
                by_run.setdefault(item.run.name, {})[key] = n
    for run, added in by_run.items():
        what = ", ".join(f"{key} +{n}" for key, n in added.items())
        warnings.warn(
            f"run {run}: rows beyond the base's in {what} (a vocabulary resized for added "
            "tokens): ΔM/ΔD compare the base's rows only; the column rows_added counts "
            "the rows left out",
            UserWarning,
            stacklevel=3,
        )


def open_base_or_say_swapped(base, runs: list[Run]) -> FullModel:
    """The base model; a training run (``checkpoint-N`` sub-folders) or an adapter given as
    BASE is refused in one line saying that BASE and RUN look swapped."""
    path = resolve_model_path(base)
    try:
        opened = open_checkpoint(path)
    except CheckpointFormatError as error:
        if path.is_dir() and step_folders(path):
            raise CheckpointFormatError(
                f"this is a training run (checkpoint-N sub-folders), not a base model: {SWAPPED}",
                base,
                SWAP_HINT,
            ) from None
        raise error from None
    if isinstance(opened, FullModel):
        return opened
    plain = [run.name for run in runs if _looks_like_a_base(run)]
    if plain:
        raise CheckpointFormatError(
            f"the base must be a full model, not an adapter, and RUN {plain[0]} is a full "
            f"model without training steps: {SWAPPED}",
            base,
            SWAP_HINT,
        )
    raise CheckpointFormatError(
        "the base must be a full model, not an adapter",
        base,
        "pass the pretrained model the adapter was trained on",
    )


def _looks_like_a_base(run: Run) -> bool:
    """A one-checkpoint run of full weights and no step: what a base model looks like."""
    return len(run.checkpoints) == 1 and all(
        isinstance(c, FullModel) and c.step is None for c in run.checkpoints
    )


def warn_duplicate_runs(runs: list[Run]) -> None:
    """One warning per file or folder given more than once (however it was written: the
    resolved paths are compared): it would be analysed twice, as ``name`` and ``name#2``."""
    seen: dict[str, list[str]] = {}
    for run in runs:
        seen.setdefault(same_file(run.path), []).append(run.name)
    for path, names in seen.items():
        if len(names) > 1:
            warnings.warn(
                f"{path} is given {len(names)} times as RUN ({', '.join(names)}): it is "
                "analysed once per time given; drop the repeats unless that is meant",
                UserWarning,
                stacklevel=3,
            )


def warn_run_is_base(base: FullModel, runs: list[Run]) -> None:
    """A RUN that is the BASE itself (the same path given as both) is warned about."""
    for run in runs:
        if same_file(run.path) == same_file(base.path):
            warnings.warn(
                f"RUN {run.name} is the BASE itself ({same_file(base.path)}): its ΔM and ΔD "
                "are all 0; BASE and RUN look swapped or repeated",
                UserWarning,
                stacklevel=3,
            )
