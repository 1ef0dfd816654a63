"""Codes to force on for a topic, chosen by what forcing them does.

:func:`codebook_lens.analysis.topics.effect_topic_codes` ranks codes by their
first-order effect on how much the model favours a topic's words. Forcing several
codes at once is not first order: codes of one group interfere, and every forced code
also disturbs the model's other predictions. :func:`measured_topic_codes` therefore
measures: on blocks of cached text it forces each candidate alone and records its
*gain* (the rise in the mean log-probability that the next token starts a topic word)
and its *damage* (the rise in the model's loss on the text's actual next tokens), then
adds candidates in order of gain per damage, measuring the set forced together after
each addition, until the topic's mean log-probability reaches ``log(target_rate)`` or
the damage would pass ``max_damage``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from codebook_lens.analysis.search import SearchError
from codebook_lens.analysis.topics import effect_topic_codes, topic_token_ids
from codebook_lens.cache.store import CodeCache
from codebook_lens.core.model import CodebookModel
from codebook_lens.core.refs import CodeRef
from codebook_lens.steering.intervene import Intervention, apply_intervention


@dataclass
class Forcing:
    """What forcing a set of codes does on the measuring blocks."""

    topic_log_prob: float  # mean log-probability that the next token starts a topic word
    loss: float  # mean loss on the text's actual next tokens


@torch.no_grad()
def measure_forcing(
    model: CodebookModel,
    blocks: torch.Tensor,
    ids: Sequence[int],
    codes: Sequence[CodeRef],
    mode: str = "replace_last",
    strength: float = 1.0,
) -> Forcing:
    """:class:`Forcing` of ``codes`` forced at every position of ``blocks`` (``(B, T)``
    token ids); no codes: the model as it is."""
    if codes:
        with apply_intervention(model, Intervention(codes, mode=mode, strength=strength)):
            logits = model(blocks, use_cache=False).logits
    else:
        logits = model(blocks, use_cache=False).logits
    logp = logits.float().log_softmax(-1)
    topic = logp[..., list(ids)].logsumexp(-1).mean()
    loss = -logp[:, :-1].gather(-1, blocks[:, 1:].unsqueeze(-1)).mean()
    return Forcing(float(topic), float(loss))


@dataclass
class TopicCodes:
    """The chosen codes and how they were chosen."""

    codes: list[CodeRef]
    before: Forcing  # the model as it is
    after: Forcing  # with the codes forced together
    candidates: list[dict] = field(default_factory=list)  # each candidate alone

    def to_dict(self) -> dict:
        return {
            "codes": [str(c) for c in self.codes],
            "before": self.before.__dict__,
            "after": self.after.__dict__,
            "candidates": self.candidates,
        }


def measured_topic_codes(
    cache: CodeCache,
    words: Sequence[str],
    *,
    candidates_per_group: int = 8,
    max_per_group: int | None = None,
    target_rate: float = 0.03,
    max_damage: float = 0.75,
    blocks: int = 8,
    min_count: int = 20,
    max_frequency: float = 0.05,
    mode: str = "replace_last",
    strength: float = 1.0,
) -> TopicCodes:
    """The codes to force for the topic of ``words`` (see the module docstring).

    Candidates: the ``candidates_per_group`` codes of every (codebook, head) with the
    largest positive first-order effect (:func:`effect_topic_codes`, measured on the
    cache's first blocks). Gain and damage are measured on the cache's last ``blocks``
    blocks. At most ``max_per_group`` codes per (codebook, head) are chosen (by default
    k, the codebook's own number of slots, as ``replace_last`` allows).
    """
    if not 0.0 < target_rate < 1.0:
        raise SearchError(f"target_rate must be in (0, 1), got {target_rate}")
    if not max_damage > 0:
        raise SearchError(f"max_damage must be > 0, got {max_damage}")
    loaded = cache.model()
    model = loaded.model
    ids = topic_token_ids(loaded.codec, words)
    seq_len = int(cache.manifest["seq_len"])
    tokens = np.asarray(cache.token_ids, dtype=np.int64)
    rows = min(blocks, tokens.size // seq_len)
    if rows < 1:
        raise SearchError(f"the cache holds fewer than {seq_len} tokens")
    held = torch.from_numpy(tokens[tokens.size - rows * seq_len :].copy()).view(rows, seq_len)
    held = held.to(next(model.parameters()).device)

    hits = [
        h
        for h in effect_topic_codes(
            cache, words, min_count=min_count, max_frequency=max_frequency, limit=None
        )
        if h.effect > 0
    ]
    taken: dict[tuple[str, int], int] = {}
    candidates: list[CodeRef] = []
    for h in hits:
        key = (h.ref.codebook, h.ref.group)
        if taken.get(key, 0) < candidates_per_group:
            taken[key] = taken.get(key, 0) + 1
            candidates.append(h.ref)

    before = measure_forcing(model, held, ids, [], mode, strength)
    scored = []
    for ref in candidates:
        alone = measure_forcing(model, held, ids, [ref], mode, strength)
        gain = alone.topic_log_prob - before.topic_log_prob
        damage = alone.loss - before.loss
        if gain > 0:
            scored.append({"code": ref, "gain": gain, "damage": damage})
    scored.sort(key=lambda c: -c["gain"] / max(c["damage"], 1e-3))

    goal = math.log(target_rate)
    chosen: list[CodeRef] = []
    per_group: dict[tuple[str, int], int] = {}
    after = before
    for cand in scored:
        if after.topic_log_prob >= goal:
            break
        ref = cand["code"]
        key = (ref.codebook, ref.group)
        limit = max_per_group if max_per_group is not None else model.codebooks[ref.codebook].k
        if per_group.get(key, 0) >= limit:
            continue
        trial = measure_forcing(model, held, ids, [*chosen, ref], mode, strength)
        if trial.loss - before.loss > max_damage or trial.topic_log_prob <= after.topic_log_prob:
            continue
        chosen.append(ref)
        per_group[key] = per_group.get(key, 0) + 1
        after = trial
    return TopicCodes(
        chosen,
        before,
        after,
        [{"code": str(c["code"]), "gain": c["gain"], "damage": c["damage"]} for c in scored],
    )
