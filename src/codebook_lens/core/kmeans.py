"""k-means for codebook initialisation: k-means++ seeding and Lloyd iterations, per
group, with the codebook's own similarity for assignment."""

from __future__ import annotations

import torch

from codebook_lens.core.topk import flat_ids, topk_codes


@torch.no_grad()
def kmeans(
    a: torch.Tensor,
    num: int,
    similarity: str,
    iters: int = 10,
    generator: torch.Generator | None = None,
    chunk_mib: float | None = None,
) -> torch.Tensor:
    """``num`` centroids per group of ``a`` (``(N, G, d)``): ``(G, num, d)``.

    Seeds by k-means++; each iteration assigns every sample to its best centroid under
    ``similarity`` (cosine gives spherical assignment) and moves the centroids to the
    means. An empty cluster is re-seeded from a random sample.
    """
    n, groups, dim = a.shape
    cent = kmeans_plus_plus(a, num, generator)
    flat_samples = a.reshape(-1, dim)
    for _ in range(iters):
        ids = topk_codes(a, cent, 1, similarity, chunk_mib)
        flat = flat_ids(ids, num).view(-1)
        sums = torch.zeros(groups * num, dim, dtype=a.dtype, device=a.device)
        sums.index_add_(0, flat, flat_samples)
        counts = torch.bincount(flat, minlength=groups * num).to(a.dtype).unsqueeze(-1)
        empty = (counts == 0).view(groups, num)
        new = (sums / counts.clamp(min=1)).view(groups, num, dim)
        if empty.any():
            g_idx, c_idx = empty.nonzero(as_tuple=True)
            pick = torch.randint(0, n, (len(g_idx),), generator=generator).to(a.device)
            new[g_idx, c_idx] = a[pick, g_idx]
        cent = new
    return cent


@torch.no_grad()
def kmeans_plus_plus(
    a: torch.Tensor, num: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """``num`` seeds per group from ``a`` (``(N, G, d)``) by D^2 sampling: ``(G, num, d)``.

    With fewer samples than seeds, samples repeat with a little noise so that no two
    seeds coincide.
    """
    n, groups, dim = a.shape
    ag = a.transpose(0, 1)  # (G, N, d)
    seeds = torch.empty(groups, num, dim, dtype=a.dtype, device=a.device)
    rows = torch.arange(groups, device=a.device)
    first = torch.randint(0, n, (groups,), generator=generator).to(a.device)
    seeds[:, 0] = ag[rows, first]
    sq = ag.square().sum(-1)  # (G, N)

    def dist2(seed: torch.Tensor) -> torch.Tensor:  # (G, d) -> (G, N), no (G, N, d) temporary
        cross = torch.bmm(ag, seed.unsqueeze(-1)).squeeze(-1)
        return (sq - 2 * cross + seed.square().sum(-1, keepdim=True)).clamp_(min=0)

    d2 = dist2(seeds[:, 0])  # squared distance to the nearest seed
    # the uniform numbers of every draw at once, from the caller's generator (on the CPU),
    # in the order the draws take them; the draws run where the samples are (on a GPU,
    # a copy of the weights to the CPU per seed took 17 s per 9 x 10,000 seeds)
    uniforms = torch.rand(max(num - 1, 0), groups, 1, generator=generator, dtype=torch.float64)
    uniforms = uniforms.to(a.device)
    for j in range(1, num):
        weights = d2.clamp(min=0).double()
        empty = weights.sum(-1) <= 0
        weights[empty] = 1.0  # every sample already a seed: draw uniformly
        pick = weighted_draw(weights, uniform=uniforms[j - 1])
        seeds[:, j] = ag[rows, pick]
        d2 = torch.minimum(d2, dist2(seeds[:, j]))
    if n < num:
        jitter = torch.randn(seeds.shape, generator=generator).to(a.device)
        seeds += 1e-3 * seeds.norm(dim=-1, keepdim=True).clamp(min=1e-6) * jitter
    return seeds


def weighted_draw(
    weights: torch.Tensor,
    generator: torch.Generator | None = None,
    uniform: torch.Tensor | None = None,
) -> torch.Tensor:
    """One index per row of ``weights`` (``(G, N)``, non-negative, each row summing to
    more than 0), index i with probability ``weights[g, i] / weights[g].sum()``.

    ``uniform`` (``(G, 1)`` float64 in [0, 1), on the weights' device) is the draw's
    uniform number per row; without it one is drawn from ``generator`` on the CPU.

    Inverse-CDF sampling: one uniform number per row against the running sum, O(N) per
    row (``torch.multinomial`` took about 0.1 s per draw from 4 x 32,768 weights here,
    which made k-means++ seeding of a few thousand codes take minutes). A zero weight is
    never drawn.
    """
    cdf = weights.double().cumsum(-1)
    total = cdf[:, -1:]
    if uniform is None:
        uniform = torch.rand(total.shape, generator=generator, dtype=torch.float64)
        uniform = uniform.to(weights.device)
    u = uniform * total
    pick = torch.searchsorted(cdf, u, right=True).squeeze(-1)
    return pick.clamp_(max=weights.shape[-1] - 1)
