"""Kinds of matrices in a deltas table, for the figures: one row of panels and one fit
per kind (component, stack, attention kind; :mod:`wdanalysis.weights.identity`)."""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd

from wdanalysis.table.schema import IDENTITY_COLUMNS, as_text, identity_columns

__all__ = ["identity_frame", "kind_label", "kinds_of", "of_kind", "pooled_fit"]


def identity_frame(frame: pd.DataFrame, columns: Sequence[str]) -> pd.DataFrame:
    """The identity columns as strings, an empty cell (NaN from CSV) as ""."""
    return pd.DataFrame({c: as_text(frame[c]) for c in columns}, index=frame.index)


def kinds_of(data: pd.DataFrame, pool: bool = False) -> list[dict[str, str]]:
    """The kinds of matrices in ``data`` (values of the identity columns that differ), in
    table order: one dict per kind, ``[{}]`` when there is one kind or ``pool`` is set."""
    columns = identity_columns(data, pool)
    if not columns:
        return [{}]
    rows = identity_frame(data, columns).drop_duplicates()
    return [dict(zip(columns, values, strict=True)) for values in rows.itertuples(index=False)]


def kind_label(kind: dict[str, str]) -> str:
    """``text_encoder_2 encoder``, ``decoder cross``, … (empty values left out)."""
    return " ".join(v for v in kind.values() if v)


def of_kind(frame: pd.DataFrame, kind: dict[str, str]) -> pd.DataFrame:
    """The rows of ``frame`` of one kind (``{}``: all of them)."""
    if not kind:
        return frame
    same = (identity_frame(frame, list(kind)) == pd.Series(kind)).all(axis=1)
    return frame.loc[same.to_numpy(dtype=bool)]


def pooled_fit(fits: pd.DataFrame, run: str, module_rows: pd.DataFrame) -> pd.Series | None:
    """The pooled fit of these rows: same run, module and, where the fits keep them apart,
    the same kind (identity columns)."""
    rows = fits.loc[(fits["scope"] == "pooled") & (fits["run"].astype(str) == run)]
    if "module" in rows.columns and len(rows) > 1:
        rows = rows.loc[rows["module"].isin(module_rows["module"].unique())]
    for column in IDENTITY_COLUMNS:
        if len(rows) > 1 and column in rows.columns and column in module_rows.columns:
            wanted = set(identity_frame(module_rows, [column])[column])
            same = identity_frame(rows, [column])[column].isin(wanted)
            rows = rows.loc[same.to_numpy(dtype=bool)]
    return rows.iloc[0] if len(rows) else None
