"""The natural-language measurements of a codebook model against its base.

Each measurement is a small function over tensors or plain numbers (tested against
hand-computed values) plus, where a model is involved, the loop that feeds it:

- LM quality: held-out loss and next-token accuracy (:func:`lm_metrics`), the KL
  divergence from the base's next-token distribution to the codebook model's, and the
  share of the loss gap that the codebooks recover against mean ablation
  (:func:`gap_recovered`; the ablation itself is :func:`mean_ablation`);
- code frequency by rank and its power-law fit (:func:`power_law_fit`, paper Figure 4);
- codes against neurons (paper Figure 3): the code a regex is scored by
  (:func:`regex_code`) and the summary over regexes (:func:`lead_summary`);
- topic steering (paper Table 3): the share of samples on topic (:func:`topic_share`)
  and the fluency cost (:func:`continuation_nll`, :func:`fluency_cost`).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from codebook_lens.analysis.neurons import NeuronScore
from codebook_lens.analysis.search import CodeScore
from codebook_lens.core import sites as S
from codebook_lens.core.errors import CodebookLensError
from codebook_lens.core.model import CodebookModel
from codebook_lens.steering.sampling import mentions_topic, topic_pattern

# ----------------------------------------------------------------------------------------
# LM quality


@dataclass
class TokenStats:
    """Sums over predicted positions: negative log-likelihood, correct argmax
    predictions, KL(teacher || model) (0 without a teacher), and the position count."""

    nll: float = 0.0
    correct: float = 0.0
    kl: float = 0.0
    count: int = 0

    def add(self, other: TokenStats) -> None:
        self.nll += other.nll
        self.correct += other.correct
        self.kl += other.kl
        self.count += other.count

    def means(self) -> dict[str, float]:
        n = max(self.count, 1)
        return {"loss": self.nll / n, "accuracy": self.correct / n, "kl": self.kl / n}


def token_stats(
    logits: torch.Tensor, ids: torch.Tensor, teacher: torch.Tensor | None = None
) -> TokenStats:
    """Next-token statistics of ``logits`` (``(B, T, V)``) for token ids ``(B, T)``: every
    position but the last predicts the next id. With ``teacher`` logits (same shape),
    also the summed ``KL(softmax(teacher) || softmax(logits))``."""
    pred = logits[:, :-1].float().log_softmax(-1)
    target = ids[:, 1:]
    nll = -pred.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    correct = (pred.argmax(-1) == target).float()
    kl = 0.0
    if teacher is not None:
        t = teacher[:, :-1].float().log_softmax(-1)
        kl = float((t.exp() * (t - pred)).sum())
    return TokenStats(float(nll.sum()), float(correct.sum()), kl, int(target.numel()))


Logits = Callable[[torch.Tensor], torch.Tensor]


@torch.no_grad()
def lm_metrics(
    logits_of: Logits, batches: Sequence[torch.Tensor], teacher_of: Logits | None = None
) -> dict[str, float]:
    """Held-out ``loss`` (nats per token), next-token ``accuracy`` and, with a teacher,
    ``kl`` (nats per token, from the teacher's distribution to the model's) over
    ``batches`` of token ids; ``logits_of(ids)`` runs the model."""
    total = TokenStats()
    for ids in batches:
        teacher = teacher_of(ids) if teacher_of is not None else None
        total.add(token_stats(logits_of(ids), ids, teacher))
    out = total.means()
    if teacher_of is None:
        del out["kl"]
    return out


def logits_fn(model: torch.nn.Module) -> Logits:
    """``ids -> logits`` of a transformers causal LM or a CodebookModel."""

    def run(ids: torch.Tensor) -> torch.Tensor:
        return model(input_ids=ids, use_cache=False).logits

    return run


def gap_recovered(base_loss: float, model_loss: float, ablated_loss: float) -> float:
    """Share of the loss gap between the ablated and the base model that the model
    closes: ``(ablated - model) / (ablated - base)``; 1 when the model is as good as the
    base, 0 when it is as bad as the ablation (it may leave [0, 1] either side)."""
    gap = ablated_loss - base_loss
    if not gap > 0:
        raise CodebookLensError(
            f"the ablated loss ({ablated_loss:.4f}) must exceed the base loss "
            f"({base_loss:.4f}) for a gap to be recovered"
        )
    return (ablated_loss - model_loss) / gap


@torch.no_grad()
def site_means(
    base: torch.nn.Module, placement: dict[str, tuple[str, int]], batches: Sequence[torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Mean activation of each ``key -> (site, layer)`` of ``base`` over ``batches``
    (every token position), as a vector of the site's full width."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = dict.fromkeys(placement, 0)
    handles = []
    for key, (site, layer) in placement.items():

        def grab(x: torch.Tensor, key: str = key) -> None:
            flat = x.detach().reshape(-1, x.shape[-1]).double()
            sums[key] = sums.get(key, 0) + flat.sum(0)
            counts[key] += flat.shape[0]

        handles.append(S.attach(base, site, layer, grab))
    try:
        for ids in batches:
            base(input_ids=ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return {k: (sums[k] / counts[k]).float() for k in placement}


@contextlib.contextmanager
def mean_ablation(
    base: torch.nn.Module,
    placement: dict[str, tuple[str, int]],
    means: dict[str, torch.Tensor],
) -> Iterator[None]:
    """Within the block, every site of ``placement`` outputs its mean activation
    (``means``, from :func:`site_means`) at every position instead of what it computes."""
    handles = []
    for key, (site, layer) in placement.items():
        mean = means[key]

        def replace(x: torch.Tensor, mean: torch.Tensor = mean) -> torch.Tensor:
            return mean.to(x.dtype).expand_as(x).clone()

        handles.append(S.attach(base, site, layer, replace))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def base_network(model: CodebookModel | torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside a CodebookModel (or the model itself)."""
    return model.model if isinstance(model, CodebookModel) else model


# ----------------------------------------------------------------------------------------
# code frequencies


@dataclass
class PowerLaw:
    """``count ~ scale * rank ** -exponent``, fitted by least squares on log-log axes over
    the codes that fire (rank 1 = the most frequent); ``r2`` of that fit."""

    exponent: float
    scale: float
    r2: float
    codes: int  # codes in the fit (those that fire)

    def to_dict(self) -> dict:
        return self.__dict__.copy()


def power_law_fit(counts: Sequence[float] | np.ndarray) -> PowerLaw:
    """Fit a power law to activation counts by rank (paper Figure 4); zeros are left out."""
    c = np.sort(np.asarray(counts, dtype=np.float64).reshape(-1))[::-1]
    c = c[c > 0]
    if c.size < 2:
        raise CodebookLensError(f"a power-law fit needs at least 2 codes that fire, got {c.size}")
    x = np.log(np.arange(1, c.size + 1, dtype=np.float64))
    y = np.log(c)
    slope, intercept = np.polyfit(x, y, 1)
    resid = y - (slope * x + intercept)
    total = ((y - y.mean()) ** 2).sum()
    r2 = 1.0 - float((resid**2).sum() / total) if total > 0 else 1.0
    return PowerLaw(float(-slope), float(math.exp(intercept)), r2, int(c.size))


# ----------------------------------------------------------------------------------------
# codes against neurons


def regex_code(scores: Sequence[CodeScore], min_count: int, min_recall: float) -> CodeScore | None:
    """The code a regex is scored by: the most precise code that fires at least
    ``min_count`` times and catches at least ``min_recall`` of the matching tokens (ties:
    the higher recall, then the lower code reference); None when no code qualifies."""
    if min_count < 1 or not 0.0 <= min_recall <= 1.0:
        raise CodebookLensError(
            f"min_count must be >= 1 and min_recall in [0, 1], got {min_count}, {min_recall}"
        )
    eligible = [s for s in scores if s.count >= min_count and s.recall >= min_recall - 1e-12]
    if not eligible:
        return None
    return min(eligible, key=lambda s: (-s.precision, -s.recall, str(s.ref)))


@dataclass
class RegexComparison:
    """One regex: its code against the best neuron at the code's recall."""

    name: str
    pattern: str
    matches: int
    code: CodeScore | None
    neuron: NeuronScore | None

    @property
    def lead(self) -> float | None:
        """Code precision minus neuron precision (None without a code)."""
        if self.code is None or self.neuron is None:
            return None
        return self.code.precision - self.neuron.precision

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "pattern": self.pattern,
            "matching_tokens": self.matches,
            "code": None if self.code is None else self.code.to_dict(),
            "neuron": None if self.neuron is None else self.neuron.to_dict(),
            "lead": self.lead,
        }


def lead_summary(rows: Sequence[RegexComparison]) -> dict[str, float]:
    """Over regexes: the share where the code is more precise than the best neuron at its
    recall (a regex without a qualifying code counts as lost) and the median lead in
    points (such a regex counts as a lead of -100)."""
    if not rows:
        raise CodebookLensError("no regexes to summarise")
    leads = [-1.0 if r.lead is None else r.lead for r in rows]
    return {
        "regexes": len(rows),
        "codes_win_share": sum(lead > 0 for lead in leads) / len(leads),
        "median_lead_points": 100.0 * float(np.median(leads)),
        "mean_code_precision": float(
            np.mean([0.0 if r.code is None else r.code.precision for r in rows])
        ),
        "mean_neuron_precision": float(
            np.mean([r.neuron.precision for r in rows if r.neuron is not None] or [0.0])
        ),
    }


# ----------------------------------------------------------------------------------------
# topic steering


def topic_share(texts: Sequence[str], words: Sequence[str]) -> float:
    """Share of ``texts`` that hold one of ``words`` as a whole word, ignoring case."""
    if not texts:
        raise CodebookLensError("no texts to count")
    pattern = topic_pattern(words)
    return sum(mentions_topic(t, pattern) for t in texts) / len(texts)


def first_on_topic(samples: Sequence[dict], words: Sequence[str]) -> tuple[str, str, str] | None:
    """``(prompt, unsteered, steered)`` of the first pair of samples drawn from one seed,
    prompts and seeds in the order sampled (``samples``: per prompt, ``{"prompt",
    "baseline", "steered"}`` as the run's analysis.json holds them), whose steered sample
    mentions the topic; ``None`` when no steered sample does."""
    pattern = topic_pattern(words)
    for row in samples:
        for plain, steered in zip(row["baseline"], row["steered"], strict=True):
            if mentions_topic(steered, pattern):
                return row["prompt"], plain, steered
    return None


def excerpt(text: str, words: Sequence[str], width: int = 100) -> str:
    """``text`` on one line (each run of whitespace one space), cut to at most ``width``
    characters at word boundaries around its first topic word (from a third of
    ``width`` before it; from the start when it holds none), with `` ...`` where it was
    cut and every topic word in brackets."""
    if width < 10:
        raise CodebookLensError(f"width must be at least 10, got {width}")
    pattern = topic_pattern(words)
    line = " ".join(text.split())
    found = pattern.search(line)
    start = 0 if found is None else max(0, found.start() - width // 3)
    if start > 0 and line[start - 1] != " ":
        start = line.find(" ", start) + 1  # the next word: never half of one
    end = start + width
    if end < len(line) and line[end] != " ":
        end = line.rfind(" ", start, end)
        end = start + width if end <= start else end
    piece = pattern.sub(lambda m: f"[{m.group(0)}]", line[start:end].strip())
    return ("... " if start > 0 else "") + piece + (" ..." if end < len(line) else "")


def needed_topic_rate(tokens: int, share: float = 0.6) -> float:
    """The probability per token of starting a topic word at which a sample of ``tokens``
    tokens would mention the topic with probability ``share``, were its tokens drawn
    independently: ``1 - (1 - share) ** (1 / tokens)``. A yardstick for a topic rate,
    not a prediction (topic words cluster)."""
    if tokens < 1 or not 0.0 <= share < 1.0:
        raise CodebookLensError(f"need tokens >= 1 and share in [0, 1), got {tokens}, {share}")
    return 1.0 - (1.0 - share) ** (1.0 / tokens)


@torch.no_grad()
def continuation_nll(
    logits_of: Logits, prompt: Sequence[int], continuations: Sequence[Sequence[int]]
) -> tuple[float, int]:
    """Summed negative log-likelihood of each continuation's tokens given ``prompt``
    (token ids) under the model, and the number of tokens scored. Continuations of
    different lengths are scored in groups of equal length (no padding)."""
    if not prompt:
        raise CodebookLensError("the prompt must hold at least one token")
    total, count = 0.0, 0
    by_len: dict[int, list[Sequence[int]]] = {}
    for c in continuations:
        if c:
            by_len.setdefault(len(c), []).append(c)
    for length, group in by_len.items():
        ids = torch.tensor([list(prompt) + list(c) for c in group])
        logp = logits_of(ids)[:, len(prompt) - 1 : -1].float().log_softmax(-1)
        target = ids[:, len(prompt) :]
        total -= float(logp.gather(-1, target.unsqueeze(-1)).sum())
        count += length * len(group)
    return total, count


def fluency_cost(steered: tuple[float, int], baseline: tuple[float, int]) -> float:
    """Mean per-token loss of the steered samples minus that of the baseline samples, both
    under the unsteered model (``(summed nll, tokens)`` pairs): what forcing the codes
    costs in fluency, in nats per token."""
    (s_nll, s_n), (b_nll, b_n) = steered, baseline
    if s_n < 1 or b_n < 1:
        raise CodebookLensError("fluency needs at least one steered and one baseline token")
    return s_nll / s_n - b_nll / b_n
