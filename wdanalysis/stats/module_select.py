"""Selecting one module's rows of a deltas table by name or by family alias ("query")."""

from __future__ import annotations

import pandas as pd

from wdanalysis.errors import WDAnalysisError

#: Names the same attention projection goes by in different model families, so that
#: ``module="query"`` (paper Fig. 2) and ``module="value"`` (Fig. 6) work on any of them.
MODULE_ALIASES: dict[str, tuple[str, ...]] = {
    "query": ("query", "q_proj", "q", "q_lin", "wq", "to_q", "q_attn"),
    "key": ("key", "k_proj", "k", "k_lin", "wk", "to_k"),
    "value": ("value", "v_proj", "v", "v_lin", "wv", "to_v"),
    "output": ("output", "o_proj", "out_proj", "o", "out_lin", "wo", "to_out", "dense"),
}


def _module_matches(module: str, wanted: str) -> bool:
    names = MODULE_ALIASES.get(wanted.lower())
    if names is None:  # a concrete name: match its alias family too ("q_proj" ~ "query")
        names = next((v for v in MODULE_ALIASES.values() if wanted.lower() in v), (wanted,))
    return module.lower() in names


def select_module(deltas: pd.DataFrame, module: str | None) -> pd.DataFrame:
    """Rows of one module: an exact name ("q_proj") or a family alias ("query", "value").

    With ``module=None`` the table must hold a single module: mixing query and value
    matrices in one scatter would compare unlike things, so we ask rather than guess.
    """
    present = list(dict.fromkeys(deltas["module"].astype(str)))
    if module is None:
        if len(present) > 1:
            raise WDAnalysisError(
                f"the deltas hold {len(present)} modules ({', '.join(present)}); "
                "pick one with module=... (e.g. module='query' for the paper's Figure 2)"
            )
        return deltas
    exact = deltas["module"].astype(str) == module
    if exact.any():
        return deltas.loc[exact]
    alias = deltas["module"].astype(str).map(lambda name: _module_matches(name, module))
    if not alias.any():
        raise WDAnalysisError(
            f"module {module!r} is not in the deltas; present: {', '.join(present)}"
        )
    return deltas.loc[alias.to_numpy(dtype=bool)]
