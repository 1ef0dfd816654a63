"""The documentation: the strict site build, README.md's links and size, the API pages.

The site is built once per session with ``mkdocs build --strict`` (as ``make docs`` does),
so a broken link, a missing anchor, a page that names a missing module or a docstring
mkdocstrings cannot read fails here. MkDocs and its plugins are dev dependencies that
``make test`` installs; they are required, not optional.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
import subprocess
import sys
import typing
import unicodedata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
README = ROOT / "README.md"
README_LIMIT = 12 * 1024  # bytes
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def _hook(name: str):
    """A module of docs/_hooks/, loaded from its file (it is not a package)."""
    spec = importlib.util.spec_from_file_location(
        f"docs_hook_{name}", DOCS / "_hooks" / f"{name}.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, f"mkdocs build --strict failed:\n{proc.stdout}\n{proc.stderr}"
    return out


def test_strict_build_renders_every_page_and_the_api(site: Path) -> None:
    pages = sorted(p.relative_to(DOCS).with_suffix("") for p in DOCS.rglob("*.md"))
    pages = [p for p in pages if "_hooks" not in p.parts]
    for page in pages:
        html = site / (page.parent if page.name == "index" else page) / "index.html"
        assert html.is_file(), f"docs/{page}.md was not built"
    core = (site / "reference" / "core" / "index.html").read_text()
    # the docstrings themselves are on the page, with their reST roles made code spans
    assert 'id="codebook_lens.core.codebook.Codebook"' in core
    assert "Where codebooks go in each architecture family." in core
    assert ":func:`" not in core and ":class:`" not in core


def test_built_pages_load_nothing_from_other_hosts(site: Path) -> None:
    external = re.compile(r"""<(?:link|script|img)\b[^>]*\b(?:href|src)=["']?(?:https?:)?//""")
    for page in site.rglob("*.html"):
        found = external.search(page.read_text())
        assert found is None, f"{page.relative_to(site)} loads {found.group(0)!r}"


def test_benchmark_results_and_configs_are_published_with_the_site(site: Path) -> None:
    paths = _hook("repo_files").published_paths()
    assert "configs/smollm2-cpu.yaml" in paths
    assert "benchmarks/snap-latest.json" in paths
    for rel in paths:
        assert (site / rel).read_bytes() == (ROOT / rel).read_bytes()


def test_the_api_index_lists_every_public_name_with_its_module(site: Path) -> None:
    import codebook_lens

    page = (site / "reference" / "index.html").read_text()
    assert "<!-- public-api -->" not in page  # the marker was replaced
    for name in codebook_lens.__all__:
        assert f"<td><code>{name}</code></td>" in page, f"codebook_lens.{name} is not listed"
    # a documented object links to its entry on its subpackage's page
    assert 'href="core/#codebook_lens.core.model.CodebookModel"' in page


def test_configuration_tables_are_generated_from_the_dataclasses(site: Path) -> None:
    page = (site / "guides" / "configuration" / "index.html").read_text()
    assert "<!-- config-keys" not in page  # every marker was replaced
    assert "<code>optim.codebook_lr</code>" in page
    assert "<code>codebook.mlp_num_codes</code>" in page


# ----------------------------------------------------------------------------------------
# the key-table generator, on dataclasses made here


@dataclasses.dataclass
class _Item:
    name: str
    k: int = 1


@dataclasses.dataclass
class _Inner:
    lr: float = 0.1
    mode: typing.Literal["a", "b"] = "a"
    steps: int | None = None


@dataclasses.dataclass
class _Outer:
    out: str = "runs/x"
    inner: _Inner = dataclasses.field(default_factory=_Inner)
    items: list[_Item] = dataclasses.field(default_factory=list)


def test_key_rows_walk_sections_and_list_items() -> None:
    rows = _hook("config_tables").key_rows(_Outer, [_Outer(), _Outer(inner=_Inner(lr=0.5))])
    assert rows == [
        ["`out`", "str", '`"runs/x"`', '`"runs/x"`'],
        ["`inner.lr`", "float", "`0.1`", "`0.5`"],
        ["`inner.mode`", 'one of "a", "b"', '`"a"`', '`"a"`'],
        ["`inner.steps`", "int or None", "`null`", "`null`"],
        ["`items`", "list[_Item]", "`[]`", "`[]`"],
        ["`items[].name`", "str", "required", "required"],
        ["`items[].k`", "int", "`1`", "`1`"],
    ]


def test_rst_roles_become_code_spans() -> None:
    plain = _hook("rst_roles").plain_roles
    text = (
        "see :func:`load_codebook_model`, :class:`~codebook_lens.core.refs.CodeRef` and :data:`X`"
    )
    assert plain(text) == "see `load_codebook_model`, `CodeRef` and `X`"


# ----------------------------------------------------------------------------------------
# README.md: outside the site, so checked here


def _slug(heading: str) -> str:
    """The anchor Python-Markdown's toc gives a heading."""
    text = unicodedata.normalize("NFKD", heading).encode("ascii", "ignore").decode()
    text = re.sub(r"[^\w\s-]", "", re.sub(r"`", "", text)).strip().lower()
    return re.sub(r"[-\s]+", "-", text)


def _anchors(markdown: str) -> set[str]:
    return {_slug(m) for m in re.findall(r"^#{1,6}\s+(.+?)\s*$", markdown, re.MULTILINE)}


def test_slug_matches_the_site_anchors() -> None:
    assert _slug("Sites and families") == "sites-and-families"
    assert _slug("`codebook fsm --preset cpu`") == "codebook-fsm-preset-cpu"
    assert _slug("How the cpu preset differs from the paper, and why") == (
        "how-the-cpu-preset-differs-from-the-paper-and-why"
    )


def test_readme_links_point_at_files_and_headings_that_exist() -> None:
    links = LINK.findall(README.read_text())
    assert links, "README.md links nowhere"
    for target in links:
        if re.match(r"^[a-z]+:", target):
            continue  # an absolute URL: not checked offline
        path, _, anchor = target.partition("#")
        file = (README.parent / path).resolve() if path else README
        assert file.exists(), f"README.md links to {target}, which does not exist"
        assert ROOT in file.parents or file == ROOT, f"README.md links outside the repo: {target}"
        if anchor:
            assert anchor in _anchors(file.read_text()), (
                f"README.md: no heading #{anchor} in {path}"
            )


def test_readme_stays_short() -> None:
    size = README.stat().st_size
    assert size <= README_LIMIT, (
        f"README.md is {size} bytes; keep it under {README_LIMIT} and move the rest to docs/"
    )


# ----------------------------------------------------------------------------------------
# the API reference covers the package


def _package_modules() -> set[str]:
    src = ROOT / "src"
    modules = set()
    for path in (src / "codebook_lens").rglob("*.py"):
        parts = path.relative_to(src).with_suffix("").parts
        if parts[-1] in ("__init__", "__main__") or any(p.startswith("_") for p in parts):
            continue
        modules.add(".".join(parts))
    return modules


def _documented_modules() -> dict[str, str]:
    found = {}
    for page in (DOCS / "reference").glob("*.md"):
        for name in re.findall(r"^::: ([\w.]+)\s*$", page.read_text(), re.MULTILINE):
            found[name] = page.name
    return found


def test_every_module_has_an_api_entry() -> None:
    documented = _documented_modules()
    missing = sorted(_package_modules() - set(documented))
    hint = "; add a line '::: NAME' to its subpackage's page in docs/reference/"
    assert not missing, f"modules without an API reference entry: {', '.join(missing)}{hint}"
    for name, page in documented.items():
        if name == "codebook_lens":
            continue
        subpackage = name.split(".")[1]
        expected = "plots.md" if subpackage == "plots" else f"{subpackage}.md"
        assert page == expected, f"{name} is listed in reference/{page}, not reference/{expected}"
