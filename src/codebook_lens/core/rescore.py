"""The result rule of the nearest-code search, and the float64 rescoring that enforces it.

Rule: the ids are the k codes of highest *exact score*, best first, ties to the lower
id. The exact score is evaluated in float64 in a fixed order from the activation ``x``
and the stored code ``w`` (both as given, upcast exactly to float64):

- products ``x_i * w_i`` (and ``w_i * w_i``), zero-padded to a power-of-two width and
  summed pairwise (``p[i] + p[i + h]`` for h = width/2, ..., 1): ``dot`` and ``sq``;
- inner product: ``dot``; cosine: ``dot * |dot| / max(sq, 1e-24)`` (which ranks codes
  as ``dot / |w|`` does, without a square root: libraries round that differently);
  euclidean: ``2 * dot - sq`` (which ranks codes as ``-|x - w|^2`` does).
- every operation is one IEEE-754 float64 multiply, add, subtract or divide, so any
  device computes the same bits.

The fast stage scores codes in float32 (float64 for float64 inputs) with whatever
blocking the BLAS chooses, and keeps every code within ``tol`` of the running k-th
best, ``tol`` being twice a bound on that stage's error (:func:`tolerances`), so the
true top k is always among the candidates; candidates closer to each other than ``tol``
are rescored exactly here (the compiled kernel does the same in C++, bit for bit). The
ids therefore depend only on ``x`` and ``w``: not on chunking, tiles, threads, the BLAS,
the SIMD level or which of the two paths ran.

Two cases fall outside: an activation of exactly zero under cosine or inner product
gets ids 0..k-1 (all its exact scores are 0), and an activation or code with a
non-finite value gets the fast stage's ranking (no promise).
"""

from __future__ import annotations

import torch

MODES = {"inner_product": 0, "cosine": 1, "euclidean": 2}
MARGIN = 2.5  # tol = MARGIN x the error bound (2 would do; the rest covers rounding of tol)


def _tree_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The pairwise sum of ``a * b`` over the last dimension zero-padded to a power of
    two, in float64 (products of float32 or narrower values are exact in float64).

    One buffer with the summed dimension first, so that each level, ``p[i] += p[i + h]``
    for h = width/2, ..., 1, adds two contiguous halves in place.
    """
    shape = torch.broadcast_shapes(a.shape[:-1], b.shape[:-1])
    dim = a.shape[-1]
    p = torch.zeros(_width(dim), *shape, dtype=torch.float64, device=a.device)
    head = p[:dim]
    head.copy_(a.expand(*shape, dim).movedim(-1, 0))
    head.mul_(b.expand(*shape, dim).movedim(-1, 0))
    h = p.shape[0] // 2
    while h >= 1:
        p[:h].add_(p[h : 2 * h])
        h //= 2
    return p[0].clone()


def exact_scores(x: torch.Tensor, w: torch.Tensor, similarity: str) -> torch.Tensor:
    """The exact (fixed-order float64) score of ``x`` against ``w``; shapes broadcast over
    all dimensions but the last: ``(...)`` float64."""
    dot = _tree_dot(x, w)
    if similarity == "inner_product":
        return dot
    sq = _tree_dot(w, w)
    if similarity == "cosine":
        return dot * dot.abs() / sq.clamp(min=1e-24)
    return 2 * dot - sq


def error_unit(dtype: torch.dtype, device: torch.device, dim: int) -> float:
    """Bound on the fast stage's error relative to ``alpha |x| K + B`` (see
    :func:`tolerances`): a float32 (or float64) dot product of width ``dim`` from keys
    normalised in that precision, plus the input rounding of a reduced-precision matmul
    mode (TF32 or bfloat16) where one is allowed."""
    unit = (2 * dim + 16) * (2.0**-53 if dtype == torch.float64 else 2.0**-24)
    if dtype != torch.float64:
        precision = torch.get_float32_matmul_precision()
        tf32 = device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32
        if precision == "medium":
            unit += 2.0**-7  # bfloat16 inputs
        elif precision == "high" or tf32:
            unit += 2.0**-10  # TF32 inputs
    return unit


def tolerances(
    norms: torch.Tensor, similarity: str, unit: float, dim: int, tiny: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per group ``(tol_a, tol_b)`` (float64, ``(G,)``): a token's tolerance is
    ``tol_a * |x| + tol_b``. ``norms``: the codes' norms ``(G, C)``."""
    norms = norms.double()
    big = norms.amax(dim=-1)
    if similarity == "cosine":
        alpha, reach, bias = 1.0, (norms / norms.clamp(min=1e-12)).amax(dim=-1), 0.0 * big
    elif similarity == "inner_product":
        alpha, reach, bias = 1.0, big, 0.0 * big
    else:
        alpha, reach, bias = 2.0, big, big * big
    scale = torch.where(norms > 0, 1 / norms.clamp(min=1e-12), 1.0).amax(dim=-1).clamp(min=1.0)
    floor = (dim + 2) * tiny * scale  # products that underflow
    return MARGIN * unit * alpha * reach, MARGIN * (unit * bias + floor)


def row_norms(x: torch.Tensor) -> torch.Tensor:
    """``|x|`` over the last dimension in float32 (float64 for float64 input), without a
    float64 copy of ``x``: only rows whose squares may have underflowed or overflowed in
    float32 are summed again in float64."""
    if x.dtype == torch.float64:
        return torch.linalg.vector_norm(x, dim=-1)
    norm = torch.linalg.vector_norm(x, dim=-1, dtype=torch.float32)
    info = torch.finfo(torch.float32)
    lo, hi = info.tiny**0.5 * 2.0**20, info.max**0.5 / 2.0**20
    low, high = torch.stack(torch.aminmax(norm)).tolist() if norm.numel() else (lo, hi)
    if not (lo <= low and high <= hi):  # also NaN
        redo = ~((norm >= lo) & (norm <= hi))
        norm[redo] = torch.linalg.vector_norm(x[redo].double(), dim=-1).float()
    return norm


def settle(
    scores: torch.Tensor,
    xg: torch.Tensor,
    tol_a: torch.Tensor,
    tol_b: torch.Tensor,
    weight: torch.Tensor,
    k: int,
    similarity: str,
    budget_bytes: float,
) -> torch.Tensor:
    """The ids of one chunk by the exact rule, from its fast scores.

    scores: ``(G, m, C)`` contiguous fast scores; xg: ``(G, m, d)`` the activations;
    tol_a, tol_b: ``(G,)`` the tolerance terms (:func:`tolerances`) in the scores'
    dtype; weight: ``(G, C, d)``. Returns ``(G, m, k)`` int64.

    A row whose top k + 1 fast scores are more than ``tol`` apart is settled as it stands
    (the fast order is the exact order there). The others take their top k + 8, or,
    where a code past those may still be within ``tol`` of the k-th best, a wider top
    (x4 until none can be), to :func:`resolve`.
    """
    groups, m, num_codes = scores.shape
    flat = scores.view(groups * m, num_codes)
    vals, idx = flat.topk(min(num_codes, k + 1), dim=-1, sorted=True)
    norm = row_norms(xg)  # (G, m)
    tol = torch.addcmul(tol_b[:, None], tol_a[:, None], norm).view(-1)
    # a gap rounded in the fast precision that is above tol (2.5 error bounds) is still
    # above two error bounds
    close = (vals[:, :-1] - vals[:, 1:]) <= tol[:, None]
    rows = close.any(-1).nonzero().squeeze(1)
    out = idx[:, :k]
    if rows.numel() == 0:
        return out.view(groups, m, k)
    out = out.clone()
    if similarity != "euclidean":  # a zero activation ties every code at 0
        zero = norm.view(-1)[rows] == 0
        out[rows[zero]] = torch.arange(k, device=out.device)
        rows = rows[~zero]
    per = max(1, flat.shape[0] // 4)  # the rows copied for a wider top: a quarter chunk
    for start in range(0, rows.numel(), per):
        todo = rows[start : start + per]
        width = min(num_codes, k + 8)
        while todo.numel():
            vals, idx = flat[todo].topk(width, dim=-1, sorted=True)
            t = tol[todo]
            over = (vals[:, -1].double() >= vals[:, k - 1].double() - t) & (width < num_codes)
            done = todo[~over]
            if done.numel():
                group, item = done // m, done % m
                out[done] = resolve(
                    vals[~over],
                    idx[~over],
                    t[~over],
                    xg,
                    group,
                    item,
                    weight,
                    k,
                    similarity,
                    budget_bytes,
                )
            todo, width = todo[over], min(num_codes, 4 * width)
    return out.view(groups, m, k)


def resolve(
    vals: torch.Tensor,
    idx: torch.Tensor,
    tol: torch.Tensor,
    xg: torch.Tensor,
    group: torch.Tensor,
    item: torch.Tensor,
    weight: torch.Tensor,
    k: int,
    similarity: str,
    budget_bytes: float,
) -> torch.Tensor:
    """The ids of each row by the exact rule, from a top ``M`` (> k) that holds every code
    within ``tol`` of the k-th best.

    vals, idx: ``(R, M)`` fast scores, descending, and their code ids; tol: ``(R,)``;
    row i is the activation ``xg[group[i], item[i]]`` (xg: ``(G, m, d)``) of group
    ``group[i]`` of ``weight`` (``(G, C, d)``). Candidates are split into clusters (runs closer than ``tol``); a cluster of
    one is ranked as it stands, the others by exact score, then id. Returns ``(R, k)``.
    """
    m_cand = vals.shape[1]
    close = (vals[:, :-1] - vals[:, 1:]) <= tol.to(vals.dtype)[:, None]  # adjacent within tol
    cluster = torch.cat(
        [torch.zeros_like(close[:, :1], dtype=torch.long), (~close).long().cumsum(-1)], -1
    )
    in_play = cluster <= cluster[:, k - 1 : k]
    need = torch.zeros_like(in_play)
    need[:, 1:] |= close
    need[:, :-1] |= close
    need &= in_play
    r, s = need.nonzero(as_tuple=True)
    exact = torch.zeros(vals.shape, dtype=torch.float64, device=vals.device)
    exact[r, s] = _pair_scores(xg, group[r], item[r], weight, idx[r, s], similarity, budget_bytes)
    # order: cluster ascending, exact score descending, id ascending (stable sorts)
    key_cluster = torch.where(in_play, cluster, cluster.new_tensor(m_cand + 1))
    perm = idx.argsort(dim=-1, stable=True)
    perm = perm.gather(-1, exact.gather(-1, perm).argsort(dim=-1, descending=True, stable=True))
    perm = perm.gather(-1, key_cluster.gather(-1, perm).argsort(dim=-1, stable=True))
    return idx.gather(-1, perm[:, :k])


RESCORE_BYTES = 32 * 1024 * 1024  # the float64 rescoring's working memory, at most


def _pair_scores(xg, group, item, weight, code_ids, similarity, budget_bytes) -> torch.Tensor:
    """Exact scores of activations ``xg[group, item]`` against codes ``weight[group,
    code_ids]``, gathered and scored in parts whose float64 work (about 4 products of the
    padded width per pair) stays under a quarter of the budget and :data:`RESCORE_BYTES`."""
    per = max(1, int(min(budget_bytes / 4, RESCORE_BYTES) // (32 * _width(xg.shape[-1]))))
    out = []
    for start in range(0, group.shape[0], per):
        g, i, c = (
            group[start : start + per],
            item[start : start + per],
            code_ids[start : start + per],
        )
        out.append(exact_scores(_rows(xg, g, i), _rows(weight, g, c), similarity))
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64, device=xg.device)


def _rows(t: torch.Tensor, first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """``t[first, second]`` for a ``(A, B, d)`` tensor, by one index_select where the
    layout allows (much faster than advanced indexing on the CPU)."""
    a, b, d = t.shape
    if t.is_contiguous():
        return t.view(a * b, d).index_select(0, first * b + second)
    if t.transpose(0, 1).is_contiguous():  # a (B, A, d) tensor seen transposed
        return t.transpose(0, 1).reshape(a * b, d).index_select(0, second * a + first)
    return t[first, second]


def _width(dim: int) -> int:
    return 1 << max(0, (dim - 1).bit_length())


def machine_tiny(dtype: torch.dtype) -> float:
    """The smallest normal number of the fast stage's precision."""
    return torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).tiny
