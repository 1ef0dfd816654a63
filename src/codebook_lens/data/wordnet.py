"""WordNet's definitions and usage examples as documents, for the wide offline corpus.

WordNet 3.0 (Princeton University, under the WordNet 3.0 licence: use, copy, modify and
distribute for any purpose, with its notice kept) files each of its 117,659 synsets
(sets of synonyms) under one of 45 lexicographer files by field: ``noun.food``,
``noun.state`` (illnesses among them), ``noun.act``, ``verb.motion``, ... The 32,923
synsets with usage examples (the everyday senses; most of the others are taxonomy and
terms of art) each become one line, ``its words: its definition.`` followed by its
examples as sentences, and those of each lexicographer file, in WordNet's order, are cut
into documents of :data:`ENTRIES_PER_DOC`, so that every document keeps to one field.
The text comes from Debian's ``wordnet-base`` package (:data:`WORDNET_DEB`).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from codebook_lens.data.assets import DebPackage, deb_member, fetch_deb

__all__ = [
    "LEXNAMES",
    "WORDNET_DEB",
    "Synset",
    "parse_data_line",
    "render_synset",
    "wordnet_docs",
]

WORDNET_DEB = DebPackage(
    "wordnet-base",
    "1:3.0-37",
    "61060d960f9ada8fa120872312eccd3ecebfbab8c4579e4f5a74e1cf67620752",
    "pool/main/w/wordnet/wordnet-base_3.0-37_all.deb",
)
WORDNET_LICENSE = "WordNet-3.0"
WORDNET_URL = "https://wordnet.princeton.edu/"
ENTRIES_PER_DOC = 100
POS_FILES = ("noun", "verb", "adj", "adv")

# the lexicographer files by number (WordNet's lexnames(5WN))
LEXNAMES = (
    "adj.all", "adj.pert", "adv.all", "noun.Tops", "noun.act", "noun.animal",
    "noun.artifact", "noun.attribute", "noun.body", "noun.cognition", "noun.communication",
    "noun.event", "noun.feeling", "noun.food", "noun.group", "noun.location", "noun.motive",
    "noun.object", "noun.person", "noun.phenomenon", "noun.plant", "noun.possession",
    "noun.process", "noun.quantity", "noun.relation", "noun.shape", "noun.state",
    "noun.substance", "noun.time", "verb.body", "verb.change", "verb.cognition",
    "verb.communication", "verb.competition", "verb.consumption", "verb.contact",
    "verb.creation", "verb.emotion", "verb.motion", "verb.perception", "verb.possession",
    "verb.social", "verb.stative", "verb.weather", "adj.ppl",
)  # fmt: skip

_ADJ_MARKER = re.compile(r"\((a|p|ip)\)$")  # an adjective's syntactic marker
_QUOTED = re.compile(r'"([^"]*)"')


@dataclass(frozen=True)
class Synset:
    """One synset of a WordNet data file."""

    offset: int
    lexname: str
    words: tuple[str, ...]
    definition: str
    examples: tuple[str, ...]


def parse_data_line(line: str) -> Synset | None:
    """The synset of one line of a WordNet data file (``data.noun``, ...); None for the
    licence lines at the top of the file (they start with two spaces) and blank lines.

    The line is ``offset lex_filenum ss_type w_cnt word lex_id [word lex_id...] p_cnt
    [pointers...] [frames...] | gloss`` with ``w_cnt`` in hexadecimal; the gloss is the
    definition, then the examples in double quotes.
    """
    if not line.strip() or line.startswith("  "):
        return None
    head, sep, gloss = line.partition(" | ")
    fields = head.split()
    if not sep or len(fields) < 4:
        raise ValueError(f"not a WordNet data line: {line[:80]!r}")
    count = int(fields[3], 16)
    if len(fields) < 4 + 2 * count:
        raise ValueError(f"not a WordNet data line (fewer words than {count}): {line[:80]!r}")
    words = tuple(_ADJ_MARKER.sub("", fields[4 + 2 * i]).replace("_", " ") for i in range(count))
    gloss = gloss.strip()
    definition = gloss.split('"', 1)[0].strip().rstrip(";").strip()
    examples = tuple(e.strip() for e in _QUOTED.findall(gloss) if e.strip())
    return Synset(int(fields[0]), LEXNAMES[int(fields[1])], words, definition, examples)


def _sentence(text: str) -> str:
    text = text[:1].upper() + text[1:]
    return text if text[-1:] in ".!?" else text + "."


def render_synset(synset: Synset, max_words: int = 3) -> str:
    """``word, word: definition.`` then each example as a sentence (first letter upper
    case, a full stop where it ends without one)."""
    parts = []
    words = ", ".join(synset.words[:max_words])
    if synset.definition:
        parts.append(f"{words}: {_sentence(synset.definition)}")
    else:
        parts.append(f"{words}.")
    parts += [_sentence(e) for e in synset.examples]
    return " ".join(parts)


def wordnet_docs(entries_per_doc: int = ENTRIES_PER_DOC) -> Iterator[dict[str, Any]]:
    """The corpus documents of WordNet: per lexicographer file (in the order of
    :data:`LEXNAMES`), its synsets with usage examples in file order, ``entries_per_doc``
    lines each."""
    deb = fetch_deb(WORDNET_DEB)
    by_lexname: dict[str, list[tuple[str, Synset]]] = {name: [] for name in LEXNAMES}
    for pos in POS_FILES:
        text = deb_member(deb, f"./usr/share/wordnet/data.{pos}").decode("utf-8")
        for line in text.splitlines():
            synset = parse_data_line(line)
            if synset is not None and synset.examples:
                by_lexname[synset.lexname].append((pos, synset))
    for lexname, entries in by_lexname.items():
        for i in range(0, len(entries), entries_per_doc):
            chunk = entries[i : i + entries_per_doc]
            number = i // entries_per_doc + 1
            yield {
                "id": f"wordnet:{lexname}:{number:04d}",
                "title": f"WordNet {lexname} {number}",
                "text": "\n".join(render_synset(s) for _, s in chunk),
                "source": "wordnet",
                "license": WORDNET_LICENSE,
                "url": WORDNET_URL,
                "origin": f"{WORDNET_DEB.name}={WORDNET_DEB.version}:"
                f"usr/share/wordnet/data.{chunk[0][0]}",
            }
