"""Several regexes' neuron curves in one pair of passes equal each regex's own curve."""

from __future__ import annotations

import pytest
from helpers import save_tiny_codebook_model, tiny_cache

from codebook_lens.analysis.neurons import neuron_curve, neuron_curves
from codebook_lens.analysis.search import SearchError, matching_tokens

PATTERNS = [r"\b(19|20)\d\d\b", r"\b(January|February|March|April|May|June)\b", r"[a-z]s\b"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("curves")
    model_dir = save_tiny_codebook_model(root)
    return tiny_cache(root, model_dir, docs=3, lines=10, seq_len=16, batch_size=16)


def test_neuron_curves_equal_one_curve_per_mask(cache):
    masks = [matching_tokens(cache, p) for p in PATTERNS]
    recalls = [[0.3, 1.0], [0.5], [0.2, 0.6, 0.9]]
    together = neuron_curves(cache, masks, recalls, batch_size=3, sample_positives=7, seed=4)
    for mask, rs, got in zip(masks, recalls, together, strict=True):
        alone = neuron_curve(cache, mask, rs, batch_size=5, sample_positives=7, seed=4)
        assert [[s.to_dict() for s in sites] for sites in got] == [
            [s.to_dict() for s in sites] for sites in alone
        ]


def test_neuron_curves_refuse_mismatched_arguments(cache):
    mask = matching_tokens(cache, PATTERNS[0])
    with pytest.raises(SearchError, match="2 token masks but 1 lists"):
        neuron_curves(cache, [mask, mask], [[0.5]])
    with pytest.raises(SearchError, match="no token matches"):
        neuron_curves(cache, [mask, mask & False], [[0.5], [0.5]])
