"""Griffe extension: Sphinx roles in docstrings rendered as code.

The package's docstrings name other objects the Sphinx way (``:func:`fit_lines```,
``:mod:`~wdanalysis.weights.fused```). MkDocs does not know these roles and would print
them literally; this turns each into a code span of the name (``~`` keeps the last part,
as Sphinx does).
"""

from __future__ import annotations

import re

import griffe

ROLE = re.compile(r":(?:py:)?(?:func|mod|class|meth|attr|data|obj|exc|const):`(~?)([^`]+)`")


def _as_code(match: re.Match) -> str:
    name = match.group(2)
    if match.group(1):
        name = name.rsplit(".", 1)[-1]
    return f"`{name}`"


class SphinxRolesAsCode(griffe.Extension):
    """Rewrite ``:role:`name``` in every docstring as a Markdown code span."""

    def on_instance(self, *, obj: griffe.Object, **kwargs) -> None:
        if obj.docstring is not None and ":" in obj.docstring.value:
            obj.docstring.value = ROLE.sub(_as_code, obj.docstring.value)
