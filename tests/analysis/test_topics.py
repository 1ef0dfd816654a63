"""Topic codes from a topic's words: the look-ahead mark by hand, the ranking against a
scan of the cache."""

from __future__ import annotations

import re

import numpy as np
import pytest
from helpers import corpus_text, save_tiny_codebook_model

from codebook_lens.analysis.search import SearchError
from codebook_lens.analysis.topics import ahead_of, word_topic_codes, words_ahead, words_pattern
from codebook_lens.cache.build import build_cache
from codebook_lens.cache.store import CodeCache
from codebook_lens.core.loading import load_codebook_model

DOCS = [corpus_text(8, seed=s) for s in range(2)] + ["A small boat. The Boat, boats!"]
WORDS = ["boat", "apple"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("topics")
    loaded = load_codebook_model(save_tiny_codebook_model(root))
    build_cache(loaded, DOCS, root / "cache", corpus_name="t", seq_len=16, batch_size=16)
    return CodeCache.open(root / "cache")


def test_ahead_of_by_hand():
    hit = np.array([0, 0, 1, 0, 1, 0, 0, 1], dtype=bool)
    docs = np.array([0, 0, 0, 0, 0, 0, 1, 1])
    assert ahead_of(hit, docs, 2).tolist() == [1, 1, 1, 1, 0, 0, 1, 0]
    assert ahead_of(hit, docs, 1).tolist() == [0, 1, 0, 1, 0, 0, 1, 0]
    # the hit at 7 is in another document than token 5
    assert ahead_of(hit, docs, 5).tolist() == [1, 1, 1, 1, 0, 0, 1, 0]


def test_words_pattern_is_whole_word_and_ignores_case():
    import re2

    regex = re2.compile(words_pattern(["boat", "sea"]))
    assert [m.group(0) for m in regex.finditer("Boat boats SEA seal, boat.")] == [
        "Boat",
        "SEA",
        "boat",
    ]
    with pytest.raises(SearchError, match="topic word"):
        words_pattern([" ", ""])


def test_words_ahead_against_a_scan(cache):
    window = 5
    mark = words_ahead(cache, WORDS, window)
    # a token holds a topic word when it holds the last character of a match
    word = re.compile(r"\b(boat|apple)\b", re.IGNORECASE)
    holds = np.zeros(cache.num_tokens, dtype=bool)
    for t, (d, start, end) in enumerate(zip(cache.doc_ids, cache.starts, cache.ends, strict=True)):
        last = [m.end() - 1 for m in word.finditer(cache.docs[d])]
        holds[t] = any(start <= c < end for c in last)
    n = cache.num_tokens
    expected = [
        any(
            holds[u] and cache.doc_ids[u] == cache.doc_ids[t]
            for u in range(t + 1, min(n, t + window + 1))
        )
        for t in range(n)
    ]
    assert mark.tolist() == expected
    assert mark.any()


def test_word_topic_codes_against_a_scan(cache):
    window, min_count = 4, 3
    hits = word_topic_codes(
        cache, WORDS, window=window, min_count=min_count, max_frequency=1.0, limit=None
    )
    mark = words_ahead(cache, WORDS, window)
    rate = mark.mean()
    expected = {}
    for key, info in cache.codebooks.items():
        codes = np.asarray(cache.codes(key))
        for g in range(info.groups):
            for c in range(info.num_codes):
                fires = (codes[:, g, :] == c).any(-1)
                count, tp = int(fires.sum()), int((fires & mark).sum())
                if count >= min_count and tp > 0:
                    expected[(key, g, c)] = (tp / count, count, tp)
    got = {(h.ref.codebook, h.ref.group, h.ref.code): (h.precision, h.count, h.hits) for h in hits}
    assert got.keys() == expected.keys()
    for k, (p, count, tp) in expected.items():
        assert got[k][0] == pytest.approx(p) and got[k][1:] == (count, tp)
    assert all(h.lift == pytest.approx(h.precision / rate) for h in hits)
    order = [(-h.precision, -h.count) for h in hits]
    assert order == sorted(order)
    # the frequency cap drops codes firing on more than that share of tokens
    capped = word_topic_codes(
        cache, WORDS, window=window, min_count=1, max_frequency=0.05, limit=None
    )
    assert all(h.count <= 0.05 * cache.num_tokens for h in capped)


def test_word_topic_codes_refuses_bad_settings(cache):
    with pytest.raises(SearchError, match="no cached token is followed"):
        word_topic_codes(cache, ["zebra"])
    with pytest.raises(SearchError, match="window"):
        word_topic_codes(cache, WORDS, window=0)
    with pytest.raises(SearchError, match="min_count"):
        word_topic_codes(cache, WORDS, min_count=0)
