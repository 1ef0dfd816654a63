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


def topic_token_ids(codec, words: Sequence[str]) -> list[int]:
    """The tokens a topic word starts with in running text: the first token of each
    word after a space, in lower case and capitalised (`` war``, `` War``). A first token
    shorter than three characters (or than the word) is left out: it starts too many
    other words to stand for the topic."""
    ids: set[int] = set()
    for word in {w.strip() for w in words if w.strip()}:
        for form in {word.lower(), word.capitalize(), word}:
            encoded, _ = codec.encode(" " + form)
            if encoded and len(codec.decode([encoded[0]]).strip()) >= min(3, len(form)):
                ids.add(int(encoded[0]))
    if not ids:
        raise SearchError(f"no topic word starts with a token of its own: {list(words)!r}")
    return sorted(ids)


def topic_logit(logits: torch.Tensor, ids: Sequence[int]) -> torch.Tensor:
    """Mean over positions of the topic tokens' mean logit minus the mean logit of the
    whole vocabulary (``logits``: ``(B, T, V)``): how far the model favours the topic's
    tokens over tokens in general. Unlike the topic's log-probability, it does not rise
    when the model merely grows less certain of its prediction."""
    logits = logits.float()
    return (logits[..., list(ids)].mean(-1) - logits.mean(-1)).mean()


def code_gradients(
    model: CodebookModel, batches: Sequence[torch.Tensor], ids: Sequence[int]
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
                found = torch.autograd.grad(topic_logit(logits, ids), [outputs[k] for k in keys])
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
) -> list[EffectTopicHit]:
    """Codes ranked by their first-order effect on how much the model favours writing a
    topic word next (:func:`topic_logit` over the topic's first tokens,
    :func:`topic_token_ids`): the dot product of each code vector with the gradient of
    that quantity at its codebook's output, averaged over the first ``batches``
    blocks of cached text. Forcing a code at every position adds its vector there, so
    this is the change it makes to first order. Only codes that fire at least
    ``min_count`` times and on at most ``max_frequency`` of the cached tokens qualify
    (codes the model uses, and not generic ones)."""
    check_code_filter(min_count, max_frequency)
    loaded = cache.model()
    model = loaded.model
    ids = topic_token_ids(loaded.codec, words)
    seq_len = int(cache.manifest["seq_len"])
    tokens = torch.from_numpy(np.asarray(cache.token_ids, dtype=np.int64))
    rows = min(batches * batch_size, tokens.numel() // seq_len)
    if rows < 1:
        raise SearchError(f"the cache holds fewer than {seq_len} tokens")
    blocks = tokens[: rows * seq_len].view(rows, seq_len)
    device = next(model.parameters()).device
    parts = [blocks[i : i + batch_size].to(device) for i in range(0, rows, batch_size)]
    grads = code_gradients(model, parts, ids)
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
