"""Topic codes from a topic's words: the look-ahead mark by hand, the ranking against a
scan of the cache."""

from __future__ import annotations

import dataclasses
import math
import re

import numpy as np
import pytest
import torch
from helpers import corpus_text, save_tiny_bpe_codebook_model, save_tiny_codebook_model, tiny_cache

from codebook_lens.analysis.search import SearchError
from codebook_lens.analysis.topics import (
    TopicTokens,
    ahead_of,
    code_gradients,
    effect_topic_codes,
    first_tokens,
    topic_logit,
    topic_tokens,
    word_topic_codes,
    words_ahead,
    words_pattern,
)
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


# ----------------------------------------------------------------------------------------
# codes by their effect on the topic


@pytest.fixture(scope="module")
def bpe_cache(tmp_path_factory):
    """A cache of a model whose BPE tokenizer has words as tokens."""
    root = tmp_path_factory.mktemp("bpe")
    model_dir = save_tiny_bpe_codebook_model(root)
    return tiny_cache(root, model_dir, docs=4, lines=12, seq_len=32, batch_size=8)


BPE_WORDS = ["boat", "apple", "tree"]


def test_first_tokens_are_each_form_s_first_token_after_a_space(bpe_cache):
    codec = bpe_cache.model().codec
    ids = first_tokens(codec, ["boat", "Apple", " "])
    expected = set()
    for form in ("boat", "Boat", "apple", "Apple"):
        encoded = codec.encode(" " + form)[0]
        # where the space is a token of its own, the word starts with the next one
        expected.add(encoded[1] if codec.decode([encoded[0]]) == " " else encoded[0])
    assert ids == sorted(expected)
    assert codec.encode(" boat")[0][0] in ids  # a word of the vocabulary: one token
    assert all(codec.decode([i]).strip() for i in ids)


def _brute_force_weights(cache, words):
    """Each first token's weight by a scan of the cache with Python's ``re`` on the
    documents' characters: (occurrences holding a topic word's first character + 1 if
    the token spells a topic word) / (occurrences + 1)."""
    codec = cache.model().codec
    regex = re.compile(words_pattern(words).replace("(?i)", ""), re.IGNORECASE)
    first = cache.doc_first_token()
    tokens = np.asarray(cache.token_ids)
    spelled = {w.lower() for w in words}
    weights = {}
    for i in first_tokens(codec, words):
        n = starts = 0
        for doc, text in enumerate(cache.docs):
            begins = [m.start() for m in regex.finditer(text)]
            for t in range(int(first[doc]), int(first[doc + 1])):
                if tokens[t] == i:
                    n += 1
                    starts += any(cache.starts[t] <= b < cache.ends[t] for b in begins)
        w = (starts + (codec.decode([i]).strip().lower() in spelled)) / (n + 1)
        if w > 0:
            weights[i] = w
    return weights


def test_topic_tokens_weigh_each_first_token_as_a_scan_of_the_cache_does(bpe_cache):
    words = BPE_WORDS + ["boats", "xq"]
    found = topic_tokens(bpe_cache, words)
    expected = _brute_force_weights(bpe_cache, words)
    assert dict(zip(found.ids, found.weights, strict=True)) == pytest.approx(expected)
    # the words occur, so some token counts fully and none counts for nothing
    assert max(found.weights) > 0.5 and min(found.weights) > 0
    with pytest.raises(SearchError, match="occurs in the cache or is a token of its own"):
        topic_tokens(bpe_cache, ["xqzv"])


def test_topic_tokens_count_a_word_start_by_hand(cache):
    # the tiny model writes a space and each letter as tokens of their own: "b" and "B"
    # start the word, wherever they occur; the last document, "A small boat. The Boat,
    # boats!", holds one of each ("boats" is not "boat")
    codec = cache.model().codec
    b, big_b = codec.encode("b")[0][0], codec.encode("B")[0][0]
    assert first_tokens(codec, ["boat"]) == sorted([b, big_b])
    found = topic_tokens(cache, ["boat"])
    weights = dict(zip(found.ids, found.weights, strict=True))
    tokens = np.asarray(cache.token_ids)
    n_b, n_big = int((tokens == b).sum()), int((tokens == big_b).sum())
    # every " b" before "boat" or "boats" of the corpus text and the last document
    boat_starts = sum(len(re.findall(r"\bboat\b", d)) for d in DOCS)
    big_starts = sum(len(re.findall(r"\bBoat\b", d)) for d in DOCS)
    assert weights[b] == pytest.approx(boat_starts / (n_b + 1))
    assert weights[big_b] == pytest.approx(big_starts / (n_big + 1))


def test_topic_tokens_log_rate_by_hand():
    tokens = TopicTokens((1, 3), (0.5, 0.25))
    p = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.25, 0.25, 0.25, 0.25]])
    expected = [math.log(0.5 * 0.2 + 0.25 * 0.4), math.log(0.5 * 0.25 + 0.25 * 0.25)]
    assert tokens.log_rate(p.log()).tolist() == pytest.approx(expected)


def test_topic_logit_by_hand():
    logits = torch.tensor([[[1.0, 2.0, 3.0, 6.0], [0.0, 0.0, 4.0, 0.0]]])
    even = TopicTokens((1, 3), (1.0, 1.0))
    # position 0: mean(2, 6) - mean(all) = 4 - 3 = 1; position 1: mean(0, 0) - 1 = -1
    assert topic_logit(logits, even).item() == pytest.approx(0.0)
    assert topic_logit(logits[:, :1], even).item() == pytest.approx(1.0)
    # weighted 3:1, position 0: (3 * 2 + 6) / 4 - 3 = 0
    assert topic_logit(logits[:, :1], TopicTokens((1, 3), (0.75, 0.25))).item() == pytest.approx(
        0.0
    )


def test_code_gradients_match_a_finite_difference(bpe_cache):
    model = bpe_cache.model().model
    ids = TopicTokens((3, 5, 9), (1.0, 0.5, 0.25))
    blocks = torch.from_numpy(np.asarray(bpe_cache.token_ids[:64], dtype=np.int64)).view(2, 32)
    grads = code_gradients(model, [blocks], ids)
    # the last codebook: nothing quantizes what it writes on its way to the logits (an
    # earlier codebook's gradient passes the later ones straight through)
    key = "layer1_mlp"
    gen = torch.Generator().manual_seed(0)
    v = torch.randn(grads[key].shape, generator=gen)

    def shifted(eps: float) -> float:
        def hook(_module, _args, result):
            out = result.output + eps * v.reshape(-1)
            return dataclasses.replace(result, output=out)

        handle = model.codebooks[key].register_forward_hook(hook)
        try:
            with torch.no_grad():
                return topic_logit(model(blocks).logits, ids).item()
        finally:
            handle.remove()

    eps = 1e-3
    numeric = (shifted(eps) - shifted(-eps)) / (2 * eps)
    assert (grads[key] * v).sum().item() == pytest.approx(numeric, rel=2e-2, abs=1e-4)


def test_effect_topic_codes_are_code_vectors_against_the_gradient(bpe_cache):
    cache = bpe_cache
    hits = effect_topic_codes(cache, BPE_WORDS, batches=1, batch_size=2, min_count=2, limit=None)
    model = cache.model().model
    ids = topic_tokens(cache, BPE_WORDS)
    blocks = torch.from_numpy(np.asarray(cache.token_ids[:64], dtype=np.int64)).view(2, 32)
    grads = code_gradients(model, [blocks], ids)
    for h in hits[:20]:
        cb = model.codebooks[h.ref.codebook]
        expected = float(
            cb.weight[h.ref.group, h.ref.code].detach() @ grads[h.ref.codebook][h.ref.group]
        )
        assert h.effect == pytest.approx(expected, rel=1e-4, abs=1e-6)
        assert h.count >= 2
    assert [h.effect for h in hits] == sorted((h.effect for h in hits), reverse=True)
