"""Topic codes chosen by measuring what forcing them does."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers import save_tiny_bpe_codebook_model, tiny_cache

from codebook_lens.analysis.search import SearchError
from codebook_lens.analysis.topics import topic_token_ids
from codebook_lens.steering.intervene import Intervention, apply_intervention
from codebook_lens.steering.topic_codes import (
    Forcing,
    forced_log_probs,
    forcing_of,
    measured_topic_codes,
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
    same = forcing_of(plain, plain, [1])
    assert same.cost == pytest.approx(0.0, abs=1e-7)
    assert same.topic_rate == pytest.approx((0.25 + 0.1) / 2)
    assert same.topic_log_prob == pytest.approx((math.log(0.25) + math.log(0.1)) / 2)
    f = forcing_of(forced, plain, [1])
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
    ids = topic_token_ids(cache.model().codec, WORDS)
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
    ids = topic_token_ids(cache.model().codec, WORDS)
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
    import codebook_lens.steering.topic_codes as tc

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
