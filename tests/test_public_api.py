"""The public API: every name the package root offers resolves to its subpackage's
object, every subpackage re-exports what its __all__ lists, what the README and the
guides import is importable from the root, and ``import codebook_lens`` stays light."""

from __future__ import annotations

import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

import codebook_lens

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "codebook_lens"
SUBPACKAGES = sorted(
    ".".join(("codebook_lens", *p.parent.relative_to(SRC).parts))
    for p in SRC.rglob("__init__.py")
    if p.parent != SRC
)
# names that hide a module of the same name are allowed only where something outside
# Python needs them: the ``codebook`` entry point is ``codebook_lens.cli:main``
ENTRY_POINTS = {("codebook_lens.cli", "main")}
IMPORT = re.compile(r"^\s*from (codebook_lens[\w.]*) import ([\w, ]+)$", re.MULTILINE)


@pytest.mark.parametrize("name", codebook_lens.__all__)
def test_every_root_name_resolves_to_its_subpackages_object(name):
    value = getattr(codebook_lens, name)
    source = codebook_lens._SOURCE[name]
    assert getattr(importlib.import_module(source), name) is value
    if name != "intervene":  # its subpackage leaves it to the module of that name
        assert name in importlib.import_module(source).__all__


def test_root_offers_what_it_offered_and_the_guides_teach():
    assert {
        "FAMILIES",
        "SITES",
        "Codebook",
        "CodebookConfig",
        "CodebookModel",
        "CodebookModelConfig",
        "CodebookModelOutput",
        "CodebookOutput",
        "SiteSpec",
        "topk_codes",
        "load_codebook_model",
        "CodeCache",
        "build_cache",
        "regex_codes",
        "topic_codes",
        "effect_codes",
        "similar_codes",
        "logit_effect",
        "Intervention",
        "intervene",
        "generate",
        "steering_eval",
        "CodebookLensError",
        "train",
        "load_train_config",
    } <= set(codebook_lens.__all__)
    assert codebook_lens.__version__
    with pytest.raises(AttributeError, match="has no attribute 'nope'"):
        codebook_lens.nope  # noqa: B018


def test_names_imported_by_the_readme_and_the_docs_come_from_the_root_too():
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    taught = {
        name.strip()
        for page in pages
        if page.is_file()
        for _module, names in IMPORT.findall(page.read_text())
        for name in names.split(",")
    }
    assert taught, "the README imports nothing from codebook_lens"
    missing = sorted(taught - set(codebook_lens.__all__) - {""})
    assert not missing, f"importable only from deep paths: {missing}"


@pytest.mark.parametrize("package", SUBPACKAGES)
def test_subpackages_export_what_they_list_and_hide_no_module(package):
    module = importlib.import_module(package)
    exported = getattr(module, "__all__", [])
    for name in exported:
        assert hasattr(module, name), f"{package}.__all__ names {name}, which it lacks"
    assert len(set(exported)) == len(exported)
    folder = SRC.joinpath(*package.split(".")[1:])
    submodules = {p.stem for p in folder.glob("*.py")} | {
        p.name for p in folder.iterdir() if (p / "__init__.py").is_file()
    }
    hidden = {name for name in exported if name in submodules} - {
        name for pkg, name in ENTRY_POINTS if pkg == package
    }
    assert not hidden, f"{package} re-exports {hidden}, hiding the module(s) of that name"


def test_root_names_hide_no_subpackage():
    top = {p.stem for p in SRC.glob("*.py")} | {p.name for p in SRC.iterdir() if p.is_dir()}
    assert not set(codebook_lens.__all__) & top


def test_importing_the_package_loads_nothing_heavy():
    code = (
        "import sys, codebook_lens; "
        "heavy = sorted(m for m in ('torch', 'numpy', 'transformers', 'codebook_lens.core') "
        "if m in sys.modules); print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
