"""Sampling text under an intervention, and topic steering evaluation.

:func:`generate` samples text continuations (optionally under an
:class:`~codebook_lens.steering.intervene.Intervention`) of many prompts in one batch
(left padded, up to :data:`MAX_ROWS` samples; the intervention counts positions from each
prompt's first token), seeded per batch so that results repeat and a steered run draws
the same random numbers as its baseline. Steering
(:func:`steering_eval`) follows the protocol of Tamkin et al. (2023, Table 3): sample
continuations of several prompts with and without the topic codes forced on (by
default at every position, the prompt's included) and count the continuations that
mention the topic (any topic word as a whole word, ignoring case).
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from codebook_lens.core.errors import CodebookLensError
from codebook_lens.core.files import check_output_file
from codebook_lens.core.loading import HFCodec, Loaded, TextCodec, check_positions
from codebook_lens.core.model import CodebookModel
from codebook_lens.core.refs import CodeRef
from codebook_lens.steering.intervene import Intervention, Positions, apply_intervention

# ----------------------------------------------------------------------------------------
# sampling


def _resolve(
    model: CodebookModel | Loaded, codec: TextCodec | Any | None
) -> tuple[CodebookModel, TextCodec]:
    if isinstance(model, Loaded):
        return model.model, model.codec if codec is None else _as_codec(codec)
    if codec is None:
        raise CodebookLensError(
            "generating text needs a codec or tokenizer besides a CodebookModel"
        )
    return model, _as_codec(codec)


def _as_codec(codec: TextCodec | Any) -> TextCodec:
    return codec if isinstance(codec, TextCodec) else HFCodec(codec)


# samples drawn in one batch at most: a step of 100 rows cost 4 times one of 10 rows, so
# a batch of every prompt's samples takes a fraction of the time prompt by prompt takes
MAX_ROWS = 256


def _batch_seed(seed: int, index: int) -> int:
    """The sampling seed of the ``index``-th batch (the same with or without intervention)."""
    return (seed * 1_000_003 + index) % (1 << 63)


@dataclass
class Sampling:
    """How continuations are sampled. ``temperature`` 0 is greedy decoding; ``top_k`` 0 and
    ``top_p`` 1 leave the distribution untruncated."""

    max_new_tokens: int = 32
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise CodebookLensError(
                f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}"
            )
        if not self.temperature >= 0:
            raise CodebookLensError(f"temperature must be >= 0, got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            raise CodebookLensError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise CodebookLensError(f"top_k must be a non-negative integer, got {self.top_k!r}")


def _prompt_ids(codec: TextCodec, prompt: str) -> list[int]:
    """The prompt's token ids; an empty prompt starts from BOS (or EOS)."""
    ids, _ = codec.encode(prompt)
    if not ids:
        start = codec.bos_id if codec.bos_id is not None else codec.eos_id
        if start is None:
            raise CodebookLensError("the prompt is empty and the tokenizer has no BOS or EOS token")
        ids = [start]
    return ids


def check_lengths(
    model: CodebookModel, codec: TextCodec, prompts: Sequence[str], max_new_tokens: int
) -> None:
    """Raise a CodebookLensError before any sampling when a prompt plus ``max_new_tokens``
    does not fit the model's positions."""
    for prompt in prompts:
        n = len(_prompt_ids(codec, prompt))
        check_positions(
            model, n + max_new_tokens, f"a prompt of {n} tokens plus {max_new_tokens} new tokens"
        )


def _sample(
    model: CodebookModel,
    codec: TextCodec,
    prompts: Sequence[str],
    samples: int,
    sampling: Sampling,
    seed: int,
) -> list[list[str]]:
    """``samples`` continuations of each of ``prompts``, sampled in one batch with
    ``seed``: every prompt's ids left padded to the longest, with an attention mask, so
    each row is sampled as it would be alone (to rounding)."""
    ids = [_prompt_ids(codec, prompt) for prompt in prompts]
    width = max(len(row) for row in ids)
    eos = codec.eos_id
    pad = eos if eos is not None else 0
    device = next(model.parameters()).device
    rows = [[pad] * (width - len(row)) + row for row in ids for _ in range(samples)]
    masks = [[0] * (width - len(row)) + [1] * len(row) for row in ids for _ in range(samples)]
    inputs = torch.tensor(rows, device=device)
    options: dict[str, Any] = {"max_new_tokens": sampling.max_new_tokens}
    if sampling.temperature > 0:
        options.update(
            do_sample=True,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            top_k=sampling.top_k,
        )
    else:
        options["do_sample"] = False
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        torch.manual_seed(seed)
        out = model.generate(
            inputs,
            attention_mask=torch.tensor(masks, device=device),
            eos_token_id=eos,
            pad_token_id=pad,
            **options,
        )
    texts = []
    for row in out[:, width:].tolist():
        if eos is not None and eos in row:
            row = row[: row.index(eos)]
        texts.append(codec.decode(row))
    return [texts[i * samples : (i + 1) * samples] for i in range(len(prompts))]


def _batches(prompts: Sequence[str], samples: int) -> list[list[str]]:
    """``prompts`` in order, cut into batches of at most :data:`MAX_ROWS` samples (at
    least one prompt each)."""
    per = max(1, MAX_ROWS // samples)
    return [list(prompts[i : i + per]) for i in range(0, len(prompts), per)]


def generate(
    model: CodebookModel | Loaded,
    prompts: str | Sequence[str],
    codec: TextCodec | Any | None = None,
    *,
    samples: int = 1,
    max_new_tokens: int = 32,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int = 0,
    intervention: Intervention | None = None,
) -> list[list[str]]:
    """``samples`` continuations of each prompt (new text only, cut at EOS).

    ``model`` is a :class:`Loaded` (its codec is used) or a CodebookModel with ``codec``
    (a TextCodec or a fast transformers tokenizer). Prompts are encoded without special
    tokens. The prompts' samples are drawn in batches of up to :data:`MAX_ROWS` (left
    padded), each with a seed derived from ``seed`` and the batch's index, so results
    repeat exactly and a run with an intervention draws the same random numbers as one
    without. The caller's RNG state is left untouched.
    """
    cbm, text_codec = _resolve(model, codec)
    if isinstance(prompts, str):
        prompts = [prompts]
    if not isinstance(samples, int) or samples < 1:
        raise CodebookLensError(f"samples must be a positive integer, got {samples!r}")
    sampling = Sampling(max_new_tokens, temperature, top_p, top_k)
    check_lengths(cbm, text_codec, prompts, max_new_tokens)
    context = (
        apply_intervention(cbm, intervention)
        if intervention is not None
        else contextlib.nullcontext()
    )
    texts: list[list[str]] = []
    with context:
        for i, batch in enumerate(_batches(prompts, samples)):
            texts += _sample(cbm, text_codec, batch, samples, sampling, _batch_seed(seed, i))
    return texts


# ----------------------------------------------------------------------------------------
# steering evaluation


def topic_pattern(words: Sequence[str]) -> re.Pattern[str]:
    """Case-insensitive whole-word match of any of ``words`` (phrases allowed)."""
    cleaned = [w.strip() for w in words if w.strip()]
    if not cleaned:
        raise CodebookLensError(f"the topic needs at least one non-empty word, got {list(words)!r}")
    alternatives = "|".join(re.escape(w) for w in sorted(cleaned, key=len, reverse=True))
    return re.compile(rf"(?<!\w)(?:{alternatives})(?!\w)", re.IGNORECASE)


def mentions_topic(text: str, words: Sequence[str] | re.Pattern[str]) -> bool:
    """Whether ``text`` holds any of ``words`` as a whole word, ignoring case.

    ``cat`` matches ``Cat!`` and ``the CAT`` but not ``cats`` or ``concatenate``: list
    plural and other forms as words of their own.
    """
    pattern = words if isinstance(words, re.Pattern) else topic_pattern(words)
    return pattern.search(text) is not None


@dataclass
class SteeringResult:
    """Continuations with and without the intervention, and how many mention the topic.

    baseline, steered: per prompt, the sampled continuations (prompt text excluded).
    """

    intervention: dict[str, Any]
    words: list[str]
    prompts: list[str]
    baseline: list[list[str]]
    steered: list[list[str]]
    settings: dict[str, Any] = field(default_factory=dict)

    def _mentions(self, texts: list[list[str]]) -> list[list[bool]]:
        pattern = topic_pattern(self.words)
        return [[mentions_topic(t, pattern) for t in row] for row in texts]

    @property
    def baseline_mentions(self) -> list[list[bool]]:
        return self._mentions(self.baseline)

    @property
    def steered_mentions(self) -> list[list[bool]]:
        return self._mentions(self.steered)

    @staticmethod
    def _fraction(mentions: list[list[bool]]) -> float:
        flat = [m for row in mentions for m in row]
        return sum(flat) / len(flat) if flat else 0.0

    @property
    def baseline_fraction(self) -> float:
        """Fraction of baseline continuations that mention the topic."""
        return self._fraction(self.baseline_mentions)

    @property
    def steered_fraction(self) -> float:
        """Fraction of steered continuations that mention the topic."""
        return self._fraction(self.steered_mentions)

    def summary(self) -> dict[str, Any]:
        base, steer = self.baseline_mentions, self.steered_mentions
        return {
            **self.intervention,
            "words": self.words,
            "prompts": len(self.prompts),
            "samples": sum(len(r) for r in self.baseline),
            "baseline_mentions": sum(sum(r) for r in base),
            "steered_mentions": sum(sum(r) for r in steer),
            "baseline_fraction": self._fraction(base),
            "steered_fraction": self._fraction(steer),
            **self.settings,
        }

    def to_json(self) -> dict[str, Any]:
        """The summary plus every prompt's continuations and whether each mentions the topic."""
        base, steer = self.baseline_mentions, self.steered_mentions
        per_prompt = []
        for i, prompt in enumerate(self.prompts):
            per_prompt.append(
                {
                    "prompt": prompt,
                    "baseline": [
                        {"text": t, "mentions": m}
                        for t, m in zip(self.baseline[i], base[i], strict=True)
                    ],
                    "steered": [
                        {"text": t, "mentions": m}
                        for t, m in zip(self.steered[i], steer[i], strict=True)
                    ],
                }
            )
        return {**self.summary(), "per_prompt": per_prompt}

    def save(self, path: str | Path) -> Path:
        """Write :meth:`to_json` to ``path`` (parent directories are created)."""
        path = check_output_file(path, "samples file")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_json(), indent=2, ensure_ascii=False))
        return path


def steering_eval(
    model: CodebookModel | Loaded,
    codec: TextCodec | Any | None,
    codes: Sequence[CodeRef | str],
    prompts: Sequence[str],
    samples_per_prompt: int = 10,
    words: Sequence[str] = (),
    mode: str = "replace_last",
    *,
    disable: Sequence[CodeRef | str] = (),
    positions: Positions = None,
    strength: float = 1.0,
    max_new_tokens: int = 32,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int = 0,
    progress: bool = True,
) -> SteeringResult:
    """Topic steering as in Tamkin et al. (2023), Table 3.

    For each prompt, ``samples_per_prompt`` continuations are sampled without and with
    ``codes`` forced on (in ``mode``; by default at every position, the prompt's
    included, as a list of positions or ``slice(P, None)`` can narrow; each forced code
    times ``strength``), with the same
    seed for both. A continuation mentions the topic when it holds any of ``words`` as a
    whole word, ignoring case (:func:`mentions_topic`); only the new text is checked.
    """
    from tqdm.auto import tqdm

    cbm, text_codec = _resolve(model, codec)
    if not codes:
        raise CodebookLensError("steering needs at least one code to force on")
    if not prompts:
        raise CodebookLensError("steering needs at least one prompt")
    if not isinstance(samples_per_prompt, int) or samples_per_prompt < 1:
        raise CodebookLensError(
            f"samples_per_prompt must be a positive integer, got {samples_per_prompt!r}"
        )
    words = [w.strip() for w in words if w.strip()]
    topic_pattern(words)  # a clear error for an empty topic, before any sampling
    intervention = Intervention(codes, disable, mode, positions, strength)
    sampling = Sampling(max_new_tokens, temperature, top_p, top_k)
    check_lengths(cbm, text_codec, prompts, max_new_tokens)
    baseline, steered = [], []
    batches = _batches(prompts, samples_per_prompt)
    for i, batch in enumerate(tqdm(batches, desc="steering", unit="batch", disable=not progress)):
        batch_seed = _batch_seed(seed, i)
        baseline += _sample(cbm, text_codec, batch, samples_per_prompt, sampling, batch_seed)
        with apply_intervention(cbm, intervention):
            steered += _sample(cbm, text_codec, batch, samples_per_prompt, sampling, batch_seed)
    settings = {
        "samples_per_prompt": samples_per_prompt,
        "max_new_tokens": max_new_tokens,
        "temperature": temperature,
        "top_p": top_p,
        "top_k": top_k,
        "seed": seed,
    }
    return SteeringResult(
        intervention.describe(), words, list(prompts), baseline, steered, settings
    )
