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

What the model is about to write is read from its next-token distribution:
:func:`topic_tokens` lists the tokens a topic word starts with and weighs each by the
share of its cached occurrences that do start one (a small vocabulary splits most
words, and `` st`` starts *storm* far less often than anything else), so that a weighted
sum of their probabilities is the probability that the next word is a topic word.
:func:`effect_topic_codes` ranks codes by their first-order effect on it.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from codebook_lens.analysis.search import SearchError, matching_tokens
from codebook_lens.cache.store import CodeCache, code_counts
from codebook_lens.core.model import CodebookModel
from codebook_lens.core.refs import CodeRef


def check_code_filter(min_count: int, max_frequency: float) -> None:
    """Refuse a code filter (at least ``min_count`` activations, on at most
    ``max_frequency`` of the cached tokens) that no code could pass sensibly."""
    if not isinstance(min_count, int) or min_count < 1:
        raise SearchError(f"min_count must be a positive integer, got {min_count!r}")
    if not 0.0 < max_frequency <= 1.0:
        raise SearchError(f"max_frequency must be in (0, 1], got {max_frequency}")


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
    check_code_filter(min_count, max_frequency)
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


# ----------------------------------------------------------------------------------------
# codes that make the model write the topic: their first-order effect


def first_tokens(codec, words: Sequence[str]) -> list[int]:
    """The tokens a topic word can start with in running text: of each word after a
    space, in lower case, capitalised and as given, the first token that holds more than
    whitespace (`` war`` and `` War`` of a BPE vocabulary; ``w`` and ``W`` of one that
    writes the space as a token of its own)."""
    ids: set[int] = set()
    for word in {w.strip() for w in words if w.strip()}:
        for form in {word.lower(), word.capitalize(), word}:
            encoded, _ = codec.encode(" " + form)
            first = next((i for i in encoded if codec.decode([i]).strip()), None)
            if first is not None:
                ids.add(int(first))
    return sorted(ids)


@dataclass(frozen=True)
class TopicTokens:
    """The tokens a topic word starts with, each weighted by the chance that, where the
    token occurs, the word it starts is a topic word: ``rate(p) = sum_i weights[i] *
    p[ids[i]]`` is then the probability that the next word is a topic word, given that
    the word a token starts goes on as it does in the cached text. A first token shared
    with many other words (`` less`` of *lesson*, `` st`` of *storm*) counts for little;
    one that is the topic word itself (`` war``) counts fully."""

    ids: tuple[int, ...]
    weights: tuple[float, ...]

    def log_rate(self, logp: torch.Tensor) -> torch.Tensor:
        """``log sum_i w_i p_i`` over the last axis of log-probabilities ``logp``."""
        w = torch.tensor(self.weights, dtype=logp.dtype, device=logp.device)
        return (logp[..., list(self.ids)] + w.log()).logsumexp(-1)

    def to_dict(self, codec=None) -> dict[str, float]:
        """``{token: weight}``, tokens as text when ``codec`` is given."""
        name = (lambda i: codec.decode([i])) if codec is not None else str
        return {name(i): w for i, w in zip(self.ids, self.weights, strict=True)}


def word_start_counts(cache: CodeCache, words: Sequence[str], ids: Sequence[int]):
    """For each of ``ids``: how often it occurs in the cache, and how often it holds the
    first character of a topic word (a match of :func:`words_pattern`); two
    ``(len(ids),)`` integer arrays."""
    tokens = np.asarray(cache.token_ids, dtype=np.int64)
    starting = tokens[matching_tokens(cache, words_pattern(words), first=True)]
    total = np.array([int((tokens == i).sum()) for i in ids], dtype=np.int64)
    return total, np.array([int((starting == i).sum()) for i in ids], dtype=np.int64)


def topic_tokens(cache: CodeCache, words: Sequence[str]) -> TopicTokens:
    """The :class:`TopicTokens` of ``words`` over ``cache``: every first token of a topic
    word (:func:`first_tokens`), weighted by ``(starts + whole) / (occurrences + 1)``,
    where ``starts`` counts its cached occurrences that start a topic word and ``whole``
    is 1 when the token is itself a topic word (so a token the cache never holds counts
    fully if it spells a topic word, and not at all otherwise). Tokens of weight 0 are
    left out."""
    codec = cache.model().codec
    ids = first_tokens(codec, words)
    if not ids:
        raise SearchError(f"give at least one topic word, got {list(words)!r}")
    total, starts = word_start_counts(cache, words, ids)
    spelled = {w.strip().lower() for w in words if w.strip()}
    kept, weights = [], []
    for i, n, s in zip(ids, total, starts, strict=True):
        whole = int(codec.decode([i]).strip().lower() in spelled)
        w = (int(s) + whole) / (int(n) + 1)
        if w > 0:
            kept.append(i)
            weights.append(w)
    if not kept:
        raise SearchError(
            f"no topic word of {sorted(spelled)} occurs in the cache or is a token of its own"
        )
    return TopicTokens(tuple(kept), tuple(weights))


def topic_logit(logits: torch.Tensor, tokens: TopicTokens) -> torch.Tensor:
    """Mean over positions of the topic tokens' logits, averaged with their weights,
    minus the mean logit of the whole vocabulary (``logits``: ``(B, T, V)``): how far
    the model favours the topic's tokens over tokens in general. Unlike the topic's
    log-probability, it does not rise when the model merely grows less certain of its
    prediction."""
    logits = logits.float()
    w = torch.tensor(tokens.weights, dtype=logits.dtype, device=logits.device)
    topic = (logits[..., list(tokens.ids)] * w).sum(-1) / w.sum()
    return (topic - logits.mean(-1)).mean()


def code_gradients(
    model: CodebookModel, batches: Sequence[torch.Tensor], tokens: TopicTokens
) -> dict[str, torch.Tensor]:
    """For every codebook, ``(G, d)``: the first-order change in
    :func:`topic_logit` when a vector is added to the codebook's output (the sum of
    its codes) at every position, i.e. the gradient summed over positions, averaged
    over ``batches`` (each a ``(B, T)`` tensor of token ids). Later codebooks pass the
    gradient straight through, as in training: for all but the last codebook this is
    the effect on the model as if the later codebooks followed their inputs smoothly."""
    if not batches:
        raise SearchError("code gradients need at least one batch of tokens")
    grads: dict[str, torch.Tensor] = {}
    outputs: dict[str, torch.Tensor] = {}

    def keep(key: str):
        def hook(_module, _args, result):
            outputs[key] = result.output

        return hook

    handles = [cb.register_forward_hook(keep(key)) for key, cb in model.codebooks.items()]
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            for ids_batch in batches:
                outputs.clear()
                logits = model(ids_batch, use_cache=False).logits
                keys = list(outputs)
                found = torch.autograd.grad(topic_logit(logits, tokens), [outputs[k] for k in keys])
                for key, g in zip(keys, found, strict=True):
                    cb = model.codebooks[key]
                    summed = g.detach().float().reshape(-1, cb.groups, cb.dim).sum(0)
                    grads[key] = grads.get(key, 0) + summed / len(batches)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return grads


@dataclass
class EffectTopicHit:
    """A code ranked by how much forcing it raises the topic's probability (first order)."""

    ref: CodeRef
    effect: float  # gradient of the topic's centred logit . the code vector
    count: int  # its activations on the cache

    def to_dict(self) -> dict:
        return {"code": str(self.ref), "effect": self.effect, "count": self.count}


def effect_topic_codes(
    cache: CodeCache,
    words: Sequence[str],
    *,
    batches: int = 4,
    batch_size: int = 16,
    min_count: int = 20,
    max_frequency: float = 0.05,
    limit: int | None = 50,
    tokens: TopicTokens | None = None,
) -> list[EffectTopicHit]:
    """Codes ranked by their first-order effect on how much the model favours writing a
    topic word next (:func:`topic_logit` over the topic's first tokens,
    :func:`topic_tokens`, unless ``tokens`` are given): the dot product of each code
    vector with the gradient of that quantity at its codebook's output, averaged over
    the first ``batches`` blocks of cached text. Forcing a code at every position adds
    its vector there, so this is the change it makes to first order. Only codes that fire at least
    ``min_count`` times and on at most ``max_frequency`` of the cached tokens qualify
    (codes the model uses, and not generic ones)."""
    check_code_filter(min_count, max_frequency)
    loaded = cache.model()
    model = loaded.model
    if tokens is None:
        tokens = topic_tokens(cache, words)
    seq_len = int(cache.manifest["seq_len"])
    cached = torch.from_numpy(np.asarray(cache.token_ids, dtype=np.int64))
    rows = min(batches * batch_size, cached.numel() // seq_len)
    if rows < 1:
        raise SearchError(f"the cache holds fewer than {seq_len} tokens")
    blocks = cached[: rows * seq_len].view(rows, seq_len)
    device = next(model.parameters()).device
    parts = [blocks[i : i + batch_size].to(device) for i in range(0, rows, batch_size)]
    grads = code_gradients(model, parts, tokens)
    hits: list[EffectTopicHit] = []
    for key, g in grads.items():
        cb = model.codebooks[key]
        effect = torch.einsum("gcd,gd->gc", cb.weight.detach().float(), g.float())
        counts = cache.counts(key)
        ok = (counts >= min_count) & (counts <= max_frequency * cache.num_tokens)
        for grp, code in zip(*np.nonzero(ok), strict=True):
            hits.append(
                EffectTopicHit(
                    CodeRef(key, int(code), int(grp)),
                    float(effect[grp, code]),
                    int(counts[grp, code]),
                )
            )
    hits.sort(key=lambda h: (-h.effect, str(h.ref)))
    return hits if limit is None else hits[:limit]
