"""Analyses of a TokFSM codebook model: what the codes mean and what they do.

- :func:`purity`: per codebook, the fraction of active codes that fire on a single
  state (*bigram*: on the last digit of one state) or on a single state plus the
  next digit (*trigram*: on the first digit of a state, given the previous state).
- state classification, codes against neurons, is in :mod:`codebook_lens.experiments.tokfsm.classify`.
- :func:`intervention_jsd`: replace the codes that fire on a source state with those of
  a target state and measure how far the model's next-state distribution is from
  the target's true one (Jensen-Shannon divergence, normalised so that no
  intervention = 1).
- :func:`code_frequencies`: how often each code fires, sorted (frequency by rank).

All of them work on sequences sampled from the FSM (random walks that cover every
transition many times), in batches, on the model's device.
"""

from __future__ import annotations

import contextlib
import inspect
import math
from collections.abc import Iterator

import torch

from codebook_lens.core.errors import CodebookLensError
from codebook_lens.core.model import CodebookModel
from codebook_lens.data.fsm import FSM

# ----------------------------------------------------------------------------------------
# labels of token positions


def position_labels(fsm: FSM, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Bigram and trigram labels of every position of BOS-led walk sequences.

    Returns ``(bigram, trigram)``, each ``(B, T)`` int64 with -1 where it does not apply:
    ``bigram`` is the state whose last digit sits at the position; ``trigram`` is
    ``prev * base + digit`` at the first digit of a state, where ``prev`` is the state
    before it (``num_states`` stands for BOS at the start of the walk).
    """
    b, t = tokens.shape
    d = fsm.digits
    states = fsm.decode_states(tokens[:, 1:])  # (B, S) whole states only
    bigram = torch.full((b, t), -1, dtype=torch.long)
    trigram = torch.full((b, t), -1, dtype=torch.long)
    n_states = states.shape[1]
    for j in range(n_states):
        last = 1 + j * d + d - 1
        bigram[:, last] = states[:, j]
    for j in range(math.ceil((t - 1) / d)):
        first = 1 + j * d
        if first >= t:
            break
        prev = states[:, j - 1] if j > 0 else torch.full((b,), fsm.num_states)
        digit = tokens[:, first]
        ok = (prev >= 0) & (digit >= 0) & (digit < fsm.base)
        trigram[:, first] = torch.where(ok, prev * fsm.base + digit, torch.full_like(prev, -1))
    return bigram, trigram


@torch.no_grad()
def collect_codes(
    model: CodebookModel, tokens: torch.Tensor, batch_size: int = 64
) -> dict[str, torch.Tensor]:
    """Code ids of every codebook on ``tokens``: key -> ``(B, T, G, k)`` (on the CPU)."""
    device = next(model.parameters()).device
    parts: dict[str, list[torch.Tensor]] = {}
    for i in range(0, tokens.shape[0], batch_size):
        out = model(tokens[i : i + batch_size].to(device), return_codes=True)
        for key, ids in out.codes.items():
            parts.setdefault(key, []).append(ids.cpu())
    return {key: torch.cat(v) for key, v in parts.items()}


def flat_codes(codes: torch.Tensor, num_codes: int) -> torch.Tensor:
    """(B, T, G, k) ids -> (B, T, G*k) ids made unique across groups (g * C + id)."""
    g = codes.shape[2]
    offset = (torch.arange(g) * num_codes).view(1, 1, g, 1)
    return (codes + offset).flatten(2)


# ----------------------------------------------------------------------------------------
# purity


def purity(
    fsm: FSM,
    tokens: torch.Tensor,
    codes: dict[str, torch.Tensor],
    num_codes: dict[str, int],
    threshold: float = 1.0,
) -> dict[str, dict]:
    """Per codebook: fraction of active codes that fire on a single bigram or trigram.

    A code counts as pure when at least ``threshold`` of its activations on state
    tokens share one label (a state at its last digit, or a (previous state, digit)
    pair at a first digit). ``purity`` is the fraction of active codes that are pure;
    ``bigram`` / ``trigram`` split it by the kind of the code's label.
    """
    bigram, trigram = position_labels(fsm, tokens)
    n_bi = fsm.num_states
    label = torch.where(bigram >= 0, bigram, torch.where(trigram >= 0, n_bi + trigram, -1))
    num_labels = n_bi + (fsm.num_states + 1) * fsm.base
    result = {}
    for key, ids in codes.items():
        flat = flat_codes(ids, num_codes[key])  # (B, T, slots)
        lab = label.unsqueeze(-1).expand_as(flat)
        keep = lab >= 0
        pair = flat[keep] * num_labels + lab[keep]
        uniq, counts = torch.unique(pair, return_counts=True)
        code = uniq // num_labels
        lab_of = uniq % num_labels
        size = int(code.max()) + 1 if code.numel() else 1
        total = torch.zeros(size, dtype=torch.long).index_add_(0, code, counts)
        best = torch.zeros(size, dtype=torch.long).scatter_reduce(
            0, code, counts, "amax", include_self=True
        )
        # label of each code's most common pair (ties: any)
        is_best = counts == best[code]
        best_label = torch.full((size,), -1, dtype=torch.long)
        best_label[code[is_best]] = lab_of[is_best]
        active = total > 0
        pure = active & (best >= threshold * total)
        n_active = int(active.sum())
        pure_bi = pure & (best_label < n_bi)
        result[key] = {
            "purity": int(pure.sum()) / max(1, n_active),
            "bigram": int(pure_bi.sum()) / max(1, n_active),
            "trigram": int((pure & ~pure_bi).sum()) / max(1, n_active),
            "active_codes": n_active,
        }
    return result


def all_inputs(fsm: FSM, every_digit: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Every possible start of a sequence: BOS + one state (``(N, 1 + d)``) and BOS + one
    state + one next digit, in state-major, digit-minor order.

    The next digit ranges over the digits the machine can produce there, the first
    digits of the state's successors (the inputs the paper's Figure 5 partitions);
    ``every_digit=True`` takes all ``base`` digits instead (``(N * base, 2 + d)``).
    """
    n, d = fsm.num_states, fsm.digits
    states = fsm.encode_states(torch.arange(n)).view(n, d)
    bos = torch.full((n, 1), fsm.bos, dtype=torch.long)
    bigrams = torch.cat([bos, states], dim=1)
    digits = torch.arange(fsm.base).repeat(n).view(-1, 1)
    trigrams = torch.cat([bigrams.repeat_interleave(fsm.base, 0), digits], dim=1)
    if not every_digit:
        first = fsm.encode_states(fsm.successors.reshape(-1)).view(n, -1, d)[:, :, 0]
        possible = torch.zeros(n, fsm.base, dtype=torch.bool)
        possible[torch.arange(n).unsqueeze(1).expand_as(first), first] = True
        trigrams = trigrams[possible.view(-1)]
    return bigrams, trigrams


@torch.no_grad()
def purity_all_inputs(model: CodebookModel, fsm: FSM) -> dict[str, dict]:
    """Code purity over all possible inputs (paper Figure 5).

    The model reads each of the N bigram inputs (BOS + a state) and each trigram
    input (BOS + a state + a next digit the machine can produce there, see
    :func:`all_inputs`) once; the codes at the input's last token are kept. A code is pure when it fires on a single input, i.e.
    on one state (bigram) or one state plus next digit (trigram). Per codebook:
    ``bigram`` and ``trigram`` purity (fraction of the codes active on those inputs
    that are pure) and the number of active codes of each.
    """
    bigrams, trigrams = all_inputs(fsm)
    result: dict[str, dict] = {}
    for kind, inputs in (("bigram", bigrams), ("trigram", trigrams)):
        codes = collect_codes(model, inputs, batch_size=256)
        for key, ids in codes.items():
            num = model.codebooks[key].num_codes
            last = flat_codes(ids, num)[:, -1]  # (inputs, G * k), distinct per row
            counts = torch.bincount(last.reshape(-1), minlength=ids.shape[2] * num)
            active = int((counts > 0).sum())
            entry = result.setdefault(key, {})
            entry[kind] = int((counts == 1).sum()) / max(1, active)
            entry[f"{kind}_active_codes"] = active
            entry[f"{kind}_inputs"] = int(inputs.shape[0])
    return result


# ----------------------------------------------------------------------------------------
# interventions


@contextlib.contextmanager
def replaced_codes(
    model: CodebookModel, keys: list[str], positions: list[int], new_ids: dict[str, torch.Tensor]
) -> Iterator[None]:
    """Within the block, codebooks ``keys`` use ``new_ids[key]`` (``(B, len(positions), G,
    k)``) at ``positions`` of every row instead of the codes their search found."""
    pos = torch.tensor(positions)

    def make(key: str):
        def hook(ids: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
            rows = new_ids[key].shape[0]
            ids = ids.view(rows, -1, *ids.shape[1:]).clone()
            ids[:, pos.to(ids.device)] = new_ids[key].to(ids.device)
            return ids.view(-1, *ids.shape[2:])

        return hook

    previous = {key: model.codebooks[key].ids_hook for key in keys}
    try:
        for key in keys:
            model.codebooks[key].ids_hook = make(key)
        yield
    finally:
        for key, hook in previous.items():
            model.codebooks[key].ids_hook = hook


def walks_ending_in(
    fsm: FSM, length: int, per_state: int, generator: torch.Generator
) -> dict[int, torch.Tensor]:
    """Random walks of ``length`` states grouped by their final state."""
    walks = fsm.walks(per_state * fsm.num_states * 2, length, generator)
    return {s: walks[walks[:, -1] == s] for s in range(fsm.num_states)}


def with_heads(fsm: FSM, prefixes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each prefix followed by every possible head (the first ``d - 1`` digits of a
    state): ``(B * h, t0 + d - 1)`` rows, prefix-major, and the ``(h, d - 1)`` heads."""
    d = fsm.digits
    all_digits = fsm.encode_states(torch.arange(fsm.num_states)).view(fsm.num_states, d)
    heads = torch.unique(all_digits[:, : d - 1], dim=0) if d > 1 else torch.zeros(1, 0).long()
    rows = torch.cat(
        [prefixes.repeat_interleave(heads.shape[0], 0), heads.repeat(prefixes.shape[0], 1)],
        dim=1,
    )
    return rows, heads


@torch.no_grad()
def next_state_distribution(model, fsm: FSM, prefixes: torch.Tensor, context=None) -> torch.Tensor:
    """``(B, N)`` the model's distribution of the next state after each prefix.

    The probability of a state is the product of its digits' probabilities (each
    digit fed back); it is renormalised over states (mass on other tokens dropped).
    ``context(rows)`` is entered around each forward pass (for interventions), with
    the number of rows of that pass.
    """
    d = fsm.digits
    b, t0 = prefixes.shape
    all_digits = fsm.encode_states(torch.arange(fsm.num_states)).view(fsm.num_states, d)
    rows, heads = with_heads(fsm, prefixes)
    h = heads.shape[0]
    device = next(model.parameters()).device
    lm = model.model if isinstance(model, CodebookModel) else model
    if context is None and d > 1 and "use_cache" in inspect.signature(lm.forward).parameters:
        logits = _logits_after_heads(lm, prefixes.to(device), heads.to(device))
    else:
        with context(rows.shape[0]) if context is not None else contextlib.nullcontext():
            logits = model(rows.to(device)).logits[:, t0 - 1 :].float().cpu()
    logp = torch.log_softmax(logits, -1).view(b, h, d, -1)
    head_index = {tuple(r.tolist()): i for i, r in enumerate(heads)}
    out = torch.empty(b, fsm.num_states)
    for s in range(fsm.num_states):
        digits = all_digits[s]
        i = head_index[tuple(digits[: d - 1].tolist())]
        out[:, s] = sum(logp[:, i, j, digits[j]] for j in range(d))
    return torch.softmax(out, dim=-1)


def _logits_after_heads(lm, prefixes: torch.Tensor, heads: torch.Tensor) -> torch.Tensor:
    """The logits :func:`next_state_distribution` reads, ``(B * h, d, V)`` on the CPU,
    with each prefix read once: the prefix fills a KV cache that every head continues
    (instead of reading the prefix again with each of the ``h`` heads). ``lm`` is a
    transformers causal LM, a codebook model's base with its codebooks attached (they
    act on the prefix and on each head's positions as in one pass over the row)."""
    h = heads.shape[0]
    # the KV cache argument and output are named ``cache`` in newer transformers
    name = "cache" if "cache" in inspect.signature(lm.forward).parameters else "past_key_values"
    out = lm(input_ids=prefixes, use_cache=True)
    cache = getattr(out, name)
    cache.batch_repeat_interleave(h)
    first = out.logits[:, -1:].float().cpu().repeat_interleave(h, 0)  # (B * h, 1, V)
    rest = lm(input_ids=heads.repeat(prefixes.shape[0], 1), use_cache=True, **{name: cache})
    return torch.cat([first, rest.logits.float().cpu()], dim=1)


def jensen_shannon(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Row-wise Jensen-Shannon divergence in bits (in [0, 1])."""
    m = 0.5 * (p + q)

    def kl(a, b):
        return torch.where(
            a > 0, a * (a.clamp(min=1e-30).log2() - b.clamp(min=1e-30).log2()), 0.0
        ).sum(-1)

    return 0.5 * kl(p, m) + 0.5 * kl(q, m)


@torch.no_grad()
def intervention_jsd(
    model: CodebookModel,
    fsm: FSM,
    site_sets: dict[str, list[str]],
    pairs: int = 200,
    prefix_states: int = 5,
    seed: int = 0,
    next_digits: bool = True,
) -> dict:
    """Swap a source state's codes for a target state's; JSD to the target's successors.

    For ``pairs`` random (source, target) states: a walk of ``prefix_states`` states
    ending in the source, and one ending in the target. The codes the target walk
    produces on the target state's digits (state codes) replace the source walk's
    codes on its last state's digits, in the codebooks of a site set; with
    ``next_digits`` (paper Figure 2: "the state and state-plus-digit codes") also the
    codes on the next state's leading digits, taken from the target walk followed by
    the same digits. The model's next-state
    distribution is compared with the true one of the target (uniform over its
    successors). ``jsd[set]`` is the mean JSD divided by the mean JSD with no
    intervention, capped at 1 ("none" = 1; 0 = the model now behaves exactly like the
    target state); ``jsd_ratio`` is the same uncapped, ``jsd_bits`` the unnormalised means, ``target_mass`` the model's
    probability of the target's successors.
    """
    return intervention_jsd_variants(
        model, fsm, site_sets, pairs, prefix_states, seed, variants=(next_digits,)
    )[0]


@torch.no_grad()
def intervention_jsd_variants(
    model: CodebookModel,
    fsm: FSM,
    site_sets: dict[str, list[str]],
    pairs: int = 200,
    prefix_states: int = 5,
    seed: int = 0,
    variants: tuple[bool, ...] = (True, False),
) -> list[dict]:
    """:func:`intervention_jsd` for each ``next_digits`` value in ``variants``, on the
    same pairs: the walks, the target's codes and the unswapped distribution are
    computed once."""
    gen = torch.Generator().manual_seed(seed)
    by_state = walks_ending_in(fsm, prefix_states, 4, gen)
    available = [s for s, w in by_state.items() if len(w)]
    if len(available) < 2:
        raise CodebookLensError("too few states reachable to form intervention pairs")
    avail = torch.tensor(available)
    src = avail[torch.randint(len(avail), (pairs,), generator=gen)]
    shift = torch.randint(1, len(avail), (pairs,), generator=gen)
    tgt = avail[(torch.searchsorted(avail, src) + shift) % len(avail)]

    def pick(states):
        rows = []
        for s in states.tolist():
            w = by_state[s]
            rows.append(w[torch.randint(len(w), (1,), generator=gen)].squeeze(0))
        walks = torch.stack(rows)
        bos = torch.full((len(rows), 1), fsm.bos, dtype=torch.long)
        return torch.cat([bos, fsm.encode_states(walks)], dim=1)

    src_tokens, tgt_tokens = pick(src), pick(tgt)
    t0 = src_tokens.shape[1]
    tgt_rows, _ = with_heads(fsm, tgt_tokens)  # the rows next_state_distribution reads
    tgt_codes = collect_codes(model, tgt_rows)
    truth = torch.zeros(pairs, fsm.num_states)
    truth.scatter_(1, fsm.successors[tgt], 1.0 / fsm.out_degree)

    def measure(p: torch.Tensor) -> tuple[float, float]:
        return float(jensen_shannon(p, truth).mean()), float((p * (truth > 0)).sum(-1).mean())

    unswapped = measure(next_state_distribution(model, fsm, src_tokens))
    results = []
    for next_digits in variants:
        end = t0 + fsm.digits - 1 if next_digits else t0
        positions = list(range(t0 - fsm.digits, end))
        raw, mass = {"none": unswapped[0]}, {"none": unswapped[1]}
        for name, keys in site_sets.items():

            def context(rows, keys=keys, positions=positions):
                if rows != tgt_rows.shape[0]:
                    raise AssertionError("intervention rows do not match the target rows")
                ids = {k: tgt_codes[k][:, positions] for k in keys}
                return replaced_codes(model, keys, positions, ids)

            raw[name], mass[name] = measure(
                next_state_distribution(model, fsm, src_tokens, context if keys else None)
            )
        base_jsd = raw["none"]
        ratio = {name: v / base_jsd if base_jsd > 0 else float("nan") for name, v in raw.items()}
        results.append(
            {
                # a swap that moves the model further from the target than no swap at
                # all counts as no effect: the reported fraction is capped at 1 (ratio
                # is uncapped)
                "jsd": {name: min(1.0, v) for name, v in ratio.items()},
                "jsd_ratio": ratio,
                "jsd_bits": raw,
                "target_mass": mass,
                "pairs": pairs,
                "positions": "state and next digits" if next_digits else "state",
                "sources": src.tolist(),
                "targets": tgt.tolist(),
            }
        )
    return results


# ----------------------------------------------------------------------------------------
# frequency by rank


def code_frequencies(codes: dict[str, torch.Tensor], num_codes: dict[str, int]) -> dict:
    """Per codebook: activation counts of every code (all groups), sorted descending."""
    out = {}
    for key, ids in codes.items():
        flat = flat_codes(ids, num_codes[key]).reshape(-1)
        g = ids.shape[2]
        counts = torch.bincount(flat, minlength=g * num_codes[key])
        out[key] = counts.sort(descending=True).values
    return out


def frequency_summary(counts: torch.Tensor) -> dict:
    """Active codes, dead fraction, and share of activations held by the top 10% of codes."""
    total = int(counts.sum())
    active = int((counts > 0).sum())
    top = max(1, active // 10)
    return {
        "active_codes": active,
        "dead_fraction": 1.0 - active / counts.numel(),
        "top10pct_share": float(counts[:top].sum()) / max(1, total),
    }
