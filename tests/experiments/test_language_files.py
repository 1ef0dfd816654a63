"""The packaged regex and topic files of the language experiment, and their held-out
counterparts: each loads, holds what the issue's protocol asks for, and no two sets
share an entry (the held-out ones test a method on topics it was not developed on)."""

from __future__ import annotations

from codebook_lens.experiments.language.config import PACKAGE_DIR, REGEX_FILE, TOPIC_FILE
from codebook_lens.experiments.language.files import load_regexes, load_topics


def test_packaged_and_held_out_topics():
    prompts, topics = load_topics(TOPIC_FILE)
    sets = [topics]
    for name in ("topics-heldout.yaml", "topics-heldout2.yaml", "topics-heldout3.yaml"):
        held_prompts, held = load_topics(PACKAGE_DIR / name)
        assert held_prompts == prompts  # the same prompts: only the topics differ
        assert len(held) >= 6
        assert all(t.text.strip() and len(t.words) >= 10 for t in held)
        sets.append(held)
    assert len(topics) >= 6
    # no two sets share a topic or a topic word
    for i, a in enumerate(sets):
        for b in sets[i + 1 :]:
            assert not {t.name for t in a} & {t.name for t in b}
            assert not {w for t in a for w in t.words} & {w for t in b for w in t.words}


def test_packaged_and_held_out_regexes():
    regexes = load_regexes(REGEX_FILE)
    held = load_regexes(PACKAGE_DIR / "regexes-heldout.yaml")
    assert len(regexes) >= 12 and len(held) >= 12
    assert not {r.pattern for r in regexes} & {r.pattern for r in held}
    assert not {r.name for r in regexes} & {r.name for r in held}
