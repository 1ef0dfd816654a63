"""Codes to force on for a topic, chosen by what forcing them does.

:func:`codebook_lens.analysis.topics.effect_topic_codes` ranks codes by their
first-order effect on how much the model favours a topic's words. Forcing several
codes at once is not first order: codes of one group interfere, and every forced code
also disturbs the model's other predictions. :func:`measured_topic_codes` therefore
measures, on contexts of text (the model's own samples, or cached text), what forcing
does to the next-token distribution at every position:

- the *topic rate*: the mean probability that the next word is a topic word (each
  token a topic word can start with, weighted by how often it starts one in the cached
  text: :class:`~codebook_lens.analysis.topics.TopicTokens`);
- the *fluency cost*: the expected loss, under the unforced model, of a token drawn from
  the forced model, minus the unforced model's own entropy, i.e.
  ``sum_v p_forced(v) (-log p(v)) - sum_v p(v) (-log p(v))``, averaged over positions.
  Sampling from the forced model and scoring the samples with the unforced one (the
  fluency measure of the steering protocol) costs this much per token, to first order
  (the contexts themselves stay the unforced text).

It forces each candidate alone, then builds a path of code sets, measuring the set
forced together after each addition, until the topic rate reaches ``target_rate`` or no
addition stays within ``max_cost``: ``search="greedy"`` (:func:`greedy_path`) adds at
each step the candidate that gains the most per fluency cost given the codes already
chosen (codes that push the same words gain less together than apart, so the greedy path
spreads over the topic's words); ``search="ranked"`` (:func:`ranked_path`) adds the
candidates in the order of what each gains per cost alone. The gain is measured by the
``objective``: ``log_prob``, the mean log topic probability over the positions, or
``rate``, the log of the mean topic probability. They differ where a code acts: the mean
log rewards raising the topic from one in a million to one in a hundred thousand where
no topic word could follow as much as from 1% to 10% where one could, while a sample
mentions the topic where the probability is large (to first order a sample of ``n``
tokens is on topic with probability ``1 - exp(-n * rate)``), which is what ``rate``
scores. The set after each addition is kept (:attr:`TopicCodes.path`), so a caller
can choose a shorter prefix of the path by what it measures otherwise (e.g. on samples).

The candidates are each group's codes of largest first-order effect
(:func:`~codebook_lens.analysis.topics.effect_topic_codes`). That ranking ignores what a
code costs and errs far down the list, so a wider pool can be screened first
(:func:`screen`): each of many codes forced alone on a few contexts, the ones that gain
the most per fluency cost kept as the candidates.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from codebook_lens.analysis.search import SearchError
from codebook_lens.analysis.topics import TopicTokens, effect_topic_codes, topic_tokens
from codebook_lens.cache.store import CodeCache
from codebook_lens.core.model import CodebookModel
from codebook_lens.core.refs import CodeRef
from codebook_lens.steering.intervene import Intervention, apply_intervention


@dataclass
class Forcing:
    """What forcing a set of codes does on the measuring contexts."""

    topic_rate: float  # mean probability that the next word is a topic word
    topic_log_prob: float  # mean log of that probability
    cost: float  # expected fluency cost per token against the unforced model (nats)

    def score(self, objective: str) -> float:
        """What the greedy search raises (see the module docstring)."""
        if objective == "log_prob":
            return self.topic_log_prob
        return math.log(max(self.topic_rate, 1e-30))


OBJECTIVES = ("log_prob", "rate")
SEARCHES = ("greedy", "ranked")
MIN_COST = 1e-3  # the least fluency cost a ratio of gain to cost divides by

Measure = Callable[[Sequence[CodeRef]], Forcing]


def _ratio(trial: Forcing, current: Forcing, objective: str) -> float:
    """Gain of the objective per fluency cost of going from ``current`` to ``trial`` (a
    cost change below :data:`MIN_COST`, or negative, counts as :data:`MIN_COST`)."""
    gain = trial.score(objective) - current.score(objective)
    return gain / max(trial.cost - current.cost, MIN_COST)


class _Path:
    """The codes chosen so far, the :class:`Forcing` after each addition, and the
    acceptance rules both searches share."""

    def __init__(self, before: Forcing, objective: str, max_cost: float, room) -> None:
        self.codes: list[CodeRef] = []
        self.steps: list[Forcing] = []
        self.after = before
        self.objective, self.max_cost, self.room = objective, max_cost, room
        self.per_group: dict[tuple[str, int], int] = {}

    def full(self, ref: CodeRef) -> bool:
        return self.per_group.get((ref.codebook, ref.group), 0) >= self.room(ref)

    def raises(self, trial: Forcing) -> bool:
        """The set measured as ``trial`` stays within the cost and raises the objective."""
        return trial.cost <= self.max_cost and trial.score(self.objective) > self.after.score(
            self.objective
        )

    def add(self, ref: CodeRef, trial: Forcing) -> None:
        self.codes.append(ref)
        self.steps.append(trial)
        self.per_group[(ref.codebook, ref.group)] = (
            self.per_group.get((ref.codebook, ref.group), 0) + 1
        )
        self.after = trial


def ranked_path(
    ranked: Sequence[CodeRef],
    measure: Measure,
    before: Forcing,
    objective: str,
    target_rate: float,
    max_cost: float,
    room: Callable[[CodeRef], int],
) -> tuple[list[CodeRef], list[Forcing]]:
    """The codes of ``ranked`` (best first), each added in turn when the set with it
    raises the objective within ``max_cost`` and its (codebook, group) holds fewer than
    ``room(code)`` chosen codes, until the topic rate reaches ``target_rate``. Returns
    the chosen codes and the :class:`Forcing` of the set after each addition (measured
    by ``measure``; ``before``: the model as it is)."""
    path = _Path(before, objective, max_cost, room)
    for ref in ranked:
        if path.after.topic_rate >= target_rate:
            break
        if path.full(ref):
            continue
        trial = measure([*path.codes, ref])
        if path.raises(trial):
            path.add(ref, trial)
    return path.codes, path.steps


def greedy_path(
    candidates: Sequence[CodeRef],
    measure: Measure,
    before: Forcing,
    objective: str,
    target_rate: float,
    max_cost: float,
    room: Callable[[CodeRef], int],
) -> tuple[list[CodeRef], list[Forcing]]:
    """The greedy path over ``candidates`` (arguments and returns as
    :func:`ranked_path`): each step adds the candidate whose addition to the codes
    chosen so far gains the most of the objective per fluency cost it adds
    (:func:`_ratio`), as measured by ``measure`` on the set with it, until the topic rate
    reaches ``target_rate`` or no candidate raises the objective within ``max_cost``.

    Lazily evaluated: a candidate's ratio measured against an earlier set stands as its
    estimate; the candidate with the largest estimate is measured against the current
    set, and taken when its ratio stays at least every other estimate (else it goes back
    with its new ratio). Where a candidate's ratio only falls as the set grows, this is
    the greedy path that measures every candidate at every step, in far fewer passes. A
    candidate that no longer raises the objective, passes ``max_cost`` or finds its group
    full is dropped."""
    path = _Path(before, objective, max_cost, room)
    # (-ratio, order, code, codes chosen when it was measured, forcing of them + code)
    heap = []
    for order, ref in enumerate(candidates):
        trial = measure([ref])
        heap.append((-_ratio(trial, before, objective), order, ref, 0, trial))
    heapq.heapify(heap)
    while heap and path.after.topic_rate < target_rate:
        _, order, ref, step, trial = heapq.heappop(heap)
        if path.full(ref):
            continue
        if step < len(path.codes):  # an estimate against an earlier set: measure again
            trial = measure([*path.codes, ref])
            ratio = _ratio(trial, path.after, objective)
            heapq.heappush(heap, (-ratio, order, ref, len(path.codes), trial))
        elif path.raises(trial):
            path.add(ref, trial)
    return path.codes, path.steps


@torch.no_grad()
def forced_log_probs(
    model: CodebookModel,
    contexts: torch.Tensor,
    codes: Sequence[CodeRef],
    mode: str = "replace_last",
    strength: float = 1.0,
) -> torch.Tensor:
    """Next-token log-probabilities ``(B, T, V)`` at every position of ``contexts``
    (``(B, T)`` token ids) with ``codes`` forced at every position (none: the model as
    it is)."""
    if codes:
        with apply_intervention(model, Intervention(codes, mode=mode, strength=strength)):
            logits = model(contexts, use_cache=False).logits
    else:
        logits = model(contexts, use_cache=False).logits
    return logits.float().log_softmax(-1)


def forcing_of(logp: torch.Tensor, plain: torch.Tensor, tokens: TopicTokens) -> Forcing:
    """:class:`Forcing` of forced log-probabilities ``logp`` against the unforced
    ``plain`` ones (both ``(B, T, V)``), for the topic's weighted first ``tokens``."""
    topic = tokens.log_rate(logp)
    cross = -(logp.exp() * plain).sum(-1)  # loss under the unforced model, tokens ~ forced
    entropy = -(plain.exp() * plain).sum(-1)
    return Forcing(float(topic.exp().mean()), float(topic.mean()), float((cross - entropy).mean()))


def top_per_group(refs: Sequence[CodeRef], n: int) -> list[CodeRef]:
    """The first ``n`` of ``refs`` (in the order given) of every (codebook, group), in
    that order."""
    taken: dict[tuple[str, int], int] = {}
    kept: list[CodeRef] = []
    for ref in refs:
        key = (ref.codebook, ref.group)
        if taken.get(key, 0) < n:
            taken[key] = taken.get(key, 0) + 1
            kept.append(ref)
    return kept


def screen(
    model: CodebookModel,
    contexts: torch.Tensor,
    refs: Sequence[CodeRef],
    tokens: TopicTokens,
    per_group: int,
    mode: str = "replace_last",
    strength: float = 1.0,
    objective: str = "log_prob",
    measured: dict[CodeRef, Forcing] | None = None,
) -> list[CodeRef]:
    """Of ``refs``, the ``per_group`` codes of every (codebook, group) whose forcing alone
    on ``contexts`` gains the most of the objective per fluency cost (:func:`_ratio`),
    best first (ties: in the order given); codes that do not raise the objective there
    are dropped. ``measured``: each code's forcing alone on the same contexts, for the
    same topic, mode and strength, as far as known (filled in here)."""
    memo = {} if measured is None else measured
    plain = forced_log_probs(model, contexts, [], mode, strength)
    before = forcing_of(plain, plain, tokens)

    def alone(ref: CodeRef) -> Forcing:
        if ref not in memo:
            logp = forced_log_probs(model, contexts, [ref], mode, strength)
            memo[ref] = forcing_of(logp, plain, tokens)
        return memo[ref]

    ranked = by_ratio_alone(refs, alone, before, objective)
    return top_per_group([ref for ref, _ in ranked], per_group)


def by_ratio_alone(
    refs: Sequence[CodeRef], alone: Callable[[CodeRef], Forcing], before: Forcing, objective: str
) -> list[tuple[CodeRef, Forcing]]:
    """The codes of ``refs`` whose forcing alone (``alone(ref)``) raises the objective
    over ``before`` (the model as it is), with that forcing, by gain per fluency cost
    (:func:`_ratio`), best first; ties in the order given."""
    raising = [
        (ref, f) for ref in refs if (f := alone(ref)).score(objective) > before.score(objective)
    ]
    return sorted(raising, key=lambda rf: -_ratio(rf[1], before, objective))


@dataclass
class TopicCodes:
    """The chosen codes and how they were chosen."""

    codes: list[CodeRef]
    before: Forcing  # the model as it is
    after: Forcing  # with the codes forced together
    candidates: list[dict] = field(default_factory=list)  # each candidate alone
    # path[i]: the codes codes[: i + 1] forced together (the greedy path, in order)
    path: list[Forcing] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "codes": [str(c) for c in self.codes],
            "before": self.before.__dict__,
            "after": self.after.__dict__,
            "candidates": self.candidates,
            "path": [f.__dict__ for f in self.path],
        }


def measured_topic_codes(
    cache: CodeCache,
    words: Sequence[str],
    *,
    contexts: torch.Tensor | None = None,
    blocks: int = 8,
    candidates_per_group: int = 8,
    max_per_group: int | None = None,
    target_rate: float = 0.03,
    max_cost: float = 0.5,
    min_count: int = 20,
    max_frequency: float = 0.05,
    mode: str = "replace_last",
    strength: float = 1.0,
    objective: str = "log_prob",
    measured: dict[tuple[CodeRef, ...], Forcing] | None = None,
    search: str = "greedy",
    screen_per_group: int | None = None,
    screen_blocks: int = 2,
    screened: dict[CodeRef, Forcing] | None = None,
) -> TopicCodes:
    """The codes to force for the topic of ``words`` (see the module docstring).

    Candidates: the ``candidates_per_group`` codes of every (codebook, head) with the
    largest positive first-order effect (:func:`effect_topic_codes`, on the cache's
    first blocks). Measured on ``contexts`` (``(B, T)`` token ids, e.g. the model's own
    samples), or else on the cache's last ``blocks`` blocks. At most ``max_per_group``
    codes per (codebook, head) are chosen (by default k, the codebook's own number of
    slots, as ``replace_last`` allows). ``measured``: the forcings of code sets already
    measured on the same contexts, for the same words, mode and strength (e.g. by a
    search with the other objective), filled in here; a set in it is not measured again.

    ``screen_per_group``: a wider pool first. The first-order effect ranks codes only
    roughly (it ignores what a code costs), so the ``screen_per_group`` codes of every
    group with the largest effect are each forced alone on ``screen_blocks`` of the
    contexts (evenly spaced among them), and the ``candidates_per_group`` of them that
    gain the most of the objective per fluency cost there (:func:`screen`) go on as the
    candidates. ``screened``: forcings already measured there (as ``measured``).
    """
    if not 0.0 < target_rate < 1.0:
        raise SearchError(f"target_rate must be in (0, 1), got {target_rate}")
    if not max_cost > 0:
        raise SearchError(f"max_cost must be > 0, got {max_cost}")
    if objective not in OBJECTIVES:
        raise SearchError(f"objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
    if search not in SEARCHES:
        raise SearchError(f"search must be one of {', '.join(SEARCHES)}, got {search!r}")
    if screen_per_group is not None and screen_per_group < candidates_per_group:
        raise SearchError(
            f"screen_per_group ({screen_per_group}) must be at least candidates_per_group "
            f"({candidates_per_group})"
        )
    if not isinstance(screen_blocks, int) or screen_blocks < 1:
        raise SearchError(f"screen_blocks must be a positive integer, got {screen_blocks!r}")
    loaded = cache.model()
    model = loaded.model
    tokens = topic_tokens(cache, words)
    if contexts is None:
        seq_len = int(cache.manifest["seq_len"])
        cached = np.asarray(cache.token_ids, dtype=np.int64)
        rows = min(blocks, cached.size // seq_len)
        if rows < 1:
            raise SearchError(f"the cache holds fewer than {seq_len} tokens")
        contexts = torch.from_numpy(cached[cached.size - rows * seq_len :].copy())
        contexts = contexts.view(rows, seq_len)
    if contexts.dim() != 2 or contexts.shape[1] < 2:
        raise SearchError("contexts must be a (B, T) tensor of token ids with T >= 2")
    contexts = contexts.to(next(model.parameters()).device)

    hits = [
        h
        for h in effect_topic_codes(
            cache,
            words,
            min_count=min_count,
            max_frequency=max_frequency,
            limit=None,
            tokens=tokens,
        )
        if h.effect > 0
    ]
    candidates = top_per_group([h.ref for h in hits], screen_per_group or candidates_per_group)
    if screen_per_group is not None:
        rows = torch.linspace(0, contexts.shape[0] - 1, min(screen_blocks, contexts.shape[0]))
        candidates = screen(
            model,
            contexts[rows.round().long()],
            candidates,
            tokens,
            candidates_per_group,
            mode,
            strength,
            objective,
            screened,
        )

    plain = forced_log_probs(model, contexts, [], mode, strength)
    before = forcing_of(plain, plain, tokens)

    memo = {} if measured is None else measured

    def measure(codes: Sequence[CodeRef]) -> Forcing:
        key = tuple(sorted(codes))  # forcing a set: the order does not matter
        if key not in memo:
            logp = forced_log_probs(model, contexts, codes, mode, strength)
            memo[key] = forcing_of(logp, plain, tokens)
        return memo[key]

    scored = [
        {"code": ref, "gain": f.score(objective) - before.score(objective), "cost": f.cost}
        for ref, f in by_ratio_alone(candidates, lambda r: measure([r]), before, objective)
    ]

    def room(ref: CodeRef) -> int:
        return max_per_group if max_per_group is not None else model.codebooks[ref.codebook].k

    path_of = greedy_path if search == "greedy" else ranked_path
    chosen, path = path_of(
        [c["code"] for c in scored], measure, before, objective, target_rate, max_cost, room
    )
    after = path[-1] if path else before
    return TopicCodes(
        chosen,
        before,
        after,
        [{"code": str(c["code"]), "gain": c["gain"], "cost": c["cost"]} for c in scored],
        path,
    )
