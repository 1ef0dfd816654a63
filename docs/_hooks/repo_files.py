"""MkDocs hook: publish the measured results and configs of the repository with the site.

The benchmark results (``benchmarks/*-latest.json``, their ``.svg`` plots) and the YAML
configs (``configs/*.yaml``) live outside ``docs/``. This hook adds them to the site at
the same paths they have in the repository, so a page links them as site files
(``benchmarks/snap-latest.json`` from ``docs/benchmarks.md``,
``../configs/smollm2-cpu.yaml`` from a page in ``docs/guides/``) and the strict build
checks those links like any other.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parents[2]
PUBLISHED = ("benchmarks/*-latest.json", "benchmarks/*-latest.svg", "configs/*.yaml")


def published_paths(root: Path = ROOT) -> list[str]:
    """Repository-relative paths of the files the site carries, sorted."""
    return sorted(
        path.relative_to(root).as_posix() for pattern in PUBLISHED for path in root.glob(pattern)
    )


def on_files(files: Files, config: Any) -> Files:
    for rel in published_paths():
        files.append(File.generated(config, rel, abs_src_path=str(ROOT / rel)))
    return files
