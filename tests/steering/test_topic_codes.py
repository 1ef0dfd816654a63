"""Topic codes chosen by measuring what forcing them does."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers import corpus_text, save_tiny_bpe_codebook_model

from codebook_lens.analysis.search import SearchError
from codebook_lens.analysis.topics import topic_token_ids
from codebook_lens.cache.build import build_cache
from codebook_lens.cache.store import CodeCache
from codebook_lens.core.loading import load_codebook_model
from codebook_lens.steering.intervene import Intervention, apply_intervention
from codebook_lens.steering.topic_codes import measure_forcing, measured_topic_codes

WORDS = ["boat", "apple", "tree"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("steer")
    loaded = load_codebook_model(save_tiny_bpe_codebook_model(root))
    docs = [corpus_text(12, seed=s) for s in range(4)]
    build_cache(loaded, docs, root / "cache", corpus_name="t", seq_len=32, batch_size=8)
    return CodeCache.open(root / "cache")


def test_measure_forcing_by_hand(cache):
    model = cache.model().model
    blocks = torch.from_numpy(np.asarray(cache.token_ids[:64], dtype=np.int64)).view(2, 32)
    ids = [5, 7]
    plain = measure_forcing(model, blocks, ids, [])
    with torch.no_grad():
        p = model(blocks).logits.softmax(-1)
    assert plain.topic_log_prob == pytest.approx(p[..., ids].sum(-1).log().mean().item(), rel=1e-5)
    nll = -p[:, :-1].gather(-1, blocks[:, 1:, None]).log().mean().item()
    assert plain.loss == pytest.approx(nll, rel=1e-5)
    code = "layer1_mlp:3"
    forced = measure_forcing(model, blocks, ids, [code])
    with torch.no_grad(), apply_intervention(model, Intervention([code])):
        q = model(blocks).logits.softmax(-1)
    assert forced.topic_log_prob == pytest.approx(q[..., ids].sum(-1).log().mean().item(), rel=1e-5)


def test_measured_topic_codes_keep_their_promises(cache):
    model = cache.model().model
    found = measured_topic_codes(
        cache, WORDS, candidates_per_group=3, target_rate=0.5, max_damage=0.5, blocks=2, min_count=2
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
    again = measure_forcing(model, held, ids, found.codes)
    assert again.topic_log_prob == pytest.approx(found.after.topic_log_prob, rel=1e-5)
    assert found.after.topic_log_prob > found.before.topic_log_prob
    assert found.after.loss - found.before.loss <= 0.5 + 1e-9


def test_measured_topic_codes_stop_at_the_target(cache):
    # a target the model already meets: nothing to force
    rate = 1e-12
    found = measured_topic_codes(cache, WORDS, target_rate=rate, blocks=2, min_count=2)
    assert found.before.topic_log_prob >= math.log(rate) and found.codes == []
    with pytest.raises(SearchError, match="target_rate"):
        measured_topic_codes(cache, WORDS, target_rate=1.5)
