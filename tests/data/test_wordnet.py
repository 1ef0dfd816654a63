"""WordNet's synsets as corpus documents, and the Debian package they come in, on
hand-made data files and a hand-built package served from a file:// mirror (no
download)."""

from __future__ import annotations

import hashlib
import io
import tarfile

import pytest

from codebook_lens.data import wordnet as W
from codebook_lens.data.assets import AssetError, DebPackage, deb_member, fetch_deb
from codebook_lens.data.corpus import CORPORA, build_corpus
from codebook_lens.data.documents import iter_documents
from codebook_lens.data.wordnet import Synset, parse_data_line, render_synset

LICENCE_LINE = "  1 This software and database is being provided to you, the LICENSEE, by  \n"
# offset, lex_filenum (26: noun.state), ss_type, w_cnt (hex), words with lex ids, pointers
SICK = (
    "14061805 26 n 02 illness 0 unwellness 0 001 @ 14052046 n 0000 | impairment of normal "
    'physiological function affecting part or all of an organism; "he is recovering from '
    'an illness"; "the illness kept her home"  \n'
)
NO_EXAMPLE = "14062000 26 n 01 malady 0 000 | any unwholesome or desperate condition  \n"
# 00: adj.all; an adjective's syntactic marker (a) is not part of the word
ADJ = '00001740 00 a 01 able(a) 0 000 | having the necessary means; "able to swim"  \n'
VERB = (
    "00001740 29 v 0c breathe 0 take_a_breath 0 000 | draw air into, and expel out of, "
    'the lungs; "I can breathe better when the air is clean"  \n'
)


def test_a_data_line_gives_its_field_words_definition_and_examples():
    s = parse_data_line(SICK)
    assert s == Synset(
        offset=14061805,
        lexname="noun.state",
        words=("illness", "unwellness"),
        definition="impairment of normal physiological function affecting part or all of "
        "an organism",
        examples=("he is recovering from an illness", "the illness kept her home"),
    )
    assert parse_data_line(ADJ).words == ("able",)
    assert parse_data_line(ADJ).lexname == "adj.all"
    # w_cnt is hexadecimal: 0c is twelve words; this line names two, so it is refused
    with pytest.raises(ValueError, match="fewer words than 12"):
        parse_data_line(VERB)
    assert parse_data_line(LICENCE_LINE) is None and parse_data_line("\n") is None
    with pytest.raises(ValueError, match="not a WordNet data line"):
        parse_data_line("00001740 29 v\n")


def test_a_synset_renders_as_its_words_definition_and_example_sentences():
    s = parse_data_line(SICK)
    assert render_synset(s) == (
        "illness, unwellness: Impairment of normal physiological function affecting part "
        "or all of an organism. He is recovering from an illness. The illness kept her home."
    )
    three = Synset(1, "noun.act", ("a", "b", "c", "d"), "", ("why?",))
    assert render_synset(three) == "a, b, c. Why?"


def _tar_xz(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:xz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _ar(members: dict[str, bytes]) -> bytes:
    out = [b"!<arch>\n"]
    for name, data in members.items():
        header = f"{name + '/':<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(data):<10}`\n"
        out += [header.encode("ascii"), data, b"\n" if len(data) % 2 else b""]
    return b"".join(out)


def _deb(files: dict[str, bytes]) -> bytes:
    return _ar(
        {
            "debian-binary": b"2.0\n",
            "control.tar.xz": _tar_xz({"./control": b"Package: x\n"}),
            "data.tar.xz": _tar_xz(files),
        }
    )


def test_a_file_is_read_from_a_debian_packages_data_archive(tmp_path):
    deb = tmp_path / "x.deb"
    deb.write_bytes(_deb({"./usr/share/x/a.txt": b"hello", "./usr/share/x/b": b"odd"}))
    assert deb_member(deb, "./usr/share/x/a.txt") == b"hello"
    with pytest.raises(AssetError, match="has no file ./usr/share/x/c"):
        deb_member(deb, "./usr/share/x/c")
    (tmp_path / "y.deb").write_bytes(b"PK\x03\x04 a zip")
    with pytest.raises(AssetError, match="is not a Debian package"):
        deb_member(tmp_path / "y.deb", "./a")


@pytest.fixture
def mirror(tmp_path, monkeypatch):
    """A file:// Debian mirror with a hand-built wordnet-base and an empty asset cache."""
    data = {
        "./usr/share/wordnet/data.noun": (LICENCE_LINE + SICK + NO_EXAMPLE).encode()
        + SICK.replace("14061805", "14061900").replace("illness 0", "sickness 0").encode(),
        "./usr/share/wordnet/data.verb": VERB.replace(" 0c ", " 02 ").encode(),
        "./usr/share/wordnet/data.adj": ADJ.encode(),
        "./usr/share/wordnet/data.adv": LICENCE_LINE.encode(),
    }
    body = _deb(data)
    pool = "pool/main/w/wordnet/wordnet-base_9_all.deb"
    (tmp_path / "mirror" / pool).parent.mkdir(parents=True)
    (tmp_path / "mirror" / pool).write_bytes(body)
    package = DebPackage("wordnet-base", "9", hashlib.sha256(body).hexdigest(), pool)
    monkeypatch.setenv("CODEBOOK_LENS_DEBIAN_MIRROR", (tmp_path / "mirror").as_uri())
    monkeypatch.setenv("CODEBOOK_LENS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(W, "WORDNET_DEB", package)
    return package


def test_a_package_is_fetched_once_by_its_pinned_hash(mirror, tmp_path):
    path = fetch_deb(mirror)
    assert path == tmp_path / "cache" / "debs" / "wordnet-base_9_all.deb"
    (tmp_path / "mirror" / mirror.pool).unlink()  # cached: the mirror is not asked again
    assert fetch_deb(mirror) == path
    wrong = DebPackage("wordnet-base", "9", "0" * 64, "pool/main/w/wordnet/other.deb")
    (tmp_path / "mirror" / wrong.pool).write_bytes(b"not what was pinned")
    with pytest.raises(AssetError, match="expected 0000"):
        fetch_deb(wrong)
    assert sorted(p.name for p in (tmp_path / "cache" / "debs").iterdir()) == [path.name]
    with pytest.raises(AssetError, match="could not download"):
        fetch_deb(DebPackage("x", "1", "0" * 64, "pool/none.deb"))


def test_wordnet_documents_keep_to_one_field_and_hold_the_synsets_with_examples(mirror):
    docs = list(W.wordnet_docs(entries_per_doc=1))
    assert [d["id"] for d in docs] == [
        "wordnet:adj.all:0001",
        "wordnet:noun.state:0001",
        "wordnet:noun.state:0002",
        "wordnet:verb.body:0001",
    ]  # malady has no example: left out
    assert docs[0]["text"] == "able: Having the necessary means. Able to swim."
    assert docs[2]["text"].startswith("sickness, unwellness: Impairment")
    assert {d["source"] for d in docs} == {"wordnet"}
    assert docs[1]["origin"] == "wordnet-base=9:usr/share/wordnet/data.noun"
    two = list(W.wordnet_docs(entries_per_doc=2))
    assert two[1]["text"].count("\n") == 1  # both noun.state synsets, one per line


def test_the_wide_corpus_is_the_offline_one_plus_wordnet():
    assert CORPORA["offline-wide"][0] == (*CORPORA["offline"][0], "wordnet")
    with pytest.raises(Exception, match="unknown corpus 'wider'; choose from offline"):
        build_corpus(name="wider")
    with pytest.raises(Exception, match="neither one of offline, offline-wide nor"):
        next(iter_documents("wider", "train"))
