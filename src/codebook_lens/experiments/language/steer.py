"""Topic steering of the language experiment (paper Table 3 protocol).

For each topic: its codes are found over the code cache (from its words, or from its
passage as the paper did), the best few of every codebook are forced on at every
position at the configured strength, and continuations of the shared prompts are
sampled with and without them from the same seeds, as
:func:`codebook_lens.steering.sampling.steering_eval` does (the unsteered samples are
drawn once and shared by every topic). Reported per topic: the share of
samples on topic, steered and unsteered, and the fluency cost (the unsteered model's
mean loss per token on the steered samples minus that on the unsteered ones); the
primed share (:func:`primed_share`); and the topic rate per token on the unsteered
samples without and with the codes forced (:func:`topic_rates`).

``select: calibrated`` (:func:`calibrated_codes`) closes the loop of the measured
selection: the measured path predicts each prefix's effect on text the model wrote
without it, but steered text departs from that text, so a few prefixes are sampled
from held-out seeds (never those of the measurement) and the one with the largest
share on topic within the fluency budget, as measured on those samples, is kept.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from codebook_lens.analysis.search import SearchError, topic_codes
from codebook_lens.analysis.topics import (
    TopicTokens,
    effect_topic_codes,
    topic_tokens,
    word_topic_codes,
)
from codebook_lens.cache.store import CodeCache
from codebook_lens.core.loading import TextCodec, context_length
from codebook_lens.core.model import CodebookModel
from codebook_lens.core.refs import CodeRef
from codebook_lens.experiments.language.config import SteerSection
from codebook_lens.experiments.language.files import Topic
from codebook_lens.experiments.language.measures import (
    continuation_nll,
    fluency_cost,
    logits_fn,
    topic_share,
)
from codebook_lens.steering.intervene import Intervention
from codebook_lens.steering.sampling import generate
from codebook_lens.steering.topic_codes import (
    TopicCodes,
    forced_log_probs,
    forcing_of,
    measured_topic_codes,
    top_per_group,
)


def sample_texts(
    model: CodebookModel,
    codec: TextCodec,
    prompts: Sequence[str],
    cfg: SteerSection,
    codes: Sequence[CodeRef] = (),
    held_out: bool = False,
) -> list[list[str]]:
    """Samples of every prompt as the steering measurement draws them (``cfg``'s length,
    temperature, count and seed), with ``codes`` forced at ``cfg``'s mode and strength
    (none: unsteered); ``held_out``: the calibration's count and seeds instead of the
    measurement's."""
    intervention = None
    if codes:
        intervention = Intervention(list(codes), mode=cfg.mode, strength=cfg.strength)
    return generate(
        model,
        list(prompts),
        codec,
        samples=cfg.calibration_samples if held_out else cfg.samples_per_prompt,
        max_new_tokens=cfg.max_new_tokens,
        temperature=cfg.temperature,
        seed=cfg.seed + cfg.calibration_seed if held_out else cfg.seed,
        intervention=intervention,
    )


def sample_blocks(
    codec: TextCodec,
    prompts: Sequence[str],
    texts: Sequence[Sequence[str]],
    seq_len: int,
    max_blocks: int | None = None,
):
    """The prompts and their samples as one token stream (EOS between samples), cut into
    blocks of ``seq_len`` tokens: the model's own text, to measure forcing on. With
    ``max_blocks``, at most that many blocks, evenly spaced along the stream (so every
    prompt's samples stay represented)."""
    stream: list[int] = []
    for prompt, row in zip(prompts, texts, strict=True):
        for text in row:
            stream += codec.encode(prompt + text)[0]
            if codec.eos_id is not None:
                stream.append(codec.eos_id)
    count = len(stream) // seq_len
    if count == 0:
        return None
    blocks = torch.tensor(stream[: count * seq_len]).view(count, seq_len)
    if max_blocks is not None and count > max_blocks:
        blocks = blocks[torch.linspace(0, count - 1, max_blocks).round().long()]
    return blocks


def _word_codes(cache: CodeCache, topic: Topic, cfg: SteerSection) -> list[CodeRef] | None:
    """The codes a topic word most often follows within ``cfg.window`` tokens, best first;
    ``None`` when no cached token is followed by a topic word."""
    try:
        hits = word_topic_codes(
            cache,
            topic.words,
            window=cfg.window,
            min_count=cfg.min_count,
            max_frequency=cfg.max_frequency,
            limit=None,
        )
    except SearchError:
        return None
    return [h.ref for h in hits]


def measured_path(
    cache: CodeCache,
    topic: Topic,
    cfg: SteerSection,
    contexts,
    max_cost: float,
    objective: str | None = None,
    measured: dict | None = None,
    screened: dict | None = None,
) -> TopicCodes | None:
    """:func:`measured_topic_codes` with ``cfg``'s settings (its objective, unless
    ``objective`` is given) up to ``max_cost``; ``None`` when the topic has no candidate
    (no topic word occurs in the cache or is a token of its own, or no code qualifies).
    ``measured``, ``screened``: forcings already measured on ``contexts`` and on its
    screening blocks (see :func:`measured_topic_codes`)."""
    try:
        return measured_topic_codes(
            cache,
            topic.words,
            contexts=contexts,
            candidates_per_group=cfg.candidates_per_group,
            target_rate=cfg.target_rate,
            max_cost=max_cost,
            min_count=cfg.min_count,
            max_frequency=cfg.max_frequency,
            mode=cfg.mode,
            strength=cfg.strength,
            objective=objective or cfg.objective,
            measured=measured,
            search=cfg.search,
            screen_per_group=cfg.screen_per_group,
            max_per_group=cfg.max_per_group,
            screen_blocks=cfg.screen_blocks,
            screened=screened,
        )
    except SearchError:
        return None


def select_codes(cache: CodeCache, topic: Topic, cfg: SteerSection, contexts=None) -> list[CodeRef]:
    """The codes forced on for ``topic`` (see :class:`SteerSection`); none when no cached
    token is followed by a topic word (``select: words``). ``select: calibrated`` samples
    the model, so it is :func:`calibrated_codes`, not this."""
    if cfg.select == "calibrated":
        raise SearchError("select: calibrated samples the model: use calibrated_codes")
    if cfg.select == "measured":
        found = measured_path(cache, topic, cfg, contexts, cfg.max_cost)
        return [] if found is None else found.codes
    if cfg.select == "effect":
        try:
            effects = effect_topic_codes(
                cache,
                topic.words,
                batches=cfg.effect_batches,
                min_count=cfg.min_count,
                max_frequency=cfg.max_frequency,
                limit=None,
            )
        except SearchError:
            return []
        refs = [h.ref for h in effects if h.effect > 0]
        if cfg.effect_candidates is not None:  # among each group's most topic-bound codes
            near = _word_codes(cache, topic, cfg)
            if near is None:
                return []
            allowed = set(top_per_group(near, cfg.effect_candidates))
            refs = [r for r in refs if r in allowed]
        return top_per_group(refs, cfg.codes_per_codebook)
    if cfg.select == "words":
        words = _word_codes(cache, topic, cfg)
        if words is None:
            return []
        refs = words
    else:
        if not topic.text.strip():
            raise SearchError(f"topic {topic.name!r} has no text for select: text")
        refs = [
            h.ref
            for h in topic_codes(
                cache,
                topic.text,
                min_fraction=cfg.min_fraction,
                max_frequency=cfg.max_frequency,
                limit=None,
            )
        ]
    return top_per_group(refs, cfg.codes_per_codebook)


def path_points(costs: Sequence[float], points: int, limit: float) -> list[int]:
    """Indices of up to ``points`` prefixes of a path whose predicted costs are
    ``costs`` (prefix ``i`` ends at index ``i``): for each of ``points`` evenly spaced
    budgets up to ``limit``, the longest prefix whose cost and whose predecessors' costs
    are within it; ascending, without repeats, the whole path always included when it
    fits ``limit``."""
    chosen: list[int] = []
    for j in range(1, points + 1):
        budget = limit * j / points
        last = -1
        for i, cost in enumerate(costs):
            if cost > budget:
                break
            last = i
        if last >= 0 and last not in chosen:
            chosen.append(last)
    return chosen


def bisect_prefixes(
    costs: Sequence[float],
    points: int,
    max_cost: float,
    sample: Callable[[int], CalibrationPoint],
) -> list[CalibrationPoint]:
    """Up to ``points`` prefixes of a path sampled (``sample(i)``: the prefix ending at
    index ``i``) in search of the longest one whose measured cost is at most
    ``max_cost``. The first is the longest prefix predicted within it (``costs``, the
    path's predicted costs; the first prefix when none is); then each next prefix halves
    the stretch between the longest one measured within the budget (or none) and the
    shortest one measured over it (or the path's end). The predicted costs place the
    first sample; the measured ones steer the search, so a path whose prediction errs
    either way is still searched where its measured cost crosses the budget."""
    within, over = -1, len(costs)  # longest index measured within, shortest over
    guess = max((i for i, c in enumerate(costs) if c <= max_cost), default=0)
    tried: list[CalibrationPoint] = []
    while len(tried) < points and over - within > 1:
        i = guess if not tried else (within + over) // 2
        point = sample(i)
        tried.append(point)
        if point.cost <= max_cost:
            within = i
        else:
            over = i
    return tried


@dataclass
class CalibrationPoint:
    """One prefix of a topic's measured path, sampled from the held-out seeds."""

    codes: int  # length of the prefix
    predicted_cost: float  # the measured path's fluency cost per token (first order)
    predicted_rate: float  # ... and topic rate, on the unsteered text
    share: float  # share of the held-out steered samples on topic
    cost: float  # their fluency cost against the held-out unsteered samples
    objective: str = "log_prob"  # the objective of the path it is a prefix of

    def to_dict(self) -> dict:
        return self.__dict__.copy()


def calibrated_codes(
    model: CodebookModel,
    codec: TextCodec,
    cache: CodeCache,
    prompts: list[str],
    topic: Topic,
    cfg: SteerSection,
    held_out: Unsteered,
) -> tuple[list[CodeRef], list[CalibrationPoint], int | None]:
    """The codes forced for ``topic`` under ``select: calibrated``, and the prefixes
    tried. The measured path (:func:`measured_topic_codes` up to a predicted cost of
    ``cfg.explore_cost``, measured on the ``held_out`` samples; one path per objective
    with ``objective: both``) is sampled at up to ``cfg.calibration_points`` prefixes
    from the held-out seeds (``calibration_search``: ``spread`` evenly by predicted
    cost, :func:`path_points`; ``bisect``, a search for the longest prefix within the
    budget, :func:`bisect_prefixes`); the prefix with the largest share on topic among
    those of every path whose measured fluency cost is at most ``cfg.max_cost`` is kept
    (the cheaper one on a tie), with its index among the prefixes tried. None qualifies:
    no codes (and no index)."""
    seq_len = int(cache.manifest["seq_len"])
    contexts = sample_blocks(codec, prompts, held_out.texts, seq_len, cfg.measure_blocks)
    tried: list[tuple[CalibrationPoint, list[CodeRef]]] = []
    sampled: dict[tuple[CodeRef, ...], tuple[float, float]] = {}  # shared by the paths
    measured: dict = {}  # ... and so are the forcings measured on the contexts
    screened: dict = {}  # ... and on the screening blocks
    for objective in cfg.objectives():
        found = measured_path(
            cache, topic, cfg, contexts, cfg.explore_cost, objective, measured, screened
        )
        if found is not None:
            points = calibrate_path(
                model, codec, prompts, topic, cfg, held_out, found, objective, sampled
            )
            tried += [(p, found.codes[: p.codes]) for p in points]
    points = [p for p, _ in tried]
    within = [i for i, p in enumerate(points) if p.cost <= cfg.max_cost]
    if not within:
        return [], points, None
    best = max(within, key=lambda i: (points[i].share, -points[i].cost))
    return tried[best][1], points, best


def calibrate_path(
    model: CodebookModel,
    codec: TextCodec,
    prompts: list[str],
    topic: Topic,
    cfg: SteerSection,
    held_out: Unsteered,
    found: TopicCodes,
    objective: str,
    sampled: dict[tuple[CodeRef, ...], tuple[float, float]] | None = None,
) -> list[CalibrationPoint]:
    """The prefixes of one measured path sampled from the held-out seeds (see
    :func:`calibrated_codes`). ``sampled``: the share and cost of code sets already
    sampled (the samples depend on the codes and the seeds only), filled in here, so that
    a prefix that two paths share is sampled once."""
    sampled = {} if sampled is None else sampled

    def sample(i: int) -> CalibrationPoint:
        codes = tuple(found.codes[: i + 1])
        if codes not in sampled:
            texts = sample_texts(model, codec, prompts, cfg, codes, held_out=True)
            sampled[codes] = (
                topic_share([t for row in texts for t in row], topic.words),
                fluency_cost(_nll(model, codec, prompts, texts), held_out.nll),
            )
        share, cost = sampled[codes]
        return CalibrationPoint(
            codes=i + 1,
            predicted_cost=found.path[i].cost,
            predicted_rate=found.path[i].topic_rate,
            share=share,
            cost=cost,
            objective=objective,
        )

    costs = [f.cost for f in found.path]
    if cfg.calibration_search == "bisect":
        return bisect_prefixes(costs, cfg.calibration_points, cfg.max_cost, sample)
    return [sample(i) for i in path_points(costs, cfg.calibration_points, cfg.explore_cost)]


@dataclass
class TopicResult:
    name: str
    words: list[str]
    codes: list[str]
    baseline_share: float
    steered_share: float
    baseline_loss: float  # the unsteered model's mean loss per token on its own samples
    steered_loss: float  # ... on the steered samples
    fluency_cost: float
    samples: list[dict] = field(default_factory=list)  # per prompt: baseline and steered texts
    # unsteered share on topic when the topic's passage precedes every prompt (None: no
    # passage): how far the model itself carries a topic forward from its context
    primed_share: float | None = None
    # the mean probability that the next word is a topic word (analysis.topics.TopicTokens),
    # at every position of the unsteered samples, as the model is and with the topic's codes
    # forced (None when no topic word occurs in the cache or is a token of its own, or the
    # samples fill no block): what
    # forcing does at the first step, before the steered text departs from the unsteered
    topic_rate: float | None = None
    forced_topic_rate: float | None = None
    # the tokens a topic word starts with and their weights in the topic rate (as text)
    topic_tokens: dict[str, float] = field(default_factory=dict)
    # select: calibrated: the prefixes of the measured path sampled from held-out seeds,
    # and the index of the one kept among them (None: none was within the budget)
    calibration: list[dict] = field(default_factory=list)
    calibration_kept: int | None = None

    def to_dict(self) -> dict:
        return self.__dict__.copy()


def _nll(model: CodebookModel, codec: TextCodec, prompts, texts) -> tuple[float, int]:
    total, count = 0.0, 0
    run = logits_fn(model)
    for prompt, row in zip(prompts, texts, strict=True):
        ids, _ = codec.encode(prompt)
        if not ids:
            ids = [codec.bos_id if codec.bos_id is not None else codec.eos_id]
        nll, n = continuation_nll(run, ids, [codec.encode(t)[0] for t in row])
        total, count = total + nll, count + n
    return total, count


def topic_rates(
    model: CodebookModel,
    blocks: torch.Tensor | None,
    tokens: TopicTokens | None,
    codes: Sequence[CodeRef],
    cfg: SteerSection,
) -> tuple[float | None, float | None]:
    """The mean probability that the next word is a topic word (its first ``tokens``,
    weighted as :func:`~codebook_lens.analysis.topics.topic_tokens` weighs them) over
    every position of ``blocks``, without and with ``codes`` forced as ``cfg`` forces
    them; ``(None, None)`` without blocks or tokens."""
    if blocks is None or tokens is None:
        return None, None
    blocks = blocks.to(next(model.parameters()).device)
    plain = forced_log_probs(model, blocks, [], cfg.mode, cfg.strength)
    before = forcing_of(plain, plain, tokens).topic_rate
    if not codes:
        return before, before
    forced = forced_log_probs(model, blocks, codes, cfg.mode, cfg.strength)
    return before, forcing_of(forced, plain, tokens).topic_rate


@dataclass
class Unsteered:
    """The unsteered samples of the prompts (the same for every topic: same seeds) and
    the unsteered model's summed loss on them."""

    texts: list[list[str]]
    nll: tuple[float, int]


def sample_unsteered(
    model: CodebookModel,
    codec: TextCodec,
    prompts: list[str],
    cfg: SteerSection,
    held_out: bool = False,
) -> Unsteered:
    """Sample every prompt without intervention, as
    :func:`codebook_lens.steering.sampling.steering_eval` does; ``held_out``: from the
    calibration's seeds and counts instead of the measurement's."""
    texts = sample_texts(model, codec, prompts, cfg, held_out=held_out)
    return Unsteered(texts, _nll(model, codec, prompts, texts))


def primed_passage(
    model: CodebookModel, codec: TextCodec, passage: str, prompts: Sequence[str], new_tokens: int
) -> str:
    """``passage``, or its last words, as many as fit before every one of ``prompts`` (and
    a space) with ``new_tokens`` to sample after them in the model's positions; empty
    when no word fits."""
    limit = context_length(model)
    words = passage.split()
    while words and limit is not None:
        text = " ".join(words)
        if all(len(codec.encode(f"{text} {p}")[0]) + new_tokens <= limit for p in prompts):
            break
        words = words[1:]
    return " ".join(words)


def primed_share(
    model: CodebookModel, codec: TextCodec, prompts: list[str], topic: Topic, cfg: SteerSection
) -> float | None:
    """Share on topic of unsteered samples (same prompts, seeds and lengths as the steering
    measurement) when the topic's passage and a space precede every prompt (as much of
    the passage's end as the model's positions hold, :func:`primed_passage`); ``None``
    for a topic without a passage. Forcing codes can at most make the model write as if
    its context were about the topic, so a low primed share bounds what steering through
    the context can reach."""
    if not topic.text.strip():
        return None
    passage = primed_passage(model, codec, topic.text.strip(), prompts, cfg.max_new_tokens)
    primed = [f"{passage} {p}" if passage else p for p in prompts]
    texts = sample_texts(model, codec, primed, cfg)
    return topic_share([t for row in texts for t in row], topic.words)


def steer_topic(
    model: CodebookModel,
    codec: TextCodec,
    cache: CodeCache,
    prompts: list[str],
    topic: Topic,
    cfg: SteerSection,
    unsteered: Unsteered | None = None,
    held_out: Unsteered | None = None,
) -> TopicResult:
    """Steer one topic: select its codes, sample with them forced on from the seeds of
    the ``unsteered`` samples (drawn here when not given), measure both. A topic for
    which no code qualifies keeps its unsteered samples. ``held_out``: the unsteered
    samples of the calibration's seeds (``select: calibrated``; drawn here when not
    given)."""
    if unsteered is None:
        unsteered = sample_unsteered(model, codec, prompts, cfg)
    blocks = sample_blocks(codec, prompts, unsteered.texts, int(cache.manifest["seq_len"]))
    calibration: list[CalibrationPoint] = []
    kept = None
    if cfg.select == "calibrated":
        if held_out is None:
            held_out = sample_unsteered(model, codec, prompts, cfg, held_out=True)
        codes, calibration, kept = calibrated_codes(
            model, codec, cache, prompts, topic, cfg, held_out
        )
    else:
        # the measured selection reads the model's own samples, or else the cache's text
        contexts = None
        if cfg.select == "measured" and cfg.measure_on == "samples":
            seq_len = int(cache.manifest["seq_len"])
            contexts = sample_blocks(codec, prompts, unsteered.texts, seq_len, cfg.measure_blocks)
        codes = select_codes(cache, topic, cfg, contexts)
    try:
        tokens = topic_tokens(cache, topic.words)
    except SearchError:
        tokens = None
    rate, forced_rate = topic_rates(model, blocks, tokens, codes, cfg)
    steered_texts, steered = unsteered.texts, unsteered.nll
    if codes:
        steered_texts = sample_texts(model, codec, prompts, cfg, codes)
        steered = _nll(model, codec, prompts, steered_texts)
    baseline = unsteered.nll
    return TopicResult(
        name=topic.name,
        words=list(topic.words),
        codes=[str(c) for c in codes],
        baseline_share=topic_share([t for row in unsteered.texts for t in row], topic.words),
        steered_share=topic_share([t for row in steered_texts for t in row], topic.words),
        baseline_loss=baseline[0] / max(baseline[1], 1),
        steered_loss=steered[0] / max(steered[1], 1),
        fluency_cost=fluency_cost(steered, baseline),
        samples=[
            {"prompt": p, "baseline": b, "steered": s}
            for p, b, s in zip(prompts, unsteered.texts, steered_texts, strict=True)
        ],
        primed_share=primed_share(model, codec, prompts, topic, cfg),
        topic_rate=rate,
        forced_topic_rate=forced_rate,
        topic_tokens={} if tokens is None else tokens.to_dict(codec),
        calibration=[p.to_dict() for p in calibration],
        calibration_kept=kept,
    )


def steering_summary(results: Sequence[TopicResult], max_cost: float = 1.0) -> dict[str, float]:
    """Topics steered in the sense of the targets: steered share >= 0.6, unsteered
    <= 0.2 and fluency cost <= ``max_cost``; and the mean shares and cost."""
    n = max(len(results), 1)
    ok = [
        r
        for r in results
        if r.steered_share >= 0.6 and r.baseline_share <= 0.2 and r.fluency_cost <= max_cost
    ]
    return {
        "topics": len(results),
        "topics_steered": len(ok),
        "mean_baseline_share": sum(r.baseline_share for r in results) / n,
        "mean_steered_share": sum(r.steered_share for r in results) / n,
        "mean_fluency_cost": sum(r.fluency_cost for r in results) / n,
    }
