"""Live ΔM/ΔD on the dashboards a ``Trainer`` reports to (``TrainingArguments.report_to``).

At each tracked step, per kind of matrix: the layer means of ΔM and ΔD and the Pearson r of
ΔM on ΔD across the layers at that step, as computed by
:func:`wdanalysis.stats.fits.fit_lines` (NaN, i.e. left out, where undefined)::

    wdanalysis/<kind>/delta_m    wdanalysis/<kind>/delta_d    wdanalysis/<kind>/pearson_r

and, where the weight decay's shrink factor is known (issue 36), the same for ΔM less the
decay's shrinkage (``delta_m_learned``), beside ΔM::

    wdanalysis/<kind>/delta_m_learned    wdanalysis/<kind>/pearson_r_learned

``<kind>`` names the matrix by its full identity, as the figures label a kind
(:func:`wdanalysis.plots.kinds.kind_label`): the non-empty values of ``component``,
``stack`` and ``attention``, then the module, joined by ``_``: ``q_proj`` for LLaMA or
BERT (no such distinction), ``encoder_self_q``, ``decoder_self_q`` and ``decoder_cross_q``
for T5, whose kinds are never pooled (:func:`kind_tag`).

At the end of training, Figure 2 of the whole tracked table
(:func:`wdanalysis.plots.figures.plot_figure2`), one image per kind, tagged
``wdanalysis/<kind>/figure2``.

* **TensorBoard**: scalars and images in their own event files, in
  ``$TENSORBOARD_LOGGING_DIR/wdanalysis`` or else ``<output_dir>/runs/wdanalysis``: a run
  named ``wdanalysis`` beside the Trainer's own under ``tensorboard --logdir <output_dir>/runs``.
* **Weights & Biases**: logged to the run the Trainer's ``WandbCallback`` started, against
  its step axis ``train/global_step``; the figures as ``wandb.Image``.
* **MLflow**: metrics of the run the Trainer's ``MLflowCallback`` started (by its id, so the
  figures still reach it after that callback ended the run), figures as artifacts
  ``wdanalysis/figure2_<kind>.png``.
"""

from __future__ import annotations

import io
import math
import os
from pathlib import Path

import numpy as np
import pandas as pd

__all__ = ["BACKENDS", "Dashboards", "kind_tag", "step_scalars"]

BACKENDS = ("tensorboard", "wandb", "mlflow")


def wanted(report_to) -> list[str]:
    """The backends among ``report_to`` that wdanalysis logs to (``"all"``: every one)."""
    names = [report_to] if isinstance(report_to, str) else list(report_to or [])
    names = [str(n).lower() for n in names]
    if "all" in names:
        return list(BACKENDS)
    return [n for n in BACKENDS if n in names]


def kind_tag(identity: dict[str, str], module: str) -> str:
    """The tag part of one kind of matrix: its figure label (component, stack, attention;
    empty values left out) and the module, joined by ``_``: ``decoder_cross_q``."""
    from wdanalysis.plots.kinds import kind_label

    return "_".join([*kind_label(identity).split(), str(module)])


def _labelled(table: pd.DataFrame) -> pd.DataFrame:
    """``table`` with ``module`` naming the kind too (:func:`kind_tag`), where it has one."""
    from wdanalysis.table.schema import IDENTITY_COLUMNS, as_text, upgrade_table

    table = upgrade_table(table)
    identity = {c: as_text(table[c]).tolist() for c in IDENTITY_COLUMNS}
    labels = [
        kind_tag({c: identity[c][i] for c in IDENTITY_COLUMNS}, module)
        for i, module in enumerate(table["module"])
    ]
    return table.assign(module=labels)


def step_scalars(rows: pd.DataFrame) -> dict[str, float]:
    """The scalars of one tracked step: per module, layer-mean ΔM, ΔD and Pearson r; the
    learned ΔM's mean and r too for the modules where every row has it."""
    from wdanalysis.stats.fits import fit_lines
    from wdanalysis.table.schema import with_y

    rows = _labelled(rows)
    by = ("method", "run", "module")
    fits = fit_lines(rows, by=by, per_step=False, n_boot=0)
    r_of = dict(zip(fits["module"], fits["pearson_r"], strict=True))
    known = rows.groupby("module", sort=False)["delta_m_learned"].transform(
        lambda column: column.notna().all()
    )
    learned = rows[known.astype(bool)]
    r_learned = {}
    if len(learned):
        fits = fit_lines(with_y(learned, "delta_m_learned"), by=by, per_step=False, n_boot=0)
        r_learned = dict(zip(fits["module"], fits["pearson_r"], strict=True))
    scalars: dict[str, float] = {}
    for module, group in rows.groupby("module", sort=False):
        scalars[f"wdanalysis/{module}/delta_m"] = float(group["delta_m"].mean())
        if module in set(learned["module"]):
            scalars[f"wdanalysis/{module}/delta_m_learned"] = float(group["delta_m_learned"].mean())
        scalars[f"wdanalysis/{module}/delta_d"] = float(group["delta_d"].mean())
        scalars[f"wdanalysis/{module}/pearson_r"] = float(r_of.get(module, math.nan))
        if module in set(learned["module"]):
            scalars[f"wdanalysis/{module}/pearson_r_learned"] = float(
                r_learned.get(module, math.nan)
            )
    return scalars


def _png(figure) -> tuple[bytes, np.ndarray]:
    """The figure as PNG bytes and as an (H, W, 3) uint8 array."""
    from matplotlib.image import imread

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=80, bbox_inches="tight")
    data = buffer.getvalue()
    pixels = imread(io.BytesIO(data), format="png")
    return data, (np.asarray(pixels)[..., :3] * 255).round().astype(np.uint8)


class _TensorBoard:
    def __init__(self, args):
        from torch.utils.tensorboard import SummaryWriter

        root = os.environ.get("TENSORBOARD_LOGGING_DIR") or Path(args.output_dir) / "runs"
        self.writer = SummaryWriter(log_dir=str(Path(root) / "wdanalysis"))

    def scalars(self, values: dict[str, float], step: int) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()

    def image(self, tag: str, figure, pixels: np.ndarray, step: int) -> None:
        self.writer.add_image(tag, pixels, step, dataformats="HWC")

    def close(self) -> None:
        self.writer.close()


class _Wandb:
    def __init__(self, args):
        import wandb

        if wandb.run is None:
            raise RuntimeError("report_to names wandb, but no W&B run is active")
        self.wandb, self.run = wandb, wandb.run

    def scalars(self, values: dict[str, float], step: int) -> None:
        self.run.log({**values, "train/global_step": step})

    def image(self, tag: str, figure, pixels: np.ndarray, step: int) -> None:
        self.run.log({tag: self.wandb.Image(pixels), "train/global_step": step})

    def close(self) -> None:
        pass  # the run is the Trainer's: it ends it


class _Mlflow:
    def __init__(self, args):
        import mlflow

        run = mlflow.active_run()
        if run is None:
            raise RuntimeError("report_to names mlflow, but no MLflow run is active")
        self.client, self.run_id = mlflow.MlflowClient(), run.info.run_id

    def scalars(self, values: dict[str, float], step: int) -> None:
        for tag, value in values.items():
            if math.isfinite(value):  # MLflow stores no NaN gaps; an undefined r is left out
                self.client.log_metric(self.run_id, tag, value, step=step)

    def image(self, tag: str, figure, pixels: np.ndarray, step: int) -> None:
        name = tag.split("/")[1]
        self.client.log_figure(self.run_id, figure, f"wdanalysis/figure2_{name}.png")

    def close(self) -> None:
        pass


_SINKS = {"tensorboard": _TensorBoard, "wandb": _Wandb, "mlflow": _Mlflow}


class Dashboards:
    """The dashboards one training reports to; see the module docstring."""

    def __init__(self, sinks: dict):
        self.sinks = sinks

    @classmethod
    def open(cls, args, tracker) -> Dashboards | None:
        """The sinks ``args.report_to`` names; one that cannot open is reported and skipped."""
        sinks = {}
        for name in wanted(getattr(args, "report_to", None)):
            try:
                sinks[name] = _SINKS[name](args)
            except Exception as error:  # noqa: BLE001 - the rows and the training go on
                tracker.warn_once(f"wdanalysis does not log to {name}: {error}")
        return cls(sinks) if sinks else None

    def log(self, rows: pd.DataFrame, step: int) -> None:
        values = step_scalars(rows)
        for sink in self.sinks.values():
            sink.scalars(values, step)

    def finish(self, table_path: Path) -> None:
        """Figure 2 of the whole tracked table, one image per module; then close."""
        from wdanalysis.plots.figures import plot_figure2
        from wdanalysis.table.schema import read_table

        try:
            table = _labelled(read_table(table_path))
            step = int(table["step"].max())
            for module in dict.fromkeys(table["module"]):
                figure = plot_figure2(table, module=module, dpi=80)
                _, pixels = _png(figure)
                for sink in self.sinks.values():
                    sink.image(f"wdanalysis/{module}/figure2", figure, pixels, step)
        finally:
            for sink in self.sinks.values():
                sink.close()
