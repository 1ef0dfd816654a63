"""The measurements of a language run, on trained models and their code cache.

:func:`quality` (held-out loss, accuracy, KL, gap recovered against mean ablation),
:func:`frequencies` (code frequency by rank and its power-law fit per codebook) and
:func:`regex_comparisons` (codes against neurons, paper Figure 3). Topic steering is in
:mod:`codebook_lens.experiments.language.steer`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from codebook_lens.analysis.neurons import codes_vs_neurons
from codebook_lens.analysis.search import matching_tokens, score_codes
from codebook_lens.cache.store import CodeCache
from codebook_lens.core.model import CodebookModel
from codebook_lens.experiments.language.config import MeasureSection
from codebook_lens.experiments.language.files import Regex
from codebook_lens.experiments.language.measures import (
    RegexComparison,
    gap_recovered,
    lm_metrics,
    logits_fn,
    mean_ablation,
    power_law_fit,
    regex_code,
    site_means,
)


@torch.no_grad()
def quality(
    base: torch.nn.Module,
    model: CodebookModel,
    eval_batches: Sequence[torch.Tensor],
    ablation_batches: Sequence[torch.Tensor],
    control: torch.nn.Module | None = None,
) -> tuple[dict[str, float], dict]:
    """LM quality of the codebook ``model`` against its ``base`` (and the ``control``,
    the base trained on for the codebook stage's steps without codebooks).

    Returns flat metrics and per-site details. The ablation replaces every codebook
    site of the base by its mean activation over ``ablation_batches`` (training text);
    the gap recovered is ``(ablated - codebook) / (ablated - base)``.
    """
    base.eval()
    model.eval()
    out: dict[str, float] = {}
    ref = logits_fn(base)
    for key, value in lm_metrics(ref, eval_batches).items():
        out[f"base.{key}"] = value
    for key, value in lm_metrics(logits_fn(model), eval_batches, teacher_of=ref).items():
        out[f"codebook.{key}"] = value
    with model.codebooks_disabled():
        for key, value in lm_metrics(logits_fn(model), eval_batches).items():
            out[f"codebook_off.{key}"] = value
    if control is not None:
        control.eval()
        for key, value in lm_metrics(logits_fn(control), eval_batches).items():
            out[f"control.{key}"] = value
    means = site_means(base, model.placement, ablation_batches)
    with mean_ablation(base, model.placement, means):
        ablated = lm_metrics(ref, eval_batches)
    out["ablated.loss"] = ablated["loss"]
    out["ablated.accuracy"] = ablated["accuracy"]
    out["gap_recovered"] = gap_recovered(out["base.loss"], out["codebook.loss"], ablated["loss"])
    out["loss_increase"] = out["codebook.loss"] - out["base.loss"]
    if control is not None:
        out["loss_increase_vs_control"] = out["codebook.loss"] - out["control.loss"]
    per_site = {}
    for key, placed in model.placement.items():
        with mean_ablation(base, {key: placed}, {key: means[key]}):
            per_site[key] = lm_metrics(ref, eval_batches)["loss"]
    return out, {"ablated_alone": per_site}


def frequencies(cache: CodeCache) -> tuple[dict[str, float], dict]:
    """Per codebook (an attention codebook's heads pooled): the power-law fit of
    activation counts by rank and the share of codes that never fire on the cache."""
    out: dict[str, float] = {}
    details: dict = {"counts": {}, "fits": {}}
    for key in cache.codebooks:
        counts = np.asarray(cache.counts(key)).reshape(-1)
        ranked = np.sort(counts)[::-1]
        out[f"frequency.{key}.dead_fraction"] = float((counts == 0).mean())
        details["counts"][key] = ranked[ranked > 0].tolist()
        if (counts > 0).sum() >= 2:
            fit = power_law_fit(counts)
            details["fits"][key] = fit.to_dict()
            out[f"frequency.{key}.exponent"] = fit.exponent
            out[f"frequency.{key}.r2"] = fit.r2
    return out, details


def regex_comparisons(
    cache: CodeCache, regexes: Sequence[Regex], m: MeasureSection
) -> tuple[list[RegexComparison], dict[str, list[dict]]]:
    """Each regex's code (:func:`~.measures.regex_code`) against the best single neuron
    of the same network (codebooks off) at the code's recall, and both along
    ``m.recalls`` (the most precise code of at least that recall, the best neuron at it)."""
    rows: list[RegexComparison] = []
    curves: dict[str, list[dict]] = {}
    for regex in tqdm(regexes, desc="regexes: codes against neurons", unit="regex"):
        positives = matching_tokens(cache, regex.pattern)
        matches = int(positives.sum())
        if matches == 0:
            rows.append(RegexComparison(regex.name, regex.pattern, 0, None, None))
            continue
        scores = score_codes(cache, positives, limit=None)
        code = regex_code(scores, m.min_count, m.min_recall)
        recalls = ([code.recall] if code is not None else []) + list(m.recalls)
        points = codes_vs_neurons(
            cache, positives, scores, recalls, sample_positives=m.neuron_sample, seed=m.seed
        )
        neuron = points[0].neuron if code is not None else None
        rows.append(RegexComparison(regex.name, regex.pattern, matches, code, neuron))
        grid = points[1:] if code is not None else points
        curves[regex.name] = [
            {
                "recall": p.recall,
                "neuron": f"{p.neuron.site}[{p.neuron.neuron}]",
                "neuron_precision": p.neuron.precision,
                "code": None if p.code is None else str(p.code.ref),
                "code_precision": None if p.code is None else p.code.precision,
                "code_recall": None if p.code is None else p.code.recall,
            }
            for p in grid
        ]
    return rows, curves
