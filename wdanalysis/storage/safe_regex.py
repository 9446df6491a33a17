"""Regular expressions from files and users, matched in linear time (RE2).

``rank_pattern`` / ``alpha_pattern`` keys of an adapter config and ``--modules`` patterns
are written by strangers. Python's ``re`` backtracks: ``"(.*.*)*XYZ$"`` against a long
module name never returns. RE2 (``google-re2``) matches in time linear in the text for
every pattern it accepts; a pattern it cannot match that way (backreferences,
lookarounds) is refused in one line. The semantics stay those of PEFT 0.21
(``peft.utils.other.get_pattern_key``): a key applies to a module when
``re.match(rf"(.*\\.)?({key})$", module)`` matches, the first such key in the order of the
config wins. A pattern must also compile with Python's ``re``, as PEFT compiles it.
"""

from __future__ import annotations

import functools
import re

from wdanalysis.errors import WDAnalysisError

try:  # a core dependency; import errors surface as one line where a pattern is used
    import re2
except ImportError:  # pragma: no cover - declared in pyproject.toml
    re2 = None

REGEX_CHARS = "*[]()|+?\\^$"  # a --modules value holding one of these is a pattern
MAX_PATTERN_CHARS = 4096


class UnsafePatternError(WDAnalysisError):
    """A pattern RE2 cannot match in linear time, or that does not compile at all."""


def _options():
    options = re2.Options()
    options.log_errors = False  # RE2 would print its own lines to stderr
    options.max_mem = 64 << 20
    return options


@functools.lru_cache(maxsize=4096)
def compile_linear(pattern: str):
    """The RE2 program of ``pattern``; :class:`UnsafePatternError` (message without the
    pattern's origin, which callers add) when it cannot be one."""
    if re2 is None:  # pragma: no cover
        raise UnsafePatternError(
            "google-re2 is not installed", hint="pip install google-re2 (a core dependency)"
        )
    if len(pattern) > MAX_PATTERN_CHARS:
        raise UnsafePatternError(f"is {len(pattern)} characters long (at most {MAX_PATTERN_CHARS})")
    try:
        re.compile(pattern)
    except (re.error, RecursionError, OverflowError) as error:
        raise UnsafePatternError(f"is not a valid regular expression ({error})") from None
    try:
        return re2.compile(pattern, _options())
    except re2.error as error:
        reason = error.args[0] if error.args else error
        if isinstance(reason, bytes):
            reason = reason.decode("utf-8", "replace")
        raise UnsafePatternError(
            f"cannot be matched in guaranteed linear time ({reason}); backreferences, "
            "lookarounds and huge repetitions are not supported"
        ) from None


def check_pattern(pattern: str, origin: str, path=None) -> None:
    """Refuse ``pattern`` in one line naming ``origin`` (e.g. ``rank_pattern key``)."""
    try:
        compile_linear(pattern)
    except UnsafePatternError as error:
        raise UnsafePatternError(
            f"{origin} {pattern!r} {error.problem}", path, error.hint
        ) from None


def peft_pattern_key(patterns, module: str) -> str | None:
    """PEFT's rule: the first key for which ``(.*\\.)?(key)$`` matches ``module`` (from its
    start), else ``None``."""
    for key in patterns:
        if compile_linear(rf"(.*\.)?({key})$").match(module):
            return key
    return None


def search(pattern: str, text: str) -> bool:
    """``re.search(pattern, text)`` in linear time."""
    return compile_linear(pattern).search(text) is not None
