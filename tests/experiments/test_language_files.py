"""The packaged regex and topic files of the language experiment, and their held-out
counterparts: each loads, holds what the issue's protocol asks for, and no two sets
share an entry (the held-out ones test a method on topics it was not developed on)."""

from __future__ import annotations

from pathlib import Path

import pytest

from codebook_lens.experiments.language.config import PACKAGE_DIR, REGEX_FILE, TOPIC_FILE
from codebook_lens.experiments.language.files import (
    data_file,
    load_regexes,
    load_topics,
    packaged_files,
)
from codebook_lens.training.config import ConfigError


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


def test_a_run_names_a_packaged_file_or_a_path(tmp_path, monkeypatch):
    assert data_file(None, TOPIC_FILE) == TOPIC_FILE
    assert data_file("topics-heldout3", TOPIC_FILE) == PACKAGE_DIR / "topics-heldout3.yaml"
    assert data_file("regexes-heldout", REGEX_FILE) == PACKAGE_DIR / "regexes-heldout.yaml"
    assert {"topics", "topics-heldout", "topics-heldout2", "topics-heldout3"} <= set(
        packaged_files("topics")
    )
    assert packaged_files("regexes") == ["regexes", "regexes-heldout"]
    # a file of that name where the run starts is read rather than the packaged one
    monkeypatch.chdir(tmp_path)
    (tmp_path / "topics-heldout").write_text("prompts: [x]\n")
    assert data_file("topics-heldout", TOPIC_FILE) == Path("topics-heldout")
    mine = tmp_path / "mine.yaml"
    mine.write_text("prompts: [x]\n")
    assert data_file(str(mine), TOPIC_FILE) == mine
    # neither a file nor a packaged name: reading it says what the names are
    missing = data_file("topics-heldout9", TOPIC_FILE)
    with pytest.raises(ConfigError, match="packaged file's name: topics, topics-heldout"):
        load_topics(missing)
    with pytest.raises(ConfigError, match="regexes, regexes-heldout"):
        load_regexes(data_file("nope", REGEX_FILE))
