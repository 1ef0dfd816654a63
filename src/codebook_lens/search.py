"""Searching a code cache: regex -> codes, the neuron baseline, topic -> codes, similar
codes and a code's direct effect on the logits.

Regex matching (paper definition). A token *matches* a pattern when a non-empty match
of the pattern ends inside it (the token holds the match's last character). A code's
precision is the fraction of the tokens it fires on that match; its recall is the
fraction of matching tokens it fires on. Patterns run on the original documents with
RE2, whose matching time is linear in the text, so no pattern can hang the process.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch
from tqdm.auto import tqdm

from . import sites as S
from .cache import CodeCache, code_counts, stored_ids
from .refs import CodeRef

MAX_PATTERN_CHARS = 1000
REGEX_MAX_MEM = 64 << 20  # bytes RE2 may use for one compiled pattern


class SearchError(ValueError):
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
) -> np.ndarray:
    """Boolean ``(tokens,)``: which cached tokens hold the last character of a match.

    ``deadline`` (a ``time.perf_counter()`` value) stops the scan with a SearchError once
    passed; it is checked per document and every few thousand matches.
    """
    regex = compile_pattern(pattern)
    n = cache.num_tokens if max_tokens is None else min(max_tokens, cache.num_tokens)
    first = cache.doc_first_token()
    # matching runs on UTF-8 bytes (RE2's native form): offsets need no conversion
    docs, starts, ends = cache.utf8()
    mask = np.zeros(cache.num_tokens, dtype=bool)
    last_doc = int(cache.doc_ids[n - 1]) if n else -1
    for doc in range(last_doc + 1):
        lo, hi = int(first[doc]), min(int(first[doc + 1]), n)
        if hi <= lo:
            continue
        _check_deadline(deadline, pattern)
        ends_at: list[int] = []
        found = regex.finditer(docs[doc])
        while chunk := list(itertools.islice(found, 4096)):
            ends_at.extend(m.end() - 1 for m in chunk if m.end() > m.start())
            _check_deadline(deadline, pattern)
        if not ends_at:
            continue
        last = np.asarray(ends_at, dtype=np.int64)  # the last byte of each match
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
# the neuron baseline


def _mlp_down(block: torch.nn.Module, family: S.Family) -> torch.nn.Module | None:
    mlp = block.get_submodule(family.mlp)
    for name in ("down_proj", "dense_4h_to_h", "c_proj", "fc_out", "fc2"):
        mod = getattr(mlp, name, None)
        if isinstance(mod, torch.nn.Module):
            return mod
    return None


class _Grabber:
    """Hooks that hand each layer's neurons to a callback as ``(name, (B*T, F))``."""

    def __init__(self, base: torch.nn.Module) -> None:
        self.base = base
        self.current: dict[str, torch.Tensor] = {}
        self.handles = []
        _, family = S.family_of(base)
        for layer in range(S.num_layers(base)):
            for site in ("attn", "mlp"):
                self.handles.append(S.attach(base, site, layer, self._grab(f"layer{layer}_{site}")))
            down = _mlp_down(S.decoder_layers(base)[layer], family)
            if down is not None:
                name = f"layer{layer}_mlp_hidden"

                def pre(_m, args, name=name):
                    self.current[name] = args[0].detach().float().reshape(-1, args[0].shape[-1])

                self.handles.append(down.register_forward_pre_hook(pre))

    def _grab(self, name: str):
        def grab(x: torch.Tensor):
            self.current[name] = x.detach().float().reshape(-1, x.shape[-1])
            return None

        return grab

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


@dataclass
class NeuronScore:
    site: str  # e.g. layer12_mlp_hidden
    neuron: int
    sign: int  # +1: fires above the threshold; -1: below
    threshold: float
    precision: float
    recall: float

    def to_dict(self) -> dict:
        return self.__dict__.copy()


def neuron_baseline(
    cache: CodeCache,
    positives: np.ndarray,
    recall: float,
    *,
    max_tokens: int | None = None,
    batch_size: int = 8,
    sample_positives: int = 1024,
    with_codebooks: bool = False,
    seed: int = 0,
) -> list[NeuronScore]:
    """For each site, the single neuron (either sign) with the best precision at a
    threshold set so that ``recall`` of the matching tokens pass it (paper Figure 3).

    The neurons are every layer's attention output, MLP output and MLP hidden units
    (the down projection's input) of the cache's model, with its codebooks off unless
    ``with_codebooks``. Two streamed passes over the first ``max_tokens`` cached tokens
    (in the cache's own blocks): the first reads the activations of up to
    ``sample_positives`` matching tokens and sets each neuron's threshold; the second
    counts, per neuron, the tokens and the matching tokens past its threshold. Memory is
    one batch of activations plus the sampled positives, never the whole corpus.
    Returns one score per site, best first; precision and recall are exact over the
    tokens scanned. :func:`neuron_curve` does the same for several recalls at once.
    """
    return neuron_curve(
        cache,
        positives,
        [recall],
        max_tokens=max_tokens,
        batch_size=batch_size,
        sample_positives=sample_positives,
        with_codebooks=with_codebooks,
        seed=seed,
    )[0]


def neuron_curve(
    cache: CodeCache,
    positives: np.ndarray,
    recalls: Sequence[float],
    *,
    max_tokens: int | None = None,
    batch_size: int = 8,
    sample_positives: int = 1024,
    with_codebooks: bool = False,
    seed: int = 0,
) -> list[list[NeuronScore]]:
    """:func:`neuron_baseline` at every recall of ``recalls``, in the same two passes.

    Returns, per recall, one score per site, best first. The best neuron's precision as
    a function of recall bounds what any code can gain over neurons: a code of recall r
    leads by at most 1 minus the best neuron's precision at r.
    """
    recalls = [float(r) for r in recalls]
    if not recalls:
        raise SearchError("recalls must name at least one recall")
    for recall in recalls:
        if not 0.0 < recall <= 1.0:
            raise SearchError(f"recall must be in (0, 1], got {recall}")
    n = cache.num_tokens if max_tokens is None else min(max_tokens, cache.num_tokens)
    seq_len = int(cache.manifest["seq_len"])
    pos_rows = np.flatnonzero(positives[:n])
    if pos_rows.size == 0:
        raise SearchError("no token matches, so no neuron can be scored")
    rng = np.random.default_rng(seed)
    sample = np.sort(rng.choice(pos_rows, size=min(sample_positives, pos_rows.size), replace=False))
    loaded = cache.model()
    model = loaded.model
    device = next(model.parameters()).device
    token_ids = torch.from_numpy(cache.token_ids[:n].astype(np.int64))

    def run(block_starts: list[int], desc: str):
        grab = _Grabber(model.model)
        ctx = model.codebooks_disabled() if not with_codebooks else contextlib.nullcontext()
        try:
            with torch.inference_mode(), ctx:
                for i in tqdm(range(0, len(block_starts), batch_size), desc=desc, leave=False):
                    starts = block_starts[i : i + batch_size]
                    full = [s for s in starts if s + seq_len <= n]
                    tail = [s for s in starts if s + seq_len > n]
                    for group in ([full] if full else []) + [[s] for s in tail]:
                        ids = torch.stack([token_ids[s : min(s + seq_len, n)] for s in group])
                        grab.current.clear()
                        model.model(input_ids=ids.to(device), use_cache=False)
                        rows = np.concatenate([np.arange(s, min(s + seq_len, n)) for s in group])
                        yield rows, grab.current
        finally:
            grab.remove()

    # pass 1: activations of the sampled positives
    blocks = sorted({int(r) // seq_len * seq_len for r in sample})
    pos_acts: dict[str, list[torch.Tensor]] = {}
    sample_set = set(sample.tolist())
    for rows, acts in run(blocks, "neurons: matching tokens"):
        sel = torch.from_numpy(np.fromiter((r in sample_set for r in rows), bool, len(rows)))
        for name, a in acts.items():
            pos_acts.setdefault(name, []).append(a[sel].cpu())
    need = torch.tensor([max(1, math.ceil(r * len(sample))) for r in recalls]) - 1
    hi_t, lo_t = {}, {}  # (R, F) per site: `need` positives are >= (hi) or <= (lo) it
    for name, parts in pos_acts.items():
        a = torch.cat(parts)  # (P, F)
        hi_t[name] = a.sort(0, descending=True).values[need]
        lo_t[name] = a.sort(0).values[need]
    del pos_acts

    # pass 2: count every token past each threshold
    all_blocks = list(range(0, n, seq_len))
    stats = {name: torch.zeros(4, *t.shape, dtype=torch.int64) for name, t in hi_t.items()}
    pos_mask = torch.from_numpy(positives[:n].copy())
    for rows, acts in run(all_blocks, "neurons: all tokens"):
        is_pos = pos_mask[torch.from_numpy(rows)].view(-1, 1, 1)
        for name, a in acts.items():
            a = a.cpu().unsqueeze(1)  # (N, 1, F) against (R, F) thresholds
            above = a >= hi_t[name]
            below = a <= lo_t[name]
            s = stats[name]
            s[0] += above.sum(0)
            s[1] += (above & is_pos).sum(0)
            s[2] += below.sum(0)
            s[3] += (below & is_pos).sum(0)
    n_pos = int(pos_mask.sum())
    curve = []
    for j in range(len(recalls)):
        out = []
        for name, s in stats.items():
            best = None
            signs = ((1, s[0], s[1], hi_t[name]), (-1, s[2], s[3], lo_t[name]))
            for sign, total, tp, thr in signs:
                precision = tp[j].double() / total[j].clamp(min=1).double()
                i = int(precision.argmax())
                cand = NeuronScore(
                    name, i, sign, float(thr[j, i]), float(precision[i]), int(tp[j, i]) / n_pos
                )
                if best is None or cand.precision > best.precision:
                    best = cand
            out.append(best)
        out.sort(key=lambda s: -s.precision)
        curve.append(out)
    return curve


def code_curve(scores: Sequence[CodeScore], recalls: Sequence[float]) -> list[CodeScore | None]:
    """For each recall r, the most precise code whose recall is at least r (None when no
    code reaches r): the codes' side of a precision-recall comparison with
    :func:`neuron_curve`. ``scores`` must hold every candidate code (``limit=None``)."""
    out: list[CodeScore | None] = []
    for r in recalls:
        best = None
        for s in scores:
            if s.recall >= r - 1e-12 and (
                best is None or (s.precision, s.recall) > (best.precision, best.recall)
            ):
                best = s
        out.append(best)
    return out


@dataclass
class CurvePoint:
    """Codes against neurons at one recall r."""

    recall: float
    sites: list[NeuronScore]  # the best neuron of each site at recall r, best first
    code: CodeScore | None  # the most precise code of recall >= r

    @property
    def neuron(self) -> NeuronScore:
        return self.sites[0]

    @property
    def lead(self) -> float | None:
        """The code's precision minus the best neuron's (None when no code reaches r)."""
        return None if self.code is None else self.code.precision - self.neuron.precision

    def to_dict(self) -> dict:
        return {
            "recall": self.recall,
            "neuron": self.neuron.to_dict(),
            "code": None if self.code is None else self.code.to_dict(),
            "lead": self.lead,
        }


def codes_vs_neurons(
    cache: CodeCache,
    positives: np.ndarray,
    codes: Sequence[CodeScore],
    recalls: Sequence[float],
    **neuron_options,
) -> list[CurvePoint]:
    """Paper Figure 3 along a recall grid: at each recall, the most precise of ``codes``
    (every candidate, ``limit=None``) of at least that recall against the best neuron
    at that recall (:func:`neuron_curve`, one streamed pass for all recalls;
    ``neuron_options`` go to it)."""
    curve = neuron_curve(cache, positives, recalls, **neuron_options)
    picks = code_curve(codes, recalls)
    return [
        CurvePoint(float(r), sites, code)
        for r, sites, code in zip(recalls, curve, picks, strict=True)
    ]


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
    (stored at build time; see :func:`codebook_lens.cache_build.code_logit_effects`)."""
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
