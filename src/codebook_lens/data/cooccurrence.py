"""Token embeddings from co-occurrence statistics of a corpus (PPMI and truncated SVD).

A network trained from scratch for minutes learns its token embeddings from few
examples of each token, so words of one subject (``sea``, ``ship``, ``waves``) need not
end up near one another. Word vectors from counts do that from one pass over the text:
count how often token ``b`` occurs within ``window`` tokens of token ``a``, turn the
counts into positive pointwise mutual information with the context distribution
smoothed (``p(b) ** alpha``, as in word2vec's negative sampling), and keep the top
``dim`` singular directions of that matrix, each token's row scaled by the square root
of the singular values. Tokens that share their neighbours share their direction.

:func:`cooccurrence_embeddings` is the whole recipe; the steps are public for tests.
"""

from __future__ import annotations

import numpy as np
import torch

from codebook_lens.core.errors import CodebookLensError

__all__ = ["cooccurrence_counts", "cooccurrence_embeddings", "ppmi", "svd_embeddings"]


def cooccurrence_counts(ids: np.ndarray, vocab_size: int, window: int) -> np.ndarray:
    """``(V, V)`` counts: entry ``[a, b]`` is how often token ``b`` occurs within
    ``window`` positions of an occurrence of ``a`` (either side; symmetric)."""
    ids = np.asarray(ids, dtype=np.int64).ravel()
    if window < 1:
        raise CodebookLensError(f"window must be >= 1, got {window}")
    if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
        raise CodebookLensError(f"token ids must be in [0, {vocab_size})")
    flat = np.zeros(vocab_size * vocab_size, dtype=np.float64)
    for d in range(1, min(window, ids.size - 1) + 1):
        pairs = ids[:-d] * vocab_size + ids[d:]
        flat += np.bincount(pairs, minlength=vocab_size * vocab_size)
    counts = flat.reshape(vocab_size, vocab_size)
    return counts + counts.T


def ppmi(counts: np.ndarray, alpha: float = 0.75) -> np.ndarray:
    """Positive pointwise mutual information of a co-occurrence matrix:
    ``max(0, log(c[a, b] * sum_b' q(b') / (row(a) * q(b))))`` with ``q = colsum ** alpha``
    (context smoothing), i.e. ``log p(a, b) / (p(a) p_alpha(b))``; 0 where a count is 0."""
    counts = np.asarray(counts, dtype=np.float64)
    total = counts.sum()
    if total <= 0:
        raise CodebookLensError("no co-occurrences to count: the text is too short")
    rows = counts.sum(1, keepdims=True)
    q = counts.sum(0, keepdims=True) ** alpha
    with np.errstate(divide="ignore", invalid="ignore"):
        pmi = np.log(counts / total) - np.log(rows / total) - np.log(q / q.sum())
    return np.where(counts > 0, np.maximum(pmi, 0.0), 0.0)


def svd_embeddings(
    matrix: np.ndarray, dim: int, *, oversample: int = 16, iterations: int = 4, seed: int = 0
) -> np.ndarray:
    """The rows of ``matrix`` in its top ``dim`` singular directions, scaled by the square
    root of the singular values (``U_d sqrt(S_d)``), each direction's sign fixed so that
    its largest entry is positive. By a seeded randomized range finder with ``iterations``
    power iterations (Halko, Martinsson and Tropp, 2011): seconds for a 4,096-token
    vocabulary, where a full SVD takes minutes on a small CPU."""
    a = np.asarray(matrix, dtype=np.float64)
    if dim < 1 or dim > min(a.shape):
        raise CodebookLensError(f"dim must be in 1..{min(a.shape)}, got {dim}")
    width = min(dim + oversample, min(a.shape))
    q = np.random.default_rng(seed).standard_normal((a.shape[1], width))
    q, _ = np.linalg.qr(a @ q)
    for _ in range(iterations):
        q, _ = np.linalg.qr(a.T @ q)
        q, _ = np.linalg.qr(a @ q)
    u, s, _ = np.linalg.svd(q.T @ a, full_matrices=False)
    u, s = (q @ u)[:, :dim], s[:dim]
    signs = np.sign(u[np.abs(u).argmax(0), np.arange(dim)])
    signs[signs == 0] = 1.0
    return u * signs * np.sqrt(s)


def cooccurrence_embeddings(
    ids: np.ndarray | torch.Tensor,
    vocab_size: int,
    dim: int,
    *,
    window: int = 8,
    std: float = 0.02,
    seed: int = 0,
) -> torch.Tensor:
    """``(vocab_size, dim)`` float32 embeddings of the tokens of ``ids`` (one token
    stream) from PPMI within ``window`` and truncated SVD, scaled to an overall standard
    deviation of ``std`` (that of the network's random initialisation). Tokens that never
    occur get random rows of that scale (seeded), so that no two are the same."""
    if isinstance(ids, torch.Tensor):
        ids = ids.cpu().numpy()
    vectors = svd_embeddings(ppmi(cooccurrence_counts(ids, vocab_size, window)), dim)
    seen = np.bincount(np.asarray(ids, dtype=np.int64).ravel(), minlength=vocab_size) > 0
    vectors = vectors * (std / vectors[seen].std())
    rng = np.random.default_rng(seed)
    vectors[~seen] = rng.normal(0.0, std, size=(int((~seen).sum()), dim))
    return torch.from_numpy(vectors.astype(np.float32))
