"""Codes that announce a topic: found from the topic's words alone, over a code cache.

Topic steering forces a topic's codes on during generation; the codes to force should
be the ones whose activation, in the model's own text, comes before the topic. Given
the topic's words, :func:`words_ahead` marks every cached token followed within
``window`` tokens (same document) by a token that holds one of the words, and
:func:`word_topic_codes` ranks each code by its *precision* for that mark: the share
of its activations that such a token follows. A code of high precision fires where the
model is about to write about the topic, whatever it reads there (the topic's words
themselves, related words, or a context that leads to them).

Compared with :func:`codebook_lens.analysis.search.topic_codes` (codes that fire on a
passage about the topic), this needs no hand-written passage and scores every code on
the whole cache, so it carries over to any topic given as a list of words.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from codebook_lens.analysis.search import SearchError, matching_tokens
from codebook_lens.cache.store import CodeCache, code_counts
from codebook_lens.core.refs import CodeRef


def words_pattern(words: Sequence[str]) -> str:
    """An RE2 pattern matching any of ``words`` as a whole word, ignoring case."""
    cleaned = sorted({w.strip() for w in words if w.strip()}, key=len, reverse=True)
    if not cleaned:
        raise SearchError(f"give at least one topic word, got {list(words)!r}")
    return r"(?i)\b(?:" + "|".join(re.escape(w) for w in cleaned) + r")\b"


def words_ahead(cache: CodeCache, words: Sequence[str], window: int) -> np.ndarray:
    """Boolean ``(tokens,)``: token t is followed, within the next ``window`` tokens of
    its document (t + 1 .. t + window), by a token holding one of ``words``."""
    if not isinstance(window, int) or window < 1:
        raise SearchError(f"window must be a positive integer, got {window!r}")
    hit = matching_tokens(cache, words_pattern(words))
    return ahead_of(hit, cache.doc_ids, window)


def ahead_of(hit: np.ndarray, doc_ids: np.ndarray, window: int) -> np.ndarray:
    """``out[t]``: some ``hit[u]`` with ``t < u <= t + window`` in the same document
    (``doc_ids`` rise in token order)."""
    n = hit.shape[0]
    csum = np.concatenate([[0], np.cumsum(hit, dtype=np.int64)])  # csum[i] = hits before i
    doc_ids = np.asarray(doc_ids)
    # the last token of each token's document
    change = np.flatnonzero(np.diff(doc_ids)) + 1
    ends = np.concatenate([change, [n]])  # one past each document's last token
    doc_end = np.repeat(ends, np.diff(np.concatenate([[0], ends])))
    t = np.arange(n)
    stop = np.minimum(t + window + 1, doc_end)  # one past the last token looked at
    return (csum[stop] - csum[t + 1]) > 0


@dataclass
class WordTopicHit:
    """A code ranked by how often the topic follows it."""

    ref: CodeRef
    precision: float  # share of its activations followed by a topic word within the window
    lift: float  # precision over the share of all tokens so followed
    count: int  # its activations
    hits: int  # those followed by a topic word

    def to_dict(self) -> dict:
        return {
            "code": str(self.ref),
            "codebook": self.ref.codebook,
            "group": self.ref.group,
            "id": self.ref.code,
            "precision": self.precision,
            "lift": self.lift,
            "count": self.count,
            "hits": self.hits,
        }


def word_topic_codes(
    cache: CodeCache,
    words: Sequence[str],
    *,
    window: int = 16,
    min_count: int = 20,
    max_frequency: float = 0.05,
    limit: int | None = 50,
    codebooks: list[str] | None = None,
) -> list[WordTopicHit]:
    """Codes ranked by the share of their activations that a topic word follows within
    ``window`` tokens (:func:`words_ahead`), most precise first (ties: more activations).

    Codes firing fewer than ``min_count`` times or on more than ``max_frequency`` of the
    cached tokens are left out (too rare to trust, or too generic to be about a topic).
    """
    if not isinstance(min_count, int) or min_count < 1:
        raise SearchError(f"min_count must be a positive integer, got {min_count!r}")
    if not 0.0 < max_frequency <= 1.0:
        raise SearchError(f"max_frequency must be in (0, 1], got {max_frequency}")
    ahead = words_ahead(cache, words, window)
    rate = float(ahead.mean()) if ahead.size else 0.0
    if rate == 0.0:
        raise SearchError(f"no cached token is followed by any of {sorted(set(words))}")
    rows = np.flatnonzero(ahead)
    hits: list[WordTopicHit] = []
    for key in cache.codebooks if codebooks is None else codebooks:
        info = cache.info(key)
        totals = cache.counts(key)
        picked = np.asarray(cache.codes(key)[rows])  # (P, G, k)
        for g in range(info.groups):
            tp = code_counts(picked[:, g, :], info.num_codes)
            count = totals[g]
            keep = np.flatnonzero(
                (count >= min_count) & (count <= max_frequency * cache.num_tokens) & (tp > 0)
            )
            precision = tp[keep] / count[keep]
            hits.extend(
                WordTopicHit(CodeRef(key, int(c), g), float(p), float(p / rate), int(n), int(h))
                for c, p, n, h in zip(keep, precision, count[keep], tp[keep], strict=True)
            )
    hits.sort(key=lambda h: (-h.precision, -h.count, str(h.ref)))
    return hits if limit is None else hits[:limit]
