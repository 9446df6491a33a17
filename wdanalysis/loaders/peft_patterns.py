"""The regular expressions of a PEFT tuner config, decided by RE2 before PEFT sees them.

For the tuners PEFT merges itself (:mod:`wdanalysis.loaders.peft_merge`), PEFT matches
``target_modules``, ``exclude_modules``, ``feedforward_modules`` (strings: regexes, full
match), ``rank_pattern`` / ``alpha_pattern`` (``(.*\\.)?(key)$``; C3A and FourierFT
``.*\\.key$``) with Python's backtracking ``re``, where ``"(.*.*)*XYZ$"`` never returns. The
merge runs on a tree holding one module, so each field is decided here for that module's
path (and its parents) by RE2 (:mod:`wdanalysis.storage.safe_regex`), with PEFT's rule,
and replaced by the literal names it selects: PEFT then matches plain names only.
``layers_pattern`` and ``modules_to_save`` (names PEFT pastes into its own regexes) must be
plain module names.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

from wdanalysis.errors import CheckpointFormatError
from wdanalysis.storage.safe_regex import compile_linear, peft_pattern_key

_PLAIN_NAME = re.compile(r"[\w.\-]+")
_SUFFIX_RULE = {"C3A", "FOURIERFT"}  # rank_pattern keys matched as ``.*\.key$``


def decided_for(config, name: str, where: Path):
    """A copy of the PEFT ``config`` whose patterns are literal names, for module ``name``."""
    config = copy.deepcopy(config)
    keys = _tree_keys(name)
    for field in ("target_modules", "exclude_modules", "feedforward_modules"):
        value = getattr(config, field, None)
        if isinstance(value, str) and value != "all-linear":  # a regex, full match
            program = _compiled(value, field, where)
            setattr(config, field, [key for key in keys if program.fullmatch(key)])
    suffix_rule = str(getattr(config, "peft_type", "")).split(".")[-1].upper() in _SUFFIX_RULE
    for field in ("rank_pattern", "alpha_pattern"):
        patterns = getattr(config, field, None)
        if not isinstance(patterns, dict) or not patterns:
            continue
        if all(isinstance(v, list) for v in patterns.values()):
            continue  # AdaLoRA's kept-rank masks: keyed by tensor names, not patterns
        for key in patterns:
            _compiled(key, f"{field} key", where)
        setattr(config, field, _literal_patterns(patterns, name, suffix_rule))
    for field in ("layers_pattern", "modules_to_save"):
        _require_plain_names(getattr(config, field, None), field, where)
    return config


def _tree_keys(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[: i + 1]) for i in range(len(parts))]


def _compiled(pattern: str, what: str, where: Path):
    try:
        return compile_linear(pattern)
    except CheckpointFormatError:
        raise
    except Exception as error:  # UnsafePatternError: say which field of which file
        problem = getattr(error, "problem", str(error))
        raise CheckpointFormatError(f"{what} {pattern!r} {problem}", where) from None


def _literal_patterns(patterns: dict, name: str, suffix_rule: bool) -> dict:
    """``{escaped name: value}`` for the key PEFT would pick for ``name``, else ``{}``."""
    if suffix_rule:  # PEFT: next(key for key in keys if re.match(rf".*\.{key}$", name))
        chosen = next(
            (k for k in patterns if compile_linear(rf".*\.{k}$").match(name) is not None), None
        )
        leaf = name.rsplit(".", 1)[-1]
        return {} if chosen is None else {re.escape(leaf): patterns[chosen]}
    chosen = peft_pattern_key(patterns, name)
    return {} if chosen is None else {re.escape(name): patterns[chosen]}


def _require_plain_names(value, field: str, where: Path) -> None:
    names = [value] if isinstance(value, str) else list(value or [])
    for item in names:
        if not isinstance(item, str) or not _PLAIN_NAME.fullmatch(item):
            raise CheckpointFormatError(
                f"{field} entry {item!r} is not a plain module name; PEFT pastes it into "
                "its own regular expressions, which could then run without end",
                where,
                "use module names (letters, digits, _ . -)",
            )
