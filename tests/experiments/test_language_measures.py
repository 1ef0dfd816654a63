"""The natural-language measurements against hand-computed values on hand-made data."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers import tiny_model

from codebook_lens.analysis.neurons import NeuronScore
from codebook_lens.analysis.search import CodeScore
from codebook_lens.core.errors import CodebookLensError
from codebook_lens.core.refs import CodeRef
from codebook_lens.experiments.language import measures as M

# ----------------------------------------------------------------------------------------
# LM quality


def test_token_stats_by_hand():
    # vocabulary of 2; one sequence [0, 1, 1]: positions 0 and 1 predict 1 and 1
    logits = torch.tensor([[[0.0, 0.0], [math.log(3.0), 0.0], [5.0, 5.0]]])
    ids = torch.tensor([[0, 1, 1]])
    s = M.token_stats(logits, ids)
    # p(1) = 1/2 at position 0, 1/4 at position 1
    assert s.count == 2
    assert s.nll == pytest.approx(math.log(2) + math.log(4))
    # argmax at position 0 is a tie (index 0 wins, wrong); at position 1 it is 0 (wrong)
    assert s.correct == 0
    teacher = torch.tensor([[[math.log(3.0), 0.0], [0.0, 0.0], [0.0, 0.0]]])
    s = M.token_stats(logits, ids, teacher)
    # KL(p||q) with p = (3/4, 1/4), q = (1/2, 1/2); then p = (1/2, 1/2), q = (3/4, 1/4)
    kl1 = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    kl2 = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)
    assert s.kl == pytest.approx(kl1 + kl2)


def test_lm_metrics_averages_over_positions_of_all_batches():
    table = torch.log(torch.tensor([[0.1, 0.9], [0.6, 0.4]]))  # a bigram model

    def logits_of(ids):
        return table[ids]

    batches = [torch.tensor([[0, 1, 0]]), torch.tensor([[1, 1], [0, 0]])]
    out = M.lm_metrics(logits_of, batches, teacher_of=logits_of)
    # predictions: 0->1 (0.9), 1->0 (0.6), 1->1 (0.4), 0->0 (0.1)
    nll = -(math.log(0.9) + math.log(0.6) + math.log(0.4) + math.log(0.1))
    assert out["loss"] == pytest.approx(nll / 4)
    # argmax after 0 is 1, after 1 is 0: right on the first two, wrong on the others
    assert out["accuracy"] == pytest.approx(0.5)
    assert out["kl"] == pytest.approx(0.0, abs=1e-7)


def test_gap_recovered_by_hand():
    assert M.gap_recovered(3.0, 3.1, 5.0) == pytest.approx(0.95)
    assert M.gap_recovered(3.0, 3.0, 5.0) == pytest.approx(1.0)
    assert M.gap_recovered(3.0, 5.5, 5.0) == pytest.approx(-0.25)
    with pytest.raises(CodebookLensError, match="must exceed the base loss"):
        M.gap_recovered(3.0, 3.1, 2.9)


def test_site_means_and_mean_ablation():
    torch.manual_seed(0)
    base = tiny_model("gpt_neox").eval()
    placement = {"a": ("attn", 0), "m": ("mlp", 0), "a1": ("attn", 1), "m1": ("mlp", 1)}
    batches = [torch.randint(0, 50, (2, 7)), torch.randint(0, 50, (3, 7))]
    means = M.site_means(base, placement, batches)
    # the mean of the MLP output of layer 0, read by hand with a forward hook
    seen = []
    mlp = base.gpt_neox.layers[0].mlp
    h = mlp.register_forward_hook(lambda m, a, out: seen.append(out.reshape(-1, out.shape[-1])))
    with torch.no_grad():
        for ids in batches:
            base(input_ids=ids)
    h.remove()
    assert torch.allclose(means["m"], torch.cat(seen).mean(0), atol=1e-6)
    ids = torch.randint(0, 50, (1, 9))
    with torch.no_grad():
        clean = base(input_ids=ids).logits
        with M.mean_ablation(base, placement, means):
            ablated = base(input_ids=ids).logits
            # with every attention block ablated the model cannot look back: the last
            # position's prediction depends on the last token only
            other = ids.clone()
            other[0, :-1] = (other[0, :-1] + 7) % 50
            moved = base(input_ids=other).logits
        again = base(input_ids=ids).logits
    assert not torch.allclose(clean, ablated)
    assert torch.allclose(ablated[0, -1], moved[0, -1], atol=1e-5)
    assert torch.equal(clean, again)  # the hooks are gone after the block


# ----------------------------------------------------------------------------------------
# power law


def test_power_law_fit_recovers_an_exact_power_law():
    ranks = np.arange(1, 201)
    counts = 5000.0 * ranks**-1.3
    rng = np.random.default_rng(0)
    fit = M.power_law_fit(np.concatenate([rng.permutation(counts), np.zeros(50)]))
    assert fit.exponent == pytest.approx(1.3)
    assert fit.scale == pytest.approx(5000.0)
    assert fit.r2 == pytest.approx(1.0)
    assert fit.codes == 200


def test_power_law_fit_by_hand_on_three_points():
    # log-log points (0, log 8), (log 2, log 2), (log 3, log 2): least squares by hand
    fit = M.power_law_fit([2, 8, 2])
    x = np.log([1.0, 2.0, 3.0])
    y = np.log([8.0, 2.0, 2.0])
    slope = ((x - x.mean()) * (y - y.mean())).sum() / ((x - x.mean()) ** 2).sum()
    assert fit.exponent == pytest.approx(-slope)
    with pytest.raises(CodebookLensError, match="at least 2 codes"):
        M.power_law_fit([0, 3, 0])


# ----------------------------------------------------------------------------------------
# codes against neurons


def _code(code: int, precision: float, recall: float, count: int) -> CodeScore:
    return CodeScore(
        CodeRef("layer0_mlp", code), precision, recall, round(precision * count), count
    )


def test_regex_code_takes_the_most_precise_eligible_code():
    scores = [
        _code(1, 1.0, 0.02, 40),  # precise but catches too little
        _code(2, 0.97, 0.30, 5),  # too few activations
        _code(3, 0.90, 0.20, 50),
        _code(4, 0.90, 0.40, 80),  # ties with 3 on precision, higher recall
        _code(5, 0.60, 0.90, 300),
    ]
    assert M.regex_code(scores, min_count=10, min_recall=0.1).ref.code == 4
    assert M.regex_code(scores, min_count=1, min_recall=0.1).ref.code == 2
    assert M.regex_code(scores, min_count=10, min_recall=0.5).ref.code == 5
    assert M.regex_code(scores, min_count=10, min_recall=0.95) is None


def test_lead_summary_by_hand():
    def neuron(p):
        return NeuronScore("layer0_mlp_hidden", 3, 1, 0.5, p, 0.3)

    rows = [
        M.RegexComparison("a", "a", 10, _code(1, 0.9, 0.3, 20), neuron(0.6)),  # +30
        M.RegexComparison("b", "b", 10, _code(2, 0.5, 0.3, 20), neuron(0.7)),  # -20
        M.RegexComparison("c", "c", 10, _code(3, 0.8, 0.3, 20), neuron(0.7)),  # +10
        M.RegexComparison("d", "d", 10, None, neuron(0.7)),  # no code: -100
    ]
    assert rows[0].lead == pytest.approx(0.3)
    out = M.lead_summary(rows)
    assert out["codes_win_share"] == pytest.approx(0.5)
    assert out["median_lead_points"] == pytest.approx((-20 + 10) / 2)
    assert out["mean_code_precision"] == pytest.approx((0.9 + 0.5 + 0.8 + 0.0) / 4)


# ----------------------------------------------------------------------------------------
# steering


def test_topic_share_counts_whole_words_ignoring_case():
    texts = ["The SHIP sailed.", "a shipment arrived", "ships and boats", "nothing here"]
    assert M.topic_share(texts, ["ship", "ships"]) == pytest.approx(0.5)
    assert M.topic_share(texts, ["boats"]) == pytest.approx(0.25)
    with pytest.raises(CodebookLensError):
        M.topic_share([], ["ship"])


def test_first_on_topic_takes_the_first_steered_mention_with_its_seeds_unsteered_sample():
    samples = [
        {"prompt": "The", "baseline": ["a ship", "b"], "steered": ["no", "shipment"]},
        {"prompt": "It was", "baseline": ["c", "d"], "steered": ["e", "Ships ahoy"]},
        {"prompt": "In the", "baseline": ["f"], "steered": ["a ship"]},
    ]
    # the unsteered "a ship" does not count, nor "shipment": the second prompt's second seed
    assert M.first_on_topic(samples, ["ship", "ships"]) == ("It was", "d", "Ships ahoy")
    assert M.first_on_topic(samples, ["boat"]) is None


def test_excerpt_cuts_at_words_around_the_first_topic_word_and_brackets_every_one():
    assert M.excerpt("a  b\nc fire d", ["fire"]) == "a b c [fire] d"
    assert M.excerpt("no topic here", ["fire"]) == "no topic here"
    text = " ".join(f"w{i:02d}" for i in range(40)) + " Fire and fire"  # w00 .. w39
    # width 30: from 10 characters before the word, which falls inside "w37", so from the
    # next whole word on
    got = M.excerpt(text, ["fire"], width=30)
    assert got == "... w38 w39 [Fire] and [fire]"
    text = "fire " + " ".join(f"w{i:02d}" for i in range(40))
    # 20 characters, "fire w00 w01 w02 w03", end at a word; 22 would end inside "w04"
    for width in (20, 22):
        assert M.excerpt(text, ["fire"], width=width) == "[fire] w00 w01 w02 w03 ..."
    with pytest.raises(CodebookLensError):
        M.excerpt("fire", ["fire"], width=5)


def test_needed_topic_rate_by_hand():
    # one token: the rate is the share itself; two tokens at r = 1 - sqrt(0.4) mention the
    # topic with probability 1 - (1 - r)^2 = 0.6
    assert M.needed_topic_rate(1) == pytest.approx(0.6)
    assert M.needed_topic_rate(2) == pytest.approx(1 - math.sqrt(0.4))
    assert M.needed_topic_rate(32, share=0.5) == pytest.approx(1 - 0.5 ** (1 / 32))
    assert 1 - (1 - M.needed_topic_rate(32)) ** 32 == pytest.approx(0.6)
    for bad in ((0, 0.6), (32, 1.0), (32, -0.1)):
        with pytest.raises(CodebookLensError):
            M.needed_topic_rate(*bad)


def test_continuation_nll_and_fluency_cost_by_hand():
    # a bigram model over 3 tokens
    probs = torch.tensor([[0.5, 0.25, 0.25], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6]])
    table = probs.log()

    def logits_of(ids):
        return table[ids]

    nll, n = M.continuation_nll(logits_of, [0], [[1, 1], [2], [0, 2]])
    expected = -(math.log(0.25) + math.log(0.8) + math.log(0.25) + math.log(0.5) + math.log(0.25))
    assert n == 5
    assert nll == pytest.approx(expected, rel=1e-6)
    base = M.continuation_nll(logits_of, [0], [[0, 0]])  # 2 x log 2
    assert M.fluency_cost((nll, n), base) == pytest.approx(expected / 5 - math.log(2), rel=1e-6)
    with pytest.raises(CodebookLensError):
        M.fluency_cost((1.0, 0), base)
