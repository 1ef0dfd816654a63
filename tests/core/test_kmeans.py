"""k-means++ seeding draws samples in proportion to their weights."""

from __future__ import annotations

import torch

from codebook_lens.core.kmeans import kmeans_plus_plus, weighted_draw


def test_weighted_draw_follows_the_weights_and_never_draws_a_zero():
    weights = torch.tensor([[0.0, 1.0, 3.0, 0.0, 4.0], [5.0, 0.0, 0.0, 0.0, 0.0]])
    gen = torch.Generator().manual_seed(0)
    draws = torch.stack([weighted_draw(weights, gen) for _ in range(20000)])  # (20000, 2)
    assert (draws[:, 1] == 0).all()
    counts = torch.bincount(draws[:, 0], minlength=5).double() / draws.shape[0]
    assert counts[0] == 0 and counts[3] == 0
    expected = (weights[0] / weights[0].sum()).double()
    assert torch.allclose(counts, expected, atol=0.015)


def test_kmeans_plus_plus_seeds_are_distinct_samples():
    gen = torch.Generator().manual_seed(1)
    a = torch.randn(300, 2, 8, generator=gen)
    seeds = kmeans_plus_plus(a, 40, torch.Generator().manual_seed(2))
    assert seeds.shape == (2, 40, 8)
    for g in range(2):
        # every seed is one of the group's samples, and no sample is drawn twice
        match = (seeds[g][:, None, :] == a[:, g][None]).all(-1)
        assert (match.sum(1) == 1).all()
        assert len(set(match.float().argmax(1).tolist())) == 40
