"""Nearest-code search: the k codes most similar to each activation, per group.

The compiled kernel (``_native``) serves float32 on the CPU; otherwise batched matmuls
over chunks of tokens whose score matrix fits a memory budget.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from codebook_lens.core import _native as _native
from codebook_lens.core.errors import CodebookLensError

Similarity = Literal["cosine", "inner_product", "euclidean"]
SIMILARITIES: tuple[str, ...] = ("cosine", "inner_product", "euclidean")

MIB = 1 << 20
TILE_TOKENS = 512  # score tile of the compiled search kernel: 512 tokens x 4096 codes (8 MiB)
TILE_CODES = 4096


def search_keys(weight: torch.Tensor, similarity: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Return ``(keys, bias)`` so that ``score = alpha * x @ keys^T + bias`` ranks codes.

    cosine: keys are unit-norm codes (the input's norm does not change its ranking, so the
    input is never normalised). inner_product: raw codes. euclidean: ranking by
    ``2 x.c - |c|^2`` equals ranking by ``-|x - c|^2``.
    """
    if similarity == "cosine":
        return F.normalize(weight, dim=-1), None
    if similarity == "inner_product":
        return weight, None
    if similarity == "euclidean":
        return weight, -(weight * weight).sum(-1).unsqueeze(1)  # (G, 1, C)
    raise CodebookLensError(
        f"similarity must be one of {', '.join(SIMILARITIES)}, got {similarity!r}"
    )


def chunk_rows(groups: int, num_codes: int, itemsize: int, budget_bytes: float) -> int:
    """Tokens per chunk so that the (G, rows, C) score matrix fits the budget."""
    return max(1, int(budget_bytes // (groups * num_codes * itemsize)))


@torch.no_grad()
def topk_codes(
    x: torch.Tensor,
    weight: torch.Tensor,
    k: int,
    similarity: str = "cosine",
    chunk_mib: float = 256.0,
    native_search: bool = True,
) -> torch.Tensor:
    """Ids of the k most similar codes, best first.

    x: ``(N, G, d)`` activations; weight: ``(G, C, d)`` codebooks.
    Returns ``(N, G, k)`` int64. The score matrix held at once is at most
    ``chunk_mib`` MiB (one token row at the least); chunking changes no result.

    For float32 on the CPU the compiled kernel (see ``_native``) is used when it is
    available and ``native_search``: it holds one tile of at most ``TILE_CODES x
    TILE_TOKENS`` scores (fewer codes when the budget is smaller) and its result does
    not depend on the budget.
    """
    n, groups, dim = x.shape
    if weight.dim() != 3 or weight.shape[0] != groups or weight.shape[2] != dim:
        raise CodebookLensError(
            f"activations of shape {tuple(x.shape)} do not match codebooks of shape "
            f"{tuple(weight.shape)} (expected (N, G, d) against (G, C, d))"
        )
    num_codes = weight.shape[1]
    keys, bias = search_keys(weight.to(x.dtype), similarity)
    if x.device.type == "cpu" and x.dtype == torch.float32 and native_search:
        kernel = _native.load()
        if kernel is not None:
            alpha = 2.0 if bias is not None else 1.0
            no_bias = torch.empty(0)
            tile_codes = int(min(TILE_CODES, max(16, chunk_mib * MIB // (4 * TILE_TOKENS))))
            return kernel.fused_topk(
                x.transpose(0, 1).contiguous(),
                keys.contiguous(),
                no_bias if bias is None else bias.reshape(groups, num_codes),
                alpha,
                k,
                TILE_TOKENS,
                tile_codes,
            )
    keys_t = keys.transpose(1, 2).contiguous()  # (G, d, C)
    xt = x.transpose(0, 1)  # (G, N, d), a view
    rows = min(n, chunk_rows(groups, num_codes, x.element_size(), chunk_mib * MIB))
    buf = torch.empty(groups * rows * num_codes, dtype=x.dtype, device=x.device)
    ids = torch.empty(n, groups, k, dtype=torch.long, device=x.device)
    for start in range(0, n, rows):
        m = min(rows, n - start)
        scores = buf[: groups * m * num_codes].view(groups, m, num_codes)
        if bias is None:
            torch.bmm(xt[:, start : start + m], keys_t, out=scores)
        else:
            torch.baddbmm(bias, xt[:, start : start + m], keys_t, alpha=2.0, out=scores)
        if k == 1:
            best = scores.argmax(dim=-1, keepdim=True)
        else:
            best = scores.topk(k, dim=-1, sorted=True).indices
        ids[start : start + m] = best.transpose(0, 1)
    return ids


def flat_ids(ids: torch.Tensor, num_codes: int) -> torch.Tensor:
    """(N, G, k) per-group ids -> (N*G, k) ids into the flattened (G*C, d) codebook."""
    groups = ids.shape[1]
    offsets = torch.arange(groups, device=ids.device).mul_(num_codes).view(1, groups, 1)
    return (ids + offsets).view(-1, ids.shape[-1])
