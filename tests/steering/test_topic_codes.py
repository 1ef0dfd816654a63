"""Topic codes chosen by measuring what forcing them does."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers import save_tiny_bpe_codebook_model, tiny_cache

from codebook_lens.analysis.search import SearchError
from codebook_lens.analysis.topics import TopicTokens, effect_topic_codes, topic_tokens
from codebook_lens.core.refs import CodeRef
from codebook_lens.steering import topic_codes as tc
from codebook_lens.steering.intervene import Intervention, apply_intervention
from codebook_lens.steering.topic_codes import (
    MIN_COST,
    Forcing,
    forced_log_probs,
    forcing_of,
    greedy_path,
    measured_topic_codes,
    ranked_path,
    screen,
    top_per_group,
)

WORDS = ["boat", "apple", "tree"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("steer")
    model_dir = save_tiny_bpe_codebook_model(root)
    return tiny_cache(root, model_dir, docs=4, lines=12, seq_len=32, batch_size=8)


def test_forcing_of_by_hand():
    plain = torch.tensor([[[0.5, 0.25, 0.25], [0.1, 0.1, 0.8]]]).log()
    forced = torch.tensor([[[0.25, 0.5, 0.25], [0.1, 0.1, 0.8]]]).log()
    same = forcing_of(plain, plain, TopicTokens((1,), (1.0,)))
    assert same.cost == pytest.approx(0.0, abs=1e-7)
    assert same.topic_rate == pytest.approx((0.25 + 0.1) / 2)
    assert same.topic_log_prob == pytest.approx((math.log(0.25) + math.log(0.1)) / 2)
    f = forcing_of(forced, plain, TopicTokens((1,), (1.0,)))
    # position 0: tokens ~ (1/4, 1/2, 1/4) scored by (1/2, 1/4, 1/4), less the entropy of
    # (1/2, 1/4, 1/4); position 1: the same distribution, no cost
    cross = -(0.25 * math.log(0.5) + 0.5 * math.log(0.25) + 0.25 * math.log(0.25))
    entropy = -(0.5 * math.log(0.5) + 0.5 * math.log(0.25))
    assert f.cost == pytest.approx((cross - entropy) / 2)
    assert f.topic_rate == pytest.approx((0.5 + 0.1) / 2)


def test_forced_log_probs_are_the_model_under_the_intervention(cache):
    model = cache.model().model
    blocks = torch.from_numpy(np.asarray(cache.token_ids[:64], dtype=np.int64)).view(2, 32)
    with torch.no_grad():
        plain = model(blocks).logits.log_softmax(-1)
        with apply_intervention(model, Intervention(["layer1_mlp:3"])):
            forced = model(blocks).logits.log_softmax(-1)
    assert torch.allclose(forced_log_probs(model, blocks, []), plain, atol=1e-6)
    assert torch.allclose(forced_log_probs(model, blocks, ["layer1_mlp:3"]), forced, atol=1e-6)


def test_measured_topic_codes_keep_their_promises(cache):
    model = cache.model().model
    found = measured_topic_codes(
        cache, WORDS, candidates_per_group=3, target_rate=0.5, max_cost=0.5, blocks=2, min_count=2
    )
    assert found.codes, "some code raises the topic's probability"
    # at most k codes per (codebook, head), each chosen code a measured candidate
    per_group: dict[tuple[str, int], int] = {}
    for ref in found.codes:
        per_group[(ref.codebook, ref.group)] = per_group.get((ref.codebook, ref.group), 0) + 1
    assert all(n <= model.codebooks[key].k for (key, _), n in per_group.items())
    assert {str(c) for c in found.codes} <= {c["code"] for c in found.candidates}
    assert all(c["gain"] > 0 for c in found.candidates)
    # the recorded effect of the chosen set is what forcing them together does
    ids = topic_tokens(cache, WORDS)
    seq = 32
    tokens = np.asarray(cache.token_ids, dtype=np.int64)
    held = torch.from_numpy(tokens[tokens.size - 2 * seq :].copy()).view(2, seq)
    again = forcing_of(
        forced_log_probs(model, held, found.codes), forced_log_probs(model, held, []), ids
    )
    assert again.topic_log_prob == pytest.approx(found.after.topic_log_prob, rel=1e-5)
    assert again.cost == pytest.approx(found.after.cost, rel=1e-4, abs=1e-6)
    assert found.after.topic_log_prob > found.before.topic_log_prob
    assert found.after.cost <= 0.5 + 1e-9
    # the path holds the set after every addition: each prefix measured again, each
    # raising the mean log topic probability over the one before, the last the chosen set
    assert len(found.path) == len(found.codes) and found.path[-1] == found.after
    plain = forced_log_probs(model, held, [])
    previous = found.before.topic_log_prob
    for i, step in enumerate(found.path):
        prefix = forcing_of(forced_log_probs(model, held, found.codes[: i + 1]), plain, ids)
        assert prefix.topic_log_prob == pytest.approx(step.topic_log_prob, rel=1e-5)
        assert prefix.cost == pytest.approx(step.cost, rel=1e-4, abs=1e-6)
        assert step.topic_log_prob > previous and step.cost <= 0.5 + 1e-9
        previous = step.topic_log_prob
    assert found.to_dict()["path"][-1] == found.after.__dict__


def test_measured_topic_codes_stop_at_the_target(cache):
    # a target the model already meets: nothing to force
    rate = 1e-12
    found = measured_topic_codes(cache, WORDS, target_rate=rate, blocks=2, min_count=2)
    assert found.before.topic_rate >= rate and found.codes == []
    with pytest.raises(SearchError, match="target_rate"):
        measured_topic_codes(cache, WORDS, target_rate=1.5)


def test_the_two_objectives_by_hand():
    # one position where a topic word could follow (rate 0.1) and one where none could
    # (1e-6): the mean log and the log of the mean weigh them differently
    f = Forcing(
        topic_rate=(0.1 + 1e-6) / 2, topic_log_prob=(math.log(0.1) + math.log(1e-6)) / 2, cost=0.0
    )
    assert f.score("log_prob") == pytest.approx((math.log(0.1) + math.log(1e-6)) / 2)
    assert f.score("rate") == pytest.approx(math.log((0.1 + 1e-6) / 2))
    # raising the impossible position tenfold: the same gain in mean log as raising the
    # likely one tenfold would be, but next to nothing in rate
    g = Forcing((0.1 + 1e-5) / 2, (math.log(0.1) + math.log(1e-5)) / 2, 0.0)
    h = Forcing((1.0 + 1e-6) / 2, (math.log(1.0) + math.log(1e-6)) / 2, 0.0)
    assert g.score("log_prob") - f.score("log_prob") == pytest.approx(math.log(10) / 2)
    assert h.score("log_prob") - f.score("log_prob") == pytest.approx(math.log(10) / 2)
    assert g.score("rate") - f.score("rate") == pytest.approx(math.log(1 + 9e-6 / 0.100001))
    assert h.score("rate") - f.score("rate") == pytest.approx(math.log(1.000001 / 0.100001))


def test_measured_topic_codes_by_rate(cache):
    model = cache.model().model
    found = measured_topic_codes(
        cache,
        WORDS,
        candidates_per_group=3,
        target_rate=0.5,
        max_cost=0.5,
        blocks=2,
        min_count=2,
        objective="rate",
    )
    assert found.codes
    ids = topic_tokens(cache, WORDS)
    tokens = np.asarray(cache.token_ids, dtype=np.int64)
    held = torch.from_numpy(tokens[tokens.size - 64 :].copy()).view(2, 32)
    plain = forced_log_probs(model, held, [])
    # every candidate's gain is the log of its rate alone over the rate unforced
    for cand in found.candidates:
        alone = forcing_of(forced_log_probs(model, held, [cand["code"]]), plain, ids)
        expected = math.log(alone.topic_rate / found.before.topic_rate)
        assert cand["gain"] == pytest.approx(expected, rel=1e-4, abs=1e-6)
    # each step of the path raises the mean topic probability within the cost
    previous = found.before.topic_rate
    for step in found.path:
        assert step.topic_rate > previous and step.cost <= 0.5 + 1e-9
        previous = step.topic_rate
    with pytest.raises(SearchError, match="objective"):
        measured_topic_codes(cache, WORDS, objective="share")


def test_a_search_reuses_the_forcings_another_measured(cache, monkeypatch):
    args = dict(candidates_per_group=3, target_rate=0.5, max_cost=0.5, blocks=2, min_count=2)
    alone = measured_topic_codes(cache, WORDS, objective="rate", **args)
    calls = []
    real = tc.forced_log_probs

    def counted(model, contexts, codes, mode="replace_last", strength=1.0):
        calls.append(tuple(sorted(codes)))
        return real(model, contexts, codes, mode, strength)

    monkeypatch.setattr(tc, "forced_log_probs", counted)
    measured: dict = {}
    first = measured_topic_codes(cache, WORDS, objective="log_prob", measured=measured, **args)
    second = measured_topic_codes(cache, WORDS, objective="rate", measured=measured, **args)
    # every code set measured once per search, and the second search measured only the
    # sets the first one had not (each search measures the unforced model itself)
    forced = [c for c in calls if c]
    assert len(forced) == len(set(forced)) == len(measured)
    assert all(len(c) == 1 for c in forced[: len(first.candidates)])
    # the shared measurements change nothing: the same path as a search of its own
    assert second.codes == alone.codes
    steps = [(f.topic_rate, f.topic_log_prob, f.cost) for f in second.path]
    assert steps == [(f.topic_rate, f.topic_log_prob, f.cost) for f in alone.path]
    assert second.candidates == alone.candidates


def _table_measure(table: dict[frozenset, tuple[float, float]], names: dict):
    """A measure from a table of code sets (by the codes' ``names``) to (gain of the
    topic log-probability, cost)."""

    def measure(codes):
        gain, cost = table[frozenset(names[c] for c in codes)]
        return Forcing(topic_rate=1e-4, topic_log_prob=-10.0 + gain, cost=cost)

    return measure


BEFORE = Forcing(topic_rate=1e-4, topic_log_prob=-10.0, cost=0.0)


def test_greedy_takes_the_complement_where_the_ranking_takes_the_redundant_code():
    # A and B push the same words (together barely more than A), C pushes others: alone,
    # A gains 2 per nat, B 1.8 and C 1.5; with A chosen, B adds 0.2 and C 1.5
    table = {
        frozenset("A"): (2.0, 1.0),
        frozenset("B"): (1.8, 1.0),
        frozenset("C"): (1.5, 1.0),
        frozenset("AB"): (2.2, 2.0),
        frozenset("AC"): (3.5, 2.0),
        frozenset("BC"): (3.3, 2.0),
        frozenset("ABC"): (3.6, 3.0),
    }
    a, b, c = CodeRef("h0", 0), CodeRef("h1", 0), CodeRef("h2", 0)
    measure = _table_measure(table, {a: "A", b: "B", c: "C"})
    room = lambda ref: 4  # noqa: E731
    codes, path = ranked_path([a, b, c], measure, BEFORE, "log_prob", 0.5, 2.0, room)
    assert codes == [a, b] and path[-1].topic_log_prob == pytest.approx(-7.8)
    codes, path = greedy_path([a, b, c], measure, BEFORE, "log_prob", 0.5, 2.0, room)
    assert codes == [a, c] and path[-1].topic_log_prob == pytest.approx(-6.5)
    assert [f.cost for f in path] == [1.0, 2.0]
    # without a cost limit both end with all three, each in its own order
    assert ranked_path([a, b, c], measure, BEFORE, "log_prob", 0.5, 9.0, room)[0] == [a, b, c]
    assert greedy_path([a, b, c], measure, BEFORE, "log_prob", 0.5, 9.0, room)[0] == [a, c, b]
    # a full group takes no more codes: with A and C in one group with room for one
    # code, the greedy path takes A, then B
    a2, c2 = CodeRef("h0", 0), CodeRef("h0", 1)
    measure = _table_measure(table, {a2: "A", b: "B", c2: "C"})
    assert greedy_path([a2, b, c2], measure, BEFORE, "log_prob", 0.5, 9.0, lambda r: 1)[0] == [
        a2,
        b,
    ]
    # the search stops once the topic rate reaches the target: none is forced when the
    # model already meets it
    met = Forcing(topic_rate=0.6, topic_log_prob=-1.0, cost=0.0)
    assert greedy_path(
        [a, b, c], _table_measure(table, {a: "A", b: "B", c: "C"}), met, "log_prob", 0.5, 9.0, room
    ) == ([], [])


def _brute_force_greedy(candidates, measure, before, objective, target_rate, max_cost, room):
    """Every remaining candidate measured against the chosen set at every step."""
    chosen, path, after = [], [], before
    left = list(candidates)
    while left and after.topic_rate < target_rate:
        best = None
        for ref in left:
            if sum(c.group == ref.group and c.codebook == ref.codebook for c in chosen) >= room(
                ref
            ):
                continue
            trial = measure([*chosen, ref])
            if trial.cost > max_cost or trial.score(objective) <= after.score(objective):
                continue
            gain = trial.score(objective) - after.score(objective)
            ratio = gain / max(trial.cost - after.cost, 1e-3)
            if best is None or ratio > best[0]:
                best = (ratio, ref, trial)
        if best is None:
            break
        chosen.append(best[1])
        path.append(best[2])
        left.remove(best[1])
        after = best[2]
    return chosen, path


@pytest.mark.parametrize("seed", range(6))
def test_the_lazy_greedy_path_is_the_brute_force_one_where_returns_diminish(seed):
    # the objective is concave in a sum of weights (sqrt) and costs add up, so a code's
    # gain per cost only falls as the set grows: the lazy search must find the path that
    # measures every candidate at every step, with fewer measurements
    rng = np.random.default_rng(seed)
    n = 12
    weights = rng.uniform(0.1, 2.0, n)
    costs = rng.uniform(0.05, 0.5, n)
    refs = [CodeRef(f"cb{i % 3}", i, i % 2) for i in range(n)]
    index = {r: i for i, r in enumerate(refs)}

    def measure(codes, log=None):
        if log is not None:
            log.append(1)
        w = sum(weights[index[c]] for c in codes)
        rate = 1e-4 * (1 + w)
        return Forcing(rate, -10.0 + math.sqrt(w), float(sum(costs[index[c]] for c in codes)))

    lazy_log, brute_log = [], []
    room = lambda ref: 2  # noqa: E731
    target = 1e-4 * (1 + 0.7 * weights.sum())
    lazy = greedy_path(refs, lambda c: measure(c, lazy_log), BEFORE, "log_prob", target, 1.5, room)
    brute = _brute_force_greedy(
        refs, lambda c: measure(c, brute_log), BEFORE, "log_prob", target, 1.5, room
    )
    assert lazy[0] == brute[0] and len(lazy[0]) >= 2
    assert [f.cost for f in lazy[1]] == pytest.approx([f.cost for f in brute[1]])
    assert len(lazy_log) < len(brute_log)
    # every step within the budget and the group limits, the objective rising
    assert all(f.cost <= 1.5 for f in lazy[1])
    scores = [BEFORE.topic_log_prob] + [f.topic_log_prob for f in lazy[1]]
    assert all(b > a for a, b in zip(scores[:-1], scores[1:], strict=True))


def test_measured_topic_codes_by_either_search(cache):
    args = dict(candidates_per_group=3, target_rate=0.5, max_cost=0.5, blocks=2, min_count=2)
    greedy = measured_topic_codes(cache, WORDS, **args)
    ranked = measured_topic_codes(cache, WORDS, search="ranked", **args)
    # the same candidates, measured alone, feed both searches
    assert greedy.candidates == ranked.candidates and greedy.codes and ranked.codes
    # the greedy path's first code is the best candidate alone (gain per cost), as the
    # ranked one's is
    assert greedy.codes[0] == ranked.codes[0]
    with pytest.raises(SearchError, match="search"):
        measured_topic_codes(cache, WORDS, search="beam", **args)


def test_top_per_group_by_hand():
    refs = [CodeRef("a", 1, 0), CodeRef("a", 2, 1), CodeRef("a", 3, 0), CodeRef("b", 4, 0)]
    refs += [CodeRef("a", 5, 0), CodeRef("a", 6, 1)]
    assert top_per_group(refs, 1) == [refs[0], refs[1], refs[3]]
    # the third code of group ("a", 0) is left out, the second of ("a", 1) kept
    assert top_per_group(refs, 2) == [refs[0], refs[1], refs[2], refs[3], refs[5]]


def test_screen_is_the_brute_force_ranking(cache):
    model = cache.model().model
    tokens = topic_tokens(cache, WORDS)
    ids = np.asarray(cache.token_ids, dtype=np.int64)
    contexts = torch.from_numpy(ids[: 2 * 32].copy()).view(2, 32)
    refs = [
        CodeRef(key, c, g)
        for key, cb in model.codebooks.items()
        for g in range(cb.groups)
        for c in range(6)
    ]
    # by brute force: each code forced alone, its gain of the mean log topic probability
    # per fluency cost (at least MIN_COST), the raising ones best first, 2 per group
    plain = forced_log_probs(model, contexts, [], "append")
    before = forcing_of(plain, plain, tokens)
    scored = []
    for order, ref in enumerate(refs):
        f = forcing_of(forced_log_probs(model, contexts, [ref], "append"), plain, tokens)
        gain = f.topic_log_prob - before.topic_log_prob
        if gain > 0:
            scored.append((-gain / max(f.cost, MIN_COST), order, ref))
    expected = top_per_group([r for _, _, r in sorted(scored)], 2)
    assert expected, "some code raises the topic on these contexts"
    memo: dict = {}
    got = screen(model, contexts, refs, tokens, 2, "append", 1.0, "log_prob", memo)
    assert got == expected
    assert set(memo) == set(refs)
    # a second screen with the memo forces nothing again, and ranks as before
    calls = []
    real = tc.forced_log_probs

    def counted(model, contexts, codes, *args):
        calls.append(codes)
        return real(model, contexts, codes, *args)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tc, "forced_log_probs", counted)
        again = screen(model, contexts, refs, tokens, 2, "append", 1.0, "log_prob", memo)
    assert again == expected and all(not codes for codes in calls)


def test_measured_topic_codes_from_a_screened_pool(cache):
    args = dict(target_rate=0.5, max_cost=0.5, blocks=2, min_count=2, mode="append")
    screened: dict = {}
    found = measured_topic_codes(
        cache, WORDS, candidates_per_group=2, screen_per_group=6, screened=screened, **args
    )
    # the pool: every group's 6 codes of largest first-order effect, forced alone on the
    # screening blocks (here both measuring blocks); the candidates: their best 2 by
    # measured gain per cost, so at most 2 per group, all from the pool
    effects = effect_topic_codes(cache, WORDS, min_count=2, max_frequency=0.05, limit=None)
    pool = top_per_group([h.ref for h in effects if h.effect > 0], 6)
    assert set(screened) == set(pool)
    names = [CodeRef.parse(c["code"]) for c in found.candidates]
    assert set(names) <= set(pool)
    per_group: dict = {}
    for ref in names:
        per_group[(ref.codebook, ref.group)] = per_group.get((ref.codebook, ref.group), 0) + 1
    assert max(per_group.values()) <= 2
    # a pool as large as the candidates is no screen at all: the same candidates
    # (those that raise the objective on the measuring blocks) as without one
    plain = measured_topic_codes(cache, WORDS, candidates_per_group=3, **args)
    wide = measured_topic_codes(cache, WORDS, candidates_per_group=3, screen_per_group=3, **args)
    assert {c["code"] for c in wide.candidates} == {c["code"] for c in plain.candidates}
    with pytest.raises(SearchError, match="screen_per_group"):
        measured_topic_codes(cache, WORDS, candidates_per_group=4, screen_per_group=2)
    with pytest.raises(SearchError, match="screen_blocks"):
        measured_topic_codes(cache, WORDS, screen_per_group=8, screen_blocks=0)
