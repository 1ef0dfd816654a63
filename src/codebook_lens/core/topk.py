"""Nearest-code search: the k codes most similar to each activation, per group.

Two paths give the same ids (see ``rescore`` for the rule they share: the k best by a
fixed-order float64 score, ties to the lower id):

- the compiled kernel (``_native``), for float32 on the CPU: the similarity in
  cache-sized tiles, scanned at once with a SIMD filter, so the score matrix never
  goes to memory;
- batched matmuls over chunks of tokens whose score matrix fits a memory budget, with a
  top-M per token rescored where near ties need it (every device and dtype).

On the CPU, which one runs is chosen per shape class by a short measurement recorded per
machine (``search_path``).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from codebook_lens.core import _native, search_path
from codebook_lens.core.errors import CodebookLensError
from codebook_lens.core.rescore import (
    MODES,
    error_unit,
    machine_tiny,
    settle,
    tolerances,
)

Similarity = Literal["cosine", "inner_product", "euclidean"]
SIMILARITIES: tuple[str, ...] = ("cosine", "inner_product", "euclidean")

MIB = 1 << 20
# the default bound on the score matrix held at once: on the CPU it stays near the
# caches; on a GPU larger chunks mean fewer launches and synchronisations (on an H200,
# 16 heads x 10,000 codes x 32,768 tokens: 0.259 s at 256 MiB, 0.101 s at 4 GiB, against
# 0.109 s for the dense search holding all 40 GiB; docs/benchmarks-search.md)
CPU_CHUNK_MIB = 256.0
GPU_CHUNK_MIB = 4096.0


def default_chunk_mib(device: torch.device) -> float:
    """The score matrix's default bound in MiB on ``device``: 256 on the CPU; on a CUDA
    GPU 4 GiB, or a sixteenth of its memory where that is less (at least 256)."""
    if device.type != "cuda":
        return CPU_CHUNK_MIB
    total = torch.cuda.get_device_properties(device).total_memory / MIB
    return max(CPU_CHUNK_MIB, min(GPU_CHUNK_MIB, total / 16))


TILE_TOKENS = 256  # the compiled kernel's tile: 256 tokens x up to TILE_BYTES of codes
TILE_BYTES = 512 * 1024  # fits a core's L2 cache, where the tile is scanned right after the product
MEASURE_TOKENS = 1024  # the path choice is measured on at most this many of the call's tokens
MEASURE_MIN_MACS = 1 << 27  # below this work (tokens x G x C x d) the kernel is used unmeasured


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
    chunk_mib: float | None = None,
    native_search: bool = True,
) -> torch.Tensor:
    """Ids of the k most similar codes, best first.

    x: ``(N, G, d)`` activations; weight: ``(G, C, d)`` codebooks.
    Returns ``(N, G, k)`` int64: the k codes of highest fixed-order float64 score, ties
    to the lower id (see ``codebook_lens.core.rescore``), whatever the chunking, device,
    path or thread count. The score matrix held at once is at most ``chunk_mib`` MiB (one
    token row at the least; the compiled kernel's tile is at most 512 KiB); None is
    :func:`default_chunk_mib` of the device.

    For float32 on the CPU the compiled kernel (see ``_native``) is used when it is
    available, ``native_search`` is true and it is the faster path for this shape class
    on this machine (:func:`chosen_path`).
    """
    check_shapes(x, weight, k, similarity)
    if chunk_mib is None:
        chunk_mib = default_chunk_mib(x.device)
    if native_search and chosen_path(x, weight, k, similarity, chunk_mib) == "kernel":
        kernel = _native.load()
        if kernel is not None:
            return native_topk(kernel, x, weight, k, similarity, chunk_mib)
    return torch_topk(x, weight, k, similarity, chunk_mib)


def check_shapes(x: torch.Tensor, weight: torch.Tensor, k: int, similarity: str) -> None:
    if (
        x.dim() != 3
        or weight.dim() != 3
        or weight.shape[0] != x.shape[1]
        or weight.shape[2] != x.shape[2]
    ):
        raise CodebookLensError(
            f"activations of shape {tuple(x.shape)} do not match codebooks of shape "
            f"{tuple(weight.shape)} (expected (N, G, d) against (G, C, d))"
        )
    if similarity not in SIMILARITIES:
        raise CodebookLensError(
            f"similarity must be one of {', '.join(SIMILARITIES)}, got {similarity!r}"
        )
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= weight.shape[1]:
        raise CodebookLensError(
            f"k must be an integer with 1 <= k <= num_codes ({weight.shape[1]}), got {k!r}"
        )


def chosen_path(
    x: torch.Tensor, weight: torch.Tensor, k: int, similarity: str, chunk_mib: float = 256.0
) -> str:
    """``"kernel"`` or ``"pytorch"``: the path :func:`topk_codes` takes for these inputs.

    The kernel serves float32 on the CPU when it can be built. Among the two, the choice
    is ``CODEBOOK_LENS_SEARCH_PATH`` when set, the kernel for calls of little work, and
    otherwise the faster one for the shape class, measured once per machine.
    """
    if x.device.type != "cpu" or x.dtype != torch.float32 or weight.dtype != torch.float32:
        return "pytorch"
    kernel = _native.load()
    if kernel is None:
        return "pytorch"
    forced = search_path.forced()
    if forced is not None:
        return forced
    n, groups, dim = x.shape
    tokens = min(n, MEASURE_TOKENS)
    if tokens * groups * weight.shape[1] * dim < MEASURE_MIN_MACS:
        return "kernel"
    key = shape_class(x, weight, k, similarity, kernel)
    sample = x[:tokens]
    run = {
        "kernel": lambda: native_topk(kernel, sample, weight, k, similarity, chunk_mib),
        "pytorch": lambda: torch_topk(sample, weight, k, similarity, chunk_mib),
    }
    return search_path.choose(key, run, tokens)


def shape_class(x: torch.Tensor, weight: torch.Tensor, k: int, similarity: str, kernel) -> str:
    """The key under which the path choice for these inputs is measured and recorded."""
    n, groups, dim = x.shape
    n_class = min(1 << max(0, (n - 1).bit_length()), MEASURE_TOKENS)
    simd = _native.SIMD_LEVELS[_native.simd_level(kernel)]
    return (
        f"G{groups}-C{weight.shape[1]}-d{dim}-k{k}-{similarity}-n{n_class}"
        f"-t{torch.get_num_threads()}-{simd}"
    )


def _code_norms(weight: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(weight, dim=-1)


@torch.no_grad()
def native_topk(
    kernel,
    x: torch.Tensor,
    weight: torch.Tensor,
    k: int,
    similarity: str,
    chunk_mib: float = 256.0,
    tok_block: int | None = None,
    code_block: int | None = None,
) -> torch.Tensor:
    """The compiled kernel's search (float32, CPU); tiles of ``tok_block`` tokens x
    ``code_block`` codes (by default 256 tokens x what fits 512 KiB and the budget)."""
    n, groups, dim = x.shape
    num_codes = weight.shape[1]
    w = weight.to(torch.float32).contiguous()
    norms = _code_norms(w)  # (G, C) float32
    if similarity == "cosine":
        mul, add = 1 / norms.clamp(min=1e-12), torch.zeros_like(norms)
    elif similarity == "inner_product":
        mul, add = torch.ones_like(norms), torch.zeros_like(norms)
    else:
        mul, add = torch.full_like(norms, 2.0), -(norms * norms)
    unit = error_unit(torch.float32, x.device, dim)
    tol_a, tol_b = tolerances(norms, similarity, unit, dim, machine_tiny(torch.float32))
    tb = max(1, tok_block or TILE_TOKENS)
    if code_block is None:
        padded = -(-min(tb, max(n, 1)) // 16) * 16
        fit = int(min(TILE_BYTES, chunk_mib * MIB) // (4 * padded))
        code_block = min(num_codes, max(16, fit))
    return kernel.fused_topk(
        x.to(torch.float32).contiguous(),
        w,
        mul.contiguous(),
        add.contiguous(),
        tol_a.contiguous(),
        tol_b.contiguous(),
        MODES[similarity],
        similarity != "euclidean",
        k,
        tb,
        max(1, code_block),
        _native.simd_level(kernel),
    )


@torch.no_grad()
def torch_topk(
    x: torch.Tensor, weight: torch.Tensor, k: int, similarity: str, chunk_mib: float = 256.0
) -> torch.Tensor:
    """The PyTorch search: batched matmuls over chunks of tokens (any device and dtype;
    float16 and bfloat16 are searched in float32), a top ``k + 1`` per token, and the
    float64 rescoring of near ties (``rescore.settle``)."""
    n, groups, dim = x.shape
    num_codes = weight.shape[1]
    sdtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    keys, bias = search_keys(weight.to(sdtype), similarity)
    keys_t = keys.transpose(1, 2).contiguous()  # (G, d, C)
    unit = error_unit(sdtype, x.device, dim)
    tol_a, tol_b = tolerances(
        _code_norms(weight.to(sdtype)), similarity, unit, dim, machine_tiny(sdtype)
    )
    tol_a, tol_b = tol_a.to(sdtype), tol_b.to(sdtype)
    budget = chunk_mib * MIB
    itemsize = torch.finfo(sdtype).bits // 8
    rows = min(n, chunk_rows(groups, num_codes, itemsize, budget))
    buf = torch.empty(groups * max(rows, 1) * num_codes, dtype=sdtype, device=x.device)
    ids = torch.empty(n, groups, k, dtype=torch.long, device=x.device)
    for start in range(0, n, max(rows, 1)):
        m = min(rows, n - start)
        xt = x[start : start + m].transpose(0, 1)  # (G, m, d), a view
        scores = buf[: groups * m * num_codes].view(groups, m, num_codes)
        if bias is None:
            torch.bmm(xt.to(sdtype), keys_t, out=scores)
        else:
            torch.baddbmm(bias, xt.to(sdtype), keys_t, alpha=2.0, out=scores)
        chosen = settle(scores, xt, tol_a, tol_b, weight, k, similarity, budget)
        ids[start : start + m] = chosen.transpose(0, 1)
    return ids


def flat_ids(ids: torch.Tensor, num_codes: int) -> torch.Tensor:
    """(N, G, k) per-group ids -> (N*G, k) ids into the flattened (G*C, d) codebook."""
    groups = ids.shape[1]
    offsets = torch.arange(groups, device=ids.device).mul_(num_codes).view(1, groups, 1)
    return (ids + offsets).view(-1, ids.shape[-1])
