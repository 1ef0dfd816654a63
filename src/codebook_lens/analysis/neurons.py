"""The neuron baseline for regex codes (paper Figure 3): the best single neuron of a
code cache's model at a threshold matched to a recall, streamed over the cache, and the
comparison of codes against neurons along a recall grid.

Neurons are every layer's attention output, MLP output and MLP hidden units (the input
of the MLP's output projection, :func:`codebook_lens.core.sites.attach_mlp_hidden`),
either sign.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from codebook_lens.analysis.search import CodeScore, SearchError
from codebook_lens.cache.store import CodeCache
from codebook_lens.core import sites as S


class _Grabber:
    """Hooks that hand each layer's neurons to a callback as ``(name, (B*T, F))``."""

    def __init__(self, base: torch.nn.Module) -> None:
        self.base = base
        self.current: dict[str, torch.Tensor] = {}
        self.handles = []
        for layer in range(S.num_layers(base)):
            for site in ("attn", "mlp"):
                self.handles.append(S.attach(base, site, layer, self._grab(f"layer{layer}_{site}")))
            name = f"layer{layer}_mlp_hidden"
            self.handles.append(S.attach_mlp_hidden(base, layer, self._grab(name)))

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
    return neuron_curves(
        cache,
        [positives],
        [recalls],
        max_tokens=max_tokens,
        batch_size=batch_size,
        sample_positives=sample_positives,
        with_codebooks=with_codebooks,
        seed=seed,
    )[0]


def neuron_curves(
    cache: CodeCache,
    positives: Sequence[np.ndarray],
    recalls: Sequence[Sequence[float]],
    *,
    max_tokens: int | None = None,
    batch_size: int = 8,
    sample_positives: int = 1024,
    with_codebooks: bool = False,
    seed: int = 0,
) -> list[list[list[NeuronScore]]]:
    """:func:`neuron_curve` of several token masks (``positives[i]`` at ``recalls[i]``)
    in the same two streamed passes: the model runs once over the blocks that hold a
    sampled matching token of any mask, then once over every block. Returns, per mask,
    what :func:`neuron_curve` returns for it (each mask's sample is drawn as it draws it).
    """
    if len(positives) != len(recalls):
        raise SearchError(f"{len(positives)} token masks but {len(recalls)} lists of recalls")
    recalls = [[float(r) for r in rs] for rs in recalls]
    for rs in recalls:
        if not rs:
            raise SearchError("recalls must name at least one recall")
        for recall in rs:
            if not 0.0 < recall <= 1.0:
                raise SearchError(f"recall must be in (0, 1], got {recall}")
    n = cache.num_tokens if max_tokens is None else min(max_tokens, cache.num_tokens)
    seq_len = int(cache.manifest["seq_len"])
    samples = []
    for mask in positives:
        pos_rows = np.flatnonzero(mask[:n])
        if pos_rows.size == 0:
            raise SearchError("no token matches, so no neuron can be scored")
        rng = np.random.default_rng(seed)
        size = min(sample_positives, pos_rows.size)
        samples.append(np.sort(rng.choice(pos_rows, size=size, replace=False)))
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

    # pass 1: activations of the sampled positives of every mask
    blocks = sorted({int(r) // seq_len * seq_len for sample in samples for r in sample})
    pos_acts: list[dict[str, list[torch.Tensor]]] = [{} for _ in samples]
    for rows, acts in run(blocks, "neurons: matching tokens"):
        for sample, found in zip(samples, pos_acts, strict=True):
            sel = torch.from_numpy(np.isin(rows, sample))
            if not bool(sel.any()):
                continue
            for name, a in acts.items():
                found.setdefault(name, []).append(a[sel].cpu())
    hi_t: list[dict[str, torch.Tensor]] = []  # per mask, (R, F) per site: `need` positives
    lo_t: list[dict[str, torch.Tensor]] = []  # are >= (hi) or <= (lo) it
    for sample, found, rs in zip(samples, pos_acts, recalls, strict=True):
        need = torch.tensor([max(1, math.ceil(r * len(sample))) for r in rs]) - 1
        hi, lo = {}, {}
        for name, parts in found.items():
            a = torch.cat(parts)  # (P, F)
            hi[name] = a.sort(0, descending=True).values[need]
            lo[name] = a.sort(0).values[need]
        hi_t.append(hi)
        lo_t.append(lo)
    del pos_acts

    # pass 2: count every token past each threshold, for every mask. Each neuron's
    # activations over the batch are sorted once, so the count past any threshold is a
    # binary search; the matching tokens (few) are compared directly.
    all_blocks = list(range(0, n, seq_len))
    stats = [
        {name: torch.zeros(4, *t.shape, dtype=torch.int64) for name, t in hi.items()} for hi in hi_t
    ]
    masks = [torch.from_numpy(np.ascontiguousarray(m[:n])) for m in positives]
    for rows, acts in run(all_blocks, "neurons: all tokens"):
        index = torch.from_numpy(rows)
        picked = [mask[index] for mask in masks]
        for name, a in acts.items():
            a = a.cpu()  # (N, F)
            ordered = a.t().contiguous().sort(dim=1).values  # (F, N)
            for is_pos, hi, lo, stat in zip(picked, hi_t, lo_t, stats, strict=True):
                s = stat[name]
                # tokens >= a threshold: N minus those below it; <= it: those up to it
                below_hi = torch.searchsorted(ordered, hi[name].t().contiguous(), right=False)
                s[0] += (a.shape[0] - below_hi).t()
                s[2] += torch.searchsorted(ordered, lo[name].t().contiguous(), right=True).t()
                if bool(is_pos.any()):
                    p = a[is_pos].unsqueeze(1)  # (P, 1, F) against (R, F) thresholds
                    s[1] += (p >= hi[name]).sum(0)
                    s[3] += (p <= lo[name]).sum(0)
    curves = []
    for mask, hi, lo, stat, rs in zip(masks, hi_t, lo_t, stats, recalls, strict=True):
        n_pos = int(mask.sum())
        curve = []
        for j in range(len(rs)):
            out = []
            for name, s in stat.items():
                best = None
                signs = ((1, s[0], s[1], hi[name]), (-1, s[2], s[3], lo[name]))
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
        curves.append(curve)
    return curves


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


def curve_table(points: Sequence[CurvePoint]) -> list[str]:
    """:func:`codes_vs_neurons` as printable lines: per recall, the best neuron, the most
    precise code of at least that recall and the code's lead in points."""
    lines = [
        f"  {'recall':>6}  {'best neuron':<30}{'prec':>6}  {'best code':<26}{'prec':>6}"
        f"{'recall':>8}{'lead':>7}"
    ]
    for p in points:
        n, c = p.neuron, p.code
        lines.append(
            f"  {p.recall:>6.2f}  {f'{n.site}[{n.neuron}]':<30}{n.precision:>6.3f}  "
            f"{'-' if c is None else str(c.ref):<26}"
            f"{'' if c is None else f'{c.precision:.3f}':>6}"
            f"{'' if c is None else f'{c.recall:.3f}':>8}"
            f"{'' if p.lead is None else f'{100 * p.lead:+.1f}':>7}"
        )
    return lines
