"""MkDocs hook: the table of the public API on the reference index page.

``codebook_lens`` exports its names lazily (PEP 562), so a static reading of the package
does not see them. The marker line ``<!-- public-api -->`` is replaced with one row per
name of ``codebook_lens.__all__``: the name, the module that defines it and, when the
object has a docstring (so its reference page shows it), a link to its entry there.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import griffe

import codebook_lens

SRC = Path(__file__).resolve().parents[2] / "src"
MARKER = "<!-- public-api -->"
SUBPACKAGES = ("core", "data", "training", "cache", "analysis", "steering", "experiments")


def defining_path(name: str, package: griffe.Module) -> str:
    """The dotted path of the object that ``codebook_lens.<name>`` is."""
    obj = getattr(codebook_lens, name)
    module, qualname = getattr(obj, "__module__", None), getattr(obj, "__qualname__", None)
    if isinstance(module, str) and isinstance(qualname, str) and module.startswith("codebook_lens"):
        return f"{module}.{qualname}"
    for sub in SUBPACKAGES:  # a constant: follow the re-export of the subpackage that lists it
        if name in getattr(importlib.import_module(f"codebook_lens.{sub}"), "__all__", ()):
            member = package[f"{sub}.{name}"]
            return (member.final_target if member.is_alias else member).path
    raise ValueError(f"codebook_lens.{name} is defined in no subpackage that lists it")


def rows() -> list[tuple[str, str, str | None]]:
    """``(name, defining path, reference page or None)`` for every public name."""
    package = griffe.load("codebook_lens", search_paths=[str(SRC)], resolve_aliases=True)
    out = []
    for name in sorted(codebook_lens.__all__, key=str.lower):
        path = defining_path(name, package)
        target = package[path.removeprefix("codebook_lens.")]
        documented = bool(target.docstring and target.docstring.value.strip())
        page = f"{path.split('.')[1]}.md" if documented else None
        out.append((name, path, page))
    return out


def table() -> str:
    lines = ["| name | defined in |", "|---|---|"]
    for name, path, page in rows():
        where = f"[`{path}`]({page}#{path})" if page else f"`{path}`"
        lines.append(f"| `{name}` | {where} |")
    return "\n".join(lines)


def on_page_markdown(markdown: str, **kwargs: Any) -> str:
    return markdown.replace(MARKER, table()) if MARKER in markdown else markdown
