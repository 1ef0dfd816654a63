"""Token embeddings from co-occurrence counts: the counts, PPMI and the truncated SVD by
hand, and what the recipe is for: tokens of one subject end up near one another."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from codebook_lens.core.errors import CodebookLensError
from codebook_lens.data.cooccurrence import (
    cooccurrence_counts,
    cooccurrence_embeddings,
    ppmi,
    svd_embeddings,
)


def test_counts_by_hand():
    # stream 0 1 2 0; window 1 pairs (0,1) (1,2) (2,0); window 2 adds (0,2) (1,0)
    one = cooccurrence_counts(np.array([0, 1, 2, 0]), 3, 1)
    assert one.tolist() == [[0, 1, 1], [1, 0, 1], [1, 1, 0]]
    two = cooccurrence_counts(np.array([0, 1, 2, 0]), 3, 2)
    assert two.tolist() == [[0, 2, 2], [2, 0, 1], [2, 1, 0]]
    # a token next to itself counts both ways
    assert cooccurrence_counts(np.array([1, 1]), 2, 4).tolist() == [[0, 0], [0, 2]]


def test_ppmi_by_hand():
    counts = np.array([[0.0, 2.0], [2.0, 4.0]])
    total = 8.0
    rows = [2.0, 6.0]
    # alpha = 1: p(a, b) / (p(a) p(b)), positive part, 0 where nothing was counted
    expected = np.zeros((2, 2))
    for a, b in [(0, 1), (1, 0), (1, 1)]:
        expected[a, b] = max(0.0, math.log(counts[a, b] * total / (rows[a] * rows[b])))
    assert np.allclose(ppmi(counts, alpha=1.0), expected)
    assert expected[0, 1] > 0 and expected[1, 1] == 0  # log(8*4/36) < 0 is cut to 0
    # alpha smooths the context distribution: q = colsum ** alpha, normalised
    q = np.array(rows) ** 0.5
    q = q / q.sum()
    got = ppmi(counts, alpha=0.5)
    assert got[0, 1] == pytest.approx(max(0.0, math.log((2 / 8) / ((2 / 8) * q[1]))))
    with pytest.raises(CodebookLensError, match="too short"):
        ppmi(np.zeros((2, 2)))


def test_svd_embeddings_are_the_top_singular_directions():
    rng = np.random.default_rng(0)
    matrix = rng.random((60, 6)) @ rng.random((6, 50))  # rank 6
    u, s, _ = np.linalg.svd(matrix, full_matrices=False)
    got = svd_embeddings(matrix, 4)
    for j in range(4):
        ref = u[:, j] * math.sqrt(s[j])
        ref = ref * np.sign(ref[np.abs(ref).argmax()])  # the largest entry positive
        assert np.allclose(got[:, j], ref, atol=1e-8)
    # rows keep the inner products of the matrix's rank-4 approximation's left factor
    assert np.allclose(got @ got.T, (u[:, :4] * s[:4]) @ u[:, :4].T, atol=1e-8)
    with pytest.raises(CodebookLensError, match="dim"):
        svd_embeddings(matrix, 51)


def _two_subjects(seed: int = 0, docs: int = 300, length: int = 60) -> np.ndarray:
    """Documents alternately about subject A (tokens 1-5) or B (tokens 6-10), each
    word followed by a function token (11 or 12) and ending in 0."""
    rng = np.random.default_rng(seed)
    stream = []
    for d in range(docs):
        words = np.arange(1, 6) if d % 2 == 0 else np.arange(6, 11)
        for _ in range(length):
            stream += [int(rng.choice(words)), int(rng.integers(11, 13))]
        stream.append(0)
    return np.array(stream)


def test_tokens_of_one_subject_end_up_near_one_another():
    ids = _two_subjects()
    emb = cooccurrence_embeddings(ids, 16, 4, window=6, std=0.02)
    assert emb.shape == (16, 4) and emb.dtype == torch.float32
    unit = torch.nn.functional.normalize(emb[:13], dim=-1)
    cos = unit @ unit.T
    same = [cos[a, b] for a in range(1, 6) for b in range(1, 6) if a != b]
    same += [cos[a, b] for a in range(6, 11) for b in range(6, 11) if a != b]
    across = [cos[a, b] for a in range(1, 6) for b in range(6, 11)]
    assert min(same) > 0.8 and max(across) < 0.2
    # scaled to the network's initial scale; tokens never seen (13-15) get random rows
    assert emb[:13].std(correction=0).item() == pytest.approx(0.02, rel=1e-5)
    assert len({tuple(r.tolist()) for r in emb[13:]}) == 3
    # deterministic
    assert torch.equal(emb, cooccurrence_embeddings(torch.from_numpy(ids), 16, 4, window=6))


def test_bad_input_is_refused():
    with pytest.raises(CodebookLensError, match="window"):
        cooccurrence_counts(np.array([0, 1]), 2, 0)
    with pytest.raises(CodebookLensError, match=r"\[0, 2\)"):
        cooccurrence_counts(np.array([0, 2]), 2, 1)
