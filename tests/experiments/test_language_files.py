"""The packaged regex and topic files of the language experiment, and their held-out
counterparts: each loads, holds what the issue's protocol asks for, and the held-out
sets share no entry with the ones the reported runs were developed on."""

from __future__ import annotations

from codebook_lens.experiments.language.config import PACKAGE_DIR, REGEX_FILE, TOPIC_FILE
from codebook_lens.experiments.language.files import load_regexes, load_topics


def test_packaged_and_held_out_topics():
    prompts, topics = load_topics(TOPIC_FILE)
    held_prompts, held = load_topics(PACKAGE_DIR / "topics-heldout.yaml")
    assert len(topics) >= 6 and len(held) >= 6
    assert held_prompts == prompts  # the same prompts: only the topics differ
    assert not {t.name for t in topics} & {t.name for t in held}
    words = {w for t in topics for w in t.words}
    assert not words & {w for t in held for w in t.words}
    assert all(t.text.strip() and len(t.words) >= 10 for t in held)


def test_packaged_and_held_out_regexes():
    regexes = load_regexes(REGEX_FILE)
    held = load_regexes(PACKAGE_DIR / "regexes-heldout.yaml")
    assert len(regexes) >= 12 and len(held) >= 12
    assert not {r.pattern for r in regexes} & {r.pattern for r in held}
    assert not {r.name for r in regexes} & {r.name for r in held}
