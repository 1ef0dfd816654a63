"""Searching a code cache: regex -> codes, topic -> codes, similar codes and a code's
direct effect on the logits. The neuron baseline for regex codes is in :mod:`.neurons`.

Regex matching (paper definition). A token *matches* a pattern when a non-empty match
of the pattern ends inside it (the token holds the match's last character). A code's
precision is the fraction of the tokens it fires on that match; its recall is the
fraction of matching tokens it fires on. Patterns run on the original documents with
RE2, whose matching time is linear in the text, so no pattern can hang the process.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch

from codebook_lens.cache.store import CodeCache, code_counts, stored_ids
from codebook_lens.core.errors import CodebookLensError
from codebook_lens.core.refs import CodeRef

MAX_PATTERN_CHARS = 1000
REGEX_MAX_MEM = 64 << 20  # bytes RE2 may use for one compiled pattern


class SearchError(CodebookLensError):
    """A query that cannot be answered as asked (bad pattern, bad threshold, ...)."""


# ----------------------------------------------------------------------------------------
# regex -> matching tokens


def compile_pattern(pattern: str):
    """An RE2 pattern, or a SearchError naming what is wrong with it."""
    import re2

    if not isinstance(pattern, str) or not pattern:
        raise SearchError("the pattern is empty")
    if len(pattern) > MAX_PATTERN_CHARS:
        raise SearchError(f"the pattern has {len(pattern)} characters; at most {MAX_PATTERN_CHARS}")
    options = re2.Options()
    options.log_errors = False
    options.max_mem = REGEX_MAX_MEM
    try:
        return re2.compile(pattern.encode("utf-8", "surrogatepass"), options)
    except re2.error as err:
        msg = err.args[0].decode() if err.args and isinstance(err.args[0], bytes) else str(err)
        raise SearchError(
            f"invalid pattern {pattern!r}: {msg} (RE2 syntax: no backreferences or lookaround)"
        ) from None


def _check_deadline(deadline: float | None, pattern: str) -> None:
    if deadline is not None and time.perf_counter() > deadline:
        raise SearchError(
            f"the search for {pattern!r} ran past its time budget; "
            "try a more specific pattern or search fewer tokens"
        )


def matching_tokens(
    cache: CodeCache,
    pattern: str,
    max_tokens: int | None = None,
    *,
    deadline: float | None = None,
    first: bool = False,
) -> np.ndarray:
    """Boolean ``(tokens,)``: which cached tokens hold the last character of a match
    (``first``: its first character).

    ``deadline`` (a ``time.perf_counter()`` value) stops the scan with a SearchError once
    passed; it is checked per document and every few thousand matches.
    """
    regex = compile_pattern(pattern)
    n = cache.num_tokens if max_tokens is None else min(max_tokens, cache.num_tokens)
    doc_first = cache.doc_first_token()
    # matching runs on UTF-8 bytes (RE2's native form): offsets need no conversion
    docs, starts, ends = cache.utf8()
    mask = np.zeros(cache.num_tokens, dtype=bool)
    last_doc = int(cache.doc_ids[n - 1]) if n else -1
    for doc in range(last_doc + 1):
        lo, hi = int(doc_first[doc]), min(int(doc_first[doc + 1]), n)
        if hi <= lo:
            continue
        _check_deadline(deadline, pattern)
        ends_at: list[int] = []
        found = regex.finditer(docs[doc])
        while chunk := list(itertools.islice(found, 4096)):
            ends_at.extend(
                (m.start() if first else m.end() - 1) for m in chunk if m.end() > m.start()
            )
            _check_deadline(deadline, pattern)
        if not ends_at:
            continue
        last = np.asarray(ends_at, dtype=np.int64)  # the last (first) byte of each match
        doc_starts = starts[lo:hi]
        # the token whose span [start, end) holds that byte; tokens are in text order, and
        # a character split over byte tokens belongs to the last of them
        idx = np.searchsorted(doc_starts, last, side="right") - 1
        ok = idx >= 0
        idx, last = idx[ok], last[ok]
        inside = last < ends[lo:hi][idx]
        mask[lo + idx[inside]] = True
    return mask


# ----------------------------------------------------------------------------------------
# regex -> codes


@dataclass
class CodeScore:
    ref: CodeRef
    precision: float
    recall: float
    true_positives: int  # matching tokens the code fires on
    count: int  # tokens the code fires on

    def to_dict(self) -> dict:
        return {
            "code": str(self.ref),
            "codebook": self.ref.codebook,
            "group": self.ref.group,
            "id": self.ref.code,
            "precision": self.precision,
            "recall": self.recall,
            "true_positives": self.true_positives,
            "count": self.count,
        }


@dataclass
class RegexResult:
    pattern: str
    matches: int  # matching tokens
    tokens: int  # tokens searched
    codes: list[CodeScore]
    seconds: float

    def to_dict(self) -> dict:
        return {
            "pattern": self.pattern,
            "matching_tokens": self.matches,
            "tokens": self.tokens,
            "seconds": self.seconds,
            "codes": [c.to_dict() for c in self.codes],
        }


def score_codes(
    cache: CodeCache,
    positives: np.ndarray,
    codebooks: list[str] | None = None,
    min_precision: float = 0.0,
    min_recall: float = 0.0,
    min_count: int = 1,
    limit: int | None = 50,
    sort: str = "precision",
    max_tokens: int | None = None,
    *,
    deadline: float | None = None,
    pattern: str = "",
) -> list[CodeScore]:
    """Precision and recall of every code that fires on a positive token, filtered, sorted.

    ``deadline``: as for :func:`matching_tokens`, checked per codebook.
    """
    for name, value in (("min_precision", min_precision), ("min_recall", min_recall)):
        if not 0.0 <= value <= 1.0:
            raise SearchError(f"{name} must be in [0, 1], got {value}")
    if sort not in ("precision", "recall", "f1", "count"):
        raise SearchError(f"sort must be precision, recall, f1 or count; got {sort!r}")
    n = cache.num_tokens if max_tokens is None else min(max_tokens, cache.num_tokens)
    rows = np.flatnonzero(positives[:n])
    n_pos = rows.size
    keys = codebooks if codebooks is not None else list(cache.codebooks)
    out: list[CodeScore] = []
    if n_pos == 0:
        return out
    for key in keys:
        _check_deadline(deadline, pattern)
        info = cache.info(key)
        codes = cache.codes(key)
        picked = np.asarray(codes[rows])  # (P, G, k)
        if n == cache.num_tokens:
            totals = cache.counts(key)
        else:
            totals = np.stack(
                [code_counts(codes[:n, g, :], info.num_codes) for g in range(info.groups)]
            )
        for g in range(info.groups):
            tp = code_counts(picked[:, g, :], info.num_codes)
            hit = np.flatnonzero(tp)
            count = totals[g, hit]
            precision = tp[hit] / np.maximum(count, 1)
            recall = tp[hit] / n_pos
            keep = (precision >= min_precision) & (recall >= min_recall) & (count >= min_count)
            for c, p, r, t, m in zip(
                hit[keep], precision[keep], recall[keep], tp[hit][keep], count[keep], strict=True
            ):
                out.append(CodeScore(CodeRef(key, int(c), g), float(p), float(r), int(t), int(m)))

    def f1(s: CodeScore) -> float:
        return (
            0.0
            if s.precision + s.recall == 0
            else 2 * s.precision * s.recall / (s.precision + s.recall)
        )

    sort_key = {
        "precision": lambda s: (-s.precision, -s.recall),
        "recall": lambda s: (-s.recall, -s.precision),
        "f1": lambda s: (-f1(s), -s.precision),
        "count": lambda s: (-s.count, -s.precision),
    }[sort]
    out.sort(key=sort_key)
    return out if limit is None else out[:limit]


def regex_codes(
    cache: CodeCache,
    pattern: str,
    *,
    codebooks: list[str] | None = None,
    min_precision: float = 0.0,
    min_recall: float = 0.0,
    min_count: int = 1,
    limit: int | None = 50,
    sort: str = "precision",
    max_tokens: int | None = None,
    time_budget: float | None = None,
) -> RegexResult:
    """Codes ranked by how well they classify the tokens matching ``pattern``.

    ``time_budget`` (seconds) bounds the whole search: past it, a SearchError.
    """
    t0 = time.perf_counter()
    deadline = None if time_budget is None else t0 + time_budget
    positives = matching_tokens(cache, pattern, max_tokens, deadline=deadline)
    n = cache.num_tokens if max_tokens is None else min(max_tokens, cache.num_tokens)
    scores = score_codes(
        cache,
        positives,
        codebooks,
        min_precision,
        min_recall,
        min_count,
        limit,
        sort,
        max_tokens,
        deadline=deadline,
        pattern=pattern,
    )
    return RegexResult(pattern, int(positives[:n].sum()), n, scores, time.perf_counter() - t0)


# ----------------------------------------------------------------------------------------
# topic -> codes


@dataclass
class TopicHit:
    ref: CodeRef
    coverage: float  # fraction of the text's tokens the code fires on
    frequency: float  # fraction of all cached tokens the code fires on
    hits: int  # tokens of the text it fires on

    def to_dict(self) -> dict:
        return {
            "code": str(self.ref),
            "codebook": self.ref.codebook,
            "group": self.ref.group,
            "id": self.ref.code,
            "coverage": self.coverage,
            "frequency": self.frequency,
            "hits": self.hits,
        }


@torch.no_grad()
def text_codes(cache: CodeCache, text: str) -> tuple[list[int], dict[str, np.ndarray]]:
    """Run the cache's model on ``text`` (in blocks of the cache's length): its token ids
    and, per codebook, ``(tokens, groups, k)`` code ids, empty slots as the codebook's C
    (as a cache stores them)."""
    loaded = cache.model()
    ids, _ = loaded.codec.encode(text)
    if not ids:
        raise SearchError("the text holds no tokens")
    seq_len = int(cache.manifest["seq_len"])
    model = loaded.model
    device = next(model.parameters()).device
    parts: dict[str, list[np.ndarray]] = {}
    for s in range(0, len(ids), seq_len):
        chunk = torch.tensor([ids[s : s + seq_len]], device=device)
        out = model(chunk, return_codes=True, use_cache=False)
        for key, codes in out.codes.items():
            num_codes = model.codebooks[key].num_codes
            parts.setdefault(key, []).append(stored_ids(codes[0].cpu().numpy(), num_codes))
    return ids, {k: np.concatenate(v) for k, v in parts.items()}


def topic_codes(
    cache: CodeCache,
    text: str,
    *,
    min_fraction: float = 0.5,
    max_frequency: float = 0.01,
    limit: int | None = 50,
    codebooks: list[str] | None = None,
) -> list[TopicHit]:
    """Codes that fire on at least ``min_fraction`` of the text's tokens and on at most
    ``max_frequency`` of the cached corpus (to skip generic codes); most covering first."""
    if not 0.0 < min_fraction <= 1.0:
        raise SearchError(f"min_fraction must be in (0, 1], got {min_fraction}")
    if not 0.0 < max_frequency <= 1.0:
        raise SearchError(f"max_frequency must be in (0, 1], got {max_frequency}")
    ids, codes = text_codes(cache, text)
    n = len(ids)
    hits: list[TopicHit] = []
    for key, arr in codes.items():
        if codebooks is not None and key not in codebooks:
            continue
        info = cache.info(key)
        freq = cache.frequencies(key)
        for g in range(info.groups):
            # a code counts once per token, whichever of the k slots it holds
            # empty slots are id num_codes (see text_codes): a stride of C + 1 keeps them apart
            stride = info.num_codes + 1
            per_token = np.unique(arr[:, g, :] + np.arange(n)[:, None] * stride)
            counts = code_counts(per_token % stride, info.num_codes)
            cover = counts / n
            keep = np.flatnonzero((cover >= min_fraction) & (freq[g] <= max_frequency))
            hits.extend(
                TopicHit(
                    CodeRef(key, int(c), g), float(cover[c]), float(freq[g, c]), int(counts[c])
                )
                for c in keep
            )
    hits.sort(key=lambda h: (-h.coverage, h.frequency))
    return hits if limit is None else hits[:limit]


# ----------------------------------------------------------------------------------------
# code vectors: similar codes and direct logit effect


def similar_codes(cache: CodeCache, ref: CodeRef, top: int = 10) -> list[tuple[CodeRef, float]]:
    """The ``top`` codes of the same codebook (and head) whose vectors have the highest
    cosine similarity with ``ref``'s."""
    cache.check(ref)
    if top < 1:
        raise SearchError(f"top must be >= 1, got {top}")
    w = torch.nn.functional.normalize(cache.code_vectors(ref.codebook)[ref.group].float(), dim=-1)
    sims = w @ w[ref.code]
    sims[ref.code] = -float("inf")
    k = min(top, sims.numel() - 1)
    best = sims.topk(k)
    return [
        (CodeRef(ref.codebook, int(i), ref.group), float(v))
        for i, v in zip(best.indices.tolist(), best.values.tolist(), strict=True)
    ]


def logit_effect(cache: CodeCache, ref: CodeRef, top: int = 10) -> dict:
    """Tokens ``ref`` promotes and suppresses most through the direct path to the logits
    (stored at build time; see :func:`codebook_lens.cache.build.code_logit_effects`)."""
    cache.check(ref)
    eff = cache.effects(ref.codebook)
    vocab = cache.vocab()
    top = min(top, eff["promoted"].shape[-1])

    def rows(ids_name: str, val_name: str) -> list[dict]:
        ids = eff[ids_name][ref.group, ref.code, :top].tolist()
        vals = eff[val_name][ref.group, ref.code, :top].tolist()
        return [
            {"token_id": i, "token": vocab[i], "logit": v} for i, v in zip(ids, vals, strict=True)
        ]

    return {
        "code": str(ref),
        "promoted": rows("promoted", "promoted_logit"),
        "suppressed": rows("suppressed", "suppressed_logit"),
    }


@dataclass
class EffectHit:
    """A code whose direct effect on the logits promotes some of the given words."""

    ref: CodeRef
    score: float  # the summed centred logits of the words among its promoted tokens
    words: list[str]  # those tokens' texts, most promoted first
    frequency: float  # activations per cached token

    def to_dict(self) -> dict:
        return {
            "code": str(self.ref),
            "score": self.score,
            "words": self.words,
            "frequency": self.frequency,
        }


def effect_codes(
    cache: CodeCache,
    words: Sequence[str],
    *,
    max_frequency: float = 0.01,
    limit: int | None = 50,
    codebooks: list[str] | None = None,
) -> list[EffectHit]:
    """Codes whose direct effect on the logits (:func:`logit_effect`) promotes any of
    ``words``: a promoted token counts when its text, stripped of spaces and lowercased,
    is one of the words. Ranked by the summed centred logits of those tokens; codes
    firing on more than ``max_frequency`` of the cached corpus are skipped.

    Only the promoted tokens stored with the cache (its top 20 per code) are seen.
    """
    if not 0.0 < max_frequency <= 1.0:
        raise SearchError(f"max_frequency must be in (0, 1], got {max_frequency}")
    wanted = {w.strip().lower() for w in words if w.strip()}
    if not wanted:
        raise SearchError("give at least one word")
    vocab = cache.vocab()
    is_word = np.array([t.strip().lower() in wanted for t in vocab], dtype=bool)
    hits: list[EffectHit] = []
    for key in cache.codebooks:
        if codebooks is not None and key not in codebooks:
            continue
        eff = cache.effects(key)
        freq = cache.frequencies(key)
        promoted, logits = eff["promoted"], eff["promoted_logit"]  # (G, C, top)
        match = is_word[promoted] & (logits > 0)
        score = np.where(match, logits, 0.0).sum(-1)  # (G, C)
        for g, c in zip(*np.nonzero(score > 0), strict=True):
            if freq[g, c] > max_frequency:
                continue
            texts = [vocab[t] for t in promoted[g, c][match[g, c]].tolist()]
            hits.append(
                EffectHit(
                    CodeRef(key, int(c), int(g)), float(score[g, c]), texts, float(freq[g, c])
                )
            )
    hits.sort(key=lambda h: (-h.score, h.frequency))
    return hits if limit is None else hits[:limit]


Hit = TypeVar("Hit", "TopicHit", "EffectHit")


def per_codebook(hits: Sequence[Hit], n: int) -> list[Hit]:
    """The first ``n`` hits of every codebook, in the order given (the paper steers with
    codes of every layer: the best of each codebook, not the best overall)."""
    if n < 1:
        raise SearchError(f"per-codebook count must be >= 1, got {n}")
    taken: dict[str, int] = {}
    kept = []
    for hit in hits:
        taken[hit.ref.codebook] = taken.get(hit.ref.codebook, 0) + 1
        if taken[hit.ref.codebook] <= n:
            kept.append(hit)
    return kept


def frequency_by_rank(cache: CodeCache, key: str) -> np.ndarray:
    """Activation counts of every code of a codebook (all heads), sorted descending."""
    return np.sort(cache.counts(key).reshape(-1))[::-1]
