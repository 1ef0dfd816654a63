"""A griffe extension for the API reference: reST roles in docstrings become code spans.

The docstrings cross-reference with reST roles (``:func:`load_codebook_model```), which
Markdown would print verbatim; this turns each into a plain code span (```load_codebook_model```)
before mkdocstrings renders the docstring. A leading ``~`` (reST's "last part only") keeps
the last dotted part.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

ROLE = re.compile(r":(?:py:)?(?:func|class|meth|mod|data|attr|exc|obj|const):`~?([^`]+)`")


def plain_roles(text: str) -> str:
    """``text`` with every reST role replaced by a code span of its target."""

    def span(match: re.Match[str]) -> str:
        target = match.group(1)
        if match.group(0).split("`", 1)[1].startswith("~"):
            target = target.rsplit(".", 1)[-1]
        return f"`{target}`"

    return ROLE.sub(span, text)


class RstRoles(griffe.Extension):
    """Rewrites the roles of every docstring as it is loaded."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = plain_roles(obj.docstring.value)
