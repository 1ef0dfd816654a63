"""The import rule of the package, read from the source with ``ast`` (nothing is imported).

Subpackages are floors along the data flow; a module imports only from its own floor or
below, core imports nothing of the package outside core, and there is no import cycle,
neither between modules nor between top-level units. Imports of the package inside
functions are refused outside ``cli/``: there they keep ``codebook --help`` from loading
PyTorch; anywhere else one would only hide a cycle or a wrong direction. (Third-party
imports inside functions, such as matplotlib or transformers, are not this rule's
business.)

Run as a script to measure a source tree, e.g. an older commit's::

    python tests/test_layering.py [SRC/codebook_lens]
"""

from __future__ import annotations

import ast
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "codebook_lens"

# floors along the data flow: a module may import its own floor or lower ones
RANKS: dict[str, int] = {
    "core": 0,
    "plots": 0,
    "data": 1,
    "training": 2,
    "cache": 2,
    "analysis": 3,
    "steering": 3,
    "experiments": 4,
    "web": 4,
    "cli": 5,
}
# where imports of the package inside functions are the rule (lazy command modules)
LAZY_UNITS = {"cli"}
# the only name a module may import from the package root (which re-exports every floor)
ROOT_NAMES = {"__version__"}


@dataclass(frozen=True)
class Import:
    source: str  # importing module, e.g. codebook_lens.cache.build
    target: str  # imported module of the package, e.g. codebook_lens.core.sites
    names: tuple[str, ...]  # names taken by ``from target import ...`` (empty for import)
    line: int
    deferred: bool  # inside a function body

    def __str__(self) -> str:
        where = "inside a function" if self.deferred else "at module level"
        return f"{self.source}:{self.line} imports {self.target} ({where})"


def module_files(src: Path) -> dict[str, Path]:
    """Every module of the package rooted at ``src``, by dotted name."""
    root = src.name
    out = {}
    for path in sorted(src.rglob("*.py")):
        parts = [root, *path.relative_to(src).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _absolute(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".")
    if not is_package:
        base.pop()
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


class _Visitor(ast.NodeVisitor):
    def __init__(self, module: str, path: Path, modules: dict[str, Path]) -> None:
        self.module, self.modules = module, modules
        self.is_package = path.name == "__init__.py"
        self.root = next(iter(modules)).split(".")[0]
        self.depth = 0
        self.found: list[Import] = []

    def _ours(self, name: str) -> bool:
        return name == self.root or name.startswith(self.root + ".")

    def _add(self, target: str, names: tuple[str, ...], line: int) -> None:
        if target in self.modules:
            self.found.append(Import(self.module, target, names, line, self.depth > 0))

    def visit_FunctionDef(self, node: ast.AST) -> None:
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            if self._ours(alias.name):
                self._add(alias.name, (), node.lineno)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        target = _absolute(self.module, self.is_package, node)
        if not self._ours(target):
            return
        plain = []
        for alias in node.names:
            sub = f"{target}.{alias.name}"
            if sub in self.modules:  # ``from package import module``
                self._add(sub, (), node.lineno)
            else:
                plain.append(alias.name)
        if plain:
            self._add(target, tuple(plain), node.lineno)


def package_imports(src: Path = SRC) -> list[Import]:
    """Every import of a module of the package by a module of the package."""
    modules = module_files(src)
    found: list[Import] = []
    for name, path in modules.items():
        visitor = _Visitor(name, path, modules)
        visitor.visit(ast.parse(path.read_text(), filename=str(path)))
        found += visitor.found
    return found


def unit(module: str) -> str:
    """The top-level unit of a module: ``codebook_lens.core.sites`` -> ``core``; the package
    root itself -> ``""``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def cycles(edges: set[tuple[str, str]]) -> list[list[str]]:
    """The strongly connected components of more than one node (Tarjan), each sorted."""
    graph: dict[str, set[str]] = {}
    for a, b in edges:
        graph.setdefault(a, set()).add(b)
        graph.setdefault(b, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in graph[v]:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(out)


def module_cycles(found: list[Import]) -> list[list[str]]:
    return cycles({(i.source, i.target) for i in found if i.source != i.target})


def unit_cycles(found: list[Import]) -> list[list[str]]:
    """Cycles between top-level units (the package root, which re-exports them, left out)."""
    edges = {(unit(i.source), unit(i.target)) for i in found}
    return cycles({(a, b) for a, b in edges if a != b and "" not in (a, b)})


def violations(found: list[Import]) -> list[str]:
    """Every break of the import rule, one line each (empty when the package keeps it)."""
    bad = []
    for i in found:
        src, dst = unit(i.source), unit(i.target)
        if src == "":
            continue  # the root re-exports from every floor
        if dst == "":
            extra = sorted(set(i.names) - ROOT_NAMES)
            if extra or not i.names:
                bad.append(f"{i}: import {', '.join(extra) or 'it'} from its own module")
            continue
        if RANKS[dst] > RANKS[src]:
            bad.append(f"{i}: {src} (floor {RANKS[src]}) imports {dst} (floor {RANKS[dst]})")
        if src == "core" and dst != "core":
            bad.append(f"{i}: core imports nothing outside core")
        if i.deferred and src not in LAZY_UNITS:
            bad.append(f"{i}: import it at module level")
    bad += [f"import cycle between modules: {' <-> '.join(c)}" for c in module_cycles(found)]
    bad += [f"import cycle between units: {' <-> '.join(c)}" for c in unit_cycles(found)]
    return bad


# ----------------------------------------------------------------------------------------
# the package as it is


def test_every_top_level_unit_has_a_floor():
    units = {unit(m) for m in module_files(SRC)} - {""}
    assert units <= set(RANKS), f"give these a floor in RANKS: {sorted(units - set(RANKS))}"
    assert units == set(RANKS), f"RANKS names units that no longer exist: {set(RANKS) - units}"


def test_the_parser_sees_known_imports():
    found = {(i.source, i.target, i.deferred) for i in package_imports()}
    assert ("codebook_lens.core.model", "codebook_lens.core.sites", False) in found
    assert ("codebook_lens.training.loop", "codebook_lens.core.model", False) in found
    assert ("codebook_lens.cli.main", "codebook_lens.training.loop", True) in found


def test_package_keeps_the_import_rule():
    bad = violations(package_imports())
    assert not bad, "\n".join(bad)


# ----------------------------------------------------------------------------------------
# the checker catches what it should (a planted package)


def _plant(root: Path, files: dict[str, str]) -> Path:
    pkg = root / "codebook_lens"
    for name, text in files.items():
        path = pkg / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    for folder in [pkg, *[p for p in pkg.rglob("*") if p.is_dir()]]:
        (folder / "__init__.py").touch()
    return pkg


def test_checker_flags_upward_core_outside_deferred_and_cycles(tmp_path):
    pkg = _plant(
        tmp_path,
        {
            "core/a.py": "from codebook_lens.plots import bar\n",
            "core/b.py": "from . import c\n",
            "core/c.py": "def f():\n    from codebook_lens.core import b\n",
            "plots.py": "bar = 1\n",
            "data/d.py": "from codebook_lens.cache import e\n",
            "cache/e.py": "from ..data.d import x\nfrom codebook_lens import __version__\n",
            "cache/f.py": "from codebook_lens import train\n",
            "cli/main.py": "def run():\n    from codebook_lens.cache.e import y\n",
        },
    )
    bad = violations(package_imports(pkg))
    text = "\n".join(bad)
    assert "codebook_lens.core.a:1 imports codebook_lens.plots" in text
    assert "core imports nothing outside core" in text
    assert "codebook_lens.data.d:1 imports codebook_lens.cache.e (at module level): data" in text
    assert "codebook_lens.core.c:2 imports codebook_lens.core.b (inside a function)" in text
    assert "import cycle between modules: codebook_lens.core.b <-> codebook_lens.core.c" in text
    assert "import cycle between modules: codebook_lens.cache.e <-> codebook_lens.data.d" in text
    assert "import cycle between units: cache <-> data" in text
    assert "codebook_lens.cache.f:1 imports codebook_lens (at module level): import train" in text
    assert not any("codebook_lens.cli.main" in line for line in bad)  # cli may defer
    assert not any("__version__" in line for line in bad)
    assert len(bad) == 7, text


def test_cycles_finds_components_and_ignores_chains():
    edges = {("a", "b"), ("b", "c"), ("c", "a"), ("c", "d"), ("d", "e"), ("x", "x")}
    assert cycles(edges) == [["a", "b", "c"], ["x"]]
    assert cycles({("a", "b"), ("b", "c")}) == []


# ----------------------------------------------------------------------------------------
# measuring a tree (python tests/test_layering.py [SRC])


def report(src: Path) -> str:
    modules = module_files(src)
    found = package_imports(src)
    per_folder = Counter(str(path.parent.relative_to(src.parent)) for path in modules.values())
    lines = [f"{len(modules)} modules in {len(per_folder)} folders"]
    lines += [f"  {folder:<40}{count:>4}" for folder, count in sorted(per_folder.items())]
    deferred = [i for i in found if i.deferred]
    lines.append(
        f"{len(deferred)} imports of the package inside functions "
        f"({sum(unit(i.source) not in LAZY_UNITS for i in deferred)} outside cli/)"
    )
    found_cycles = module_cycles(found)
    lines.append(f"{len(found_cycles)} import cycles between modules")
    lines += [f"  {' <-> '.join(c)}" for c in found_cycles]
    return "\n".join(lines)


if __name__ == "__main__":
    print(report(Path(sys.argv[1]).resolve() if len(sys.argv) > 1 else SRC))
