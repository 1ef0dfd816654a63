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

from codebook_lens.analysis.neurons import code_curve, neuron_curves
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
    cache: CodeCache, regexes: Sequence[Regex], m: MeasureSection, batch_size: int = 32
) -> tuple[list[RegexComparison], dict[str, list[dict]]]:
    """Each regex's code (:func:`~.measures.regex_code`) against the best single neuron
    of the same network (codebooks off) at the code's recall, and both along
    ``m.recalls`` (the most precise code of at least that recall, the best neuron at it).
    The neurons of every regex are scored in the same two passes over the cache."""
    found = []
    for regex in tqdm(regexes, desc="regexes: scoring codes", unit="regex"):
        positives = matching_tokens(cache, regex.pattern)
        if not positives.any():
            found.append((regex, positives, [], None))
            continue
        scores = score_codes(cache, positives, limit=None)
        found.append((regex, positives, scores, regex_code(scores, m.min_count, m.min_recall)))
    scored = [f for f in found if f[1].any()]
    recalls = [([code.recall] if code is not None else []) + list(m.recalls) for *_, code in scored]
    curves_of = neuron_curves(
        cache,
        [positives for _, positives, _, _ in scored],
        recalls,
        batch_size=batch_size,
        sample_positives=m.neuron_sample,
        seed=m.seed,
    )
    neurons = {f[0].name: (f, rs, c) for f, rs, c in zip(scored, recalls, curves_of, strict=True)}
    rows: list[RegexComparison] = []
    curves: dict[str, list[dict]] = {}
    for regex, positives, scores, code in found:
        matches = int(positives.sum())
        if regex.name not in neurons:
            rows.append(RegexComparison(regex.name, regex.pattern, matches, None, None))
            continue
        _, rs, curve = neurons[regex.name]
        neuron = curve[0][0] if code is not None else None
        rows.append(RegexComparison(regex.name, regex.pattern, matches, code, neuron))
        grid = list(zip(rs, curve, strict=True))[1 if code is not None else 0 :]
        picks = code_curve(scores, [r for r, _ in grid])
        curves[regex.name] = [
            {
                "recall": r,
                "neuron": f"{sites[0].site}[{sites[0].neuron}]",
                "neuron_precision": sites[0].precision,
                "code": None if pick is None else str(pick.ref),
                "code_precision": None if pick is None else pick.precision,
                "code_recall": None if pick is None else pick.recall,
            }
            for (r, sites), pick in zip(grid, picks, strict=True)
        ]
    return rows, curves
