"""Text extraction of the offline corpus sources, on hand-made markup (no download)."""

from __future__ import annotations

from codebook_lens.data.corpus import shakespeare_markdown_to_docs, wikitext_to_plain


def test_wikitext_to_plain():
    text = (
        "{{Infobox city|name=Paris}}\n"
        "'''Paris''' is the [[capital city|capital]] of [[France]].<ref>cite</ref>\n\n"
        "== History ==\nFounded in the [[3rd century BC]].\n[[Category:Cities]]\n\n"
        "== Empty ==\n\n"
        "== Culture ==\n* Museums &amp; [https://example.org galleries]\n\n"
        "== References ==\n* a reference\n"
    )
    assert wikitext_to_plain(text) == (
        "Paris is the capital of France.\n\n"
        "History\nFounded in the 3rd century BC.\n\n"
        "Culture\nMuseums & galleries"
    )


def test_shakespeare_markdown_to_docs():
    md = "# Act 1\n\n## Scene 1\n\n**HAMLET**: To be, or not to be.\n\n## Scene 2\n\n**OPHELIA**: My lord.\n"
    docs = list(shakespeare_markdown_to_docs(md, "hamlet"))
    assert [title for title, _ in docs] == ["Act 1, Scene 1", "Act 1, Scene 2"]
    assert "HAMLET: To be, or not to be." in docs[0][1]
    assert "OPHELIA: My lord." in docs[1][1] and "HAMLET" not in docs[1][1]
