"""The codebook's lookup with a straight-through gradient.

The output of a codebook is the sum of the chosen rows of its ``(G, C, d)`` table.
:class:`CodebookLookup` and :class:`LookupLoss` compute it (and the reconstruction
loss) in one pass; their backward passes give the input the upstream gradient unchanged
(straight-through) and the table gradient only on the chosen rows, summed per row by
:func:`scatter_rows` (the compiled kernel on the CPU, a sparse matmul elsewhere). An id
slot may be empty (:data:`EMPTY_SLOT`) and then adds nothing.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from codebook_lens.core import _native
from codebook_lens.core.errors import CodebookLensError
from codebook_lens.core.topk import flat_ids

EMPTY_SLOT = -1  # an id slot that holds no code (an intervention may leave slots empty)


def scatter_rows(
    flat: torch.Tensor, rows: torch.Tensor, num_rows: int, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """``out[flat[i, j]] += weights[i, j] * rows[i]`` (weights 1 when None) for every
    token i and slot j: ``(num_rows, d)``.

    On the CPU, for float32, the compiled kernel (``_native``) sums whole target rows
    in parallel into the output alone; otherwise (or without it) the product of a
    transposed sparse selection matrix (CSR, k entries per token) with ``rows``, which
    MKL runs several times faster than ``index_add_`` but with a second copy of the
    output; elsewhere, one ``index_add_`` per slot.
    """
    n, k = flat.shape
    if rows.device.type == "cpu" and rows.dtype == torch.float32:
        kernel = _native.load()
        if kernel is not None:
            w = torch.empty(0) if weights is None else weights.to(torch.float32)
            return kernel.scatter_rows(flat, rows, w, num_rows)
    if rows.device.type == "cpu" and rows.dtype in (torch.float32, torch.float64):
        crow = torch.arange(0, n * k + 1, k, device=rows.device)
        if weights is None:
            values = torch.ones(n * k, dtype=rows.dtype, device=rows.device)
        else:
            values = weights.reshape(-1).to(rows.dtype)
        with warnings.catch_warnings():  # "sparse CSR support is in beta"
            warnings.simplefilter("ignore", UserWarning)
            select = torch.sparse_csr_tensor(crow, flat.reshape(-1), values, (n, num_rows))
        return select.t() @ rows
    out = torch.zeros(num_rows, rows.shape[1], dtype=rows.dtype, device=rows.device)
    for slot in range(k):
        part = rows if weights is None else rows * weights[:, slot : slot + 1].to(rows.dtype)
        out.index_add_(0, flat[:, slot], part)
    return out


def bag_of_codes(
    shape: torch.Size,
    weight: torch.Tensor,
    ids: torch.Tensor,
    empty_slots: bool,
    scales: torch.Tensor | None,
) -> tuple[torch.Tensor, tuple, tuple]:
    """The sum of the selected codes, ``(N, G, d)`` in the codes' dtype, and the
    ``(flat ids, per-slot weights)`` that scatter its gradient back to the codes and that
    compute it again (empty slots scatter into a spare row past the end)."""
    n, groups, dim = shape
    num_codes = weight.shape[1]
    table = weight.reshape(groups * num_codes, dim)
    if empty_slots:
        filled = ids >= 0
        flat = flat_ids(ids.clamp(min=0), num_codes)
        kept = filled if scales is None else scales * filled
        per_slot = kept.view(flat.shape).to(table.dtype)
        q = F.embedding_bag(flat, table, mode="sum", per_sample_weights=per_slot)
        scatter = flat.masked_fill(~filled.view(flat.shape), groups * num_codes)
        # every filled slot counts once without scales
        return (
            q.view(n, groups, dim),
            (scatter, None if scales is None else per_slot),
            (flat, per_slot),
        )
    if scales is not None:
        raise CodebookLensError("slot scales need empty_slots=True")
    flat = flat_ids(ids, num_codes)
    q = F.embedding_bag(flat, table, mode="sum")
    return q.view(n, groups, dim), (flat, None), (flat, None)


def codes_grad(
    rows: torch.Tensor, scatter: tuple, weight_shape: torch.Size, weight_dtype, empty_slots: bool
) -> torch.Tensor:
    """The codes' gradient from the ``(N, G, d)`` gradient of their sum."""
    groups, num_codes, dim = weight_shape
    flat, per_slot = scatter
    spare = 1 if empty_slots else 0  # the row that empty slots scatter into
    grad = scatter_rows(
        flat, rows.reshape(-1, dim).to(weight_dtype), groups * num_codes + spare, per_slot
    )
    return grad[: groups * num_codes].view(groups, num_codes, dim)


class CodebookLookup(torch.autograd.Function):
    """Sum of the selected codes, with two outputs that differ only in their gradient.

    ``out`` goes downstream: its gradient passes to the input unchanged (straight-through)
    and, when ``lm_grad_to_codes``, to the selected codes as well. ``rec`` carries the
    reconstruction loss: its gradient reaches only the selected codes. Backward scatters
    into the k selected rows per token with ``index_add_``; no N x C tensor exists.

    ``ids`` may have any number of slots. With ``empty_slots``, a slot holding
    :data:`EMPTY_SLOT` adds nothing and receives no gradient, and ``scales`` (the shape
    of ids, or None for all 1) multiplies each slot's code in the sum and its gradient.
    """

    @staticmethod
    def forward(
        ctx,
        x,
        weight,
        ids,
        lm_grad_to_codes: bool,
        empty_slots: bool = False,
        scales: torch.Tensor | None = None,
    ):
        q, (flat, per_slot), _ = bag_of_codes(x.shape, weight, ids, empty_slots, scales)
        q = q.to(x.dtype)
        ctx.save_for_backward(flat, per_slot)
        ctx.weight_shape = weight.shape
        ctx.weight_dtype = weight.dtype
        ctx.lm_grad_to_codes = lm_grad_to_codes
        ctx.empty_slots = empty_slots
        ctx.mark_non_differentiable(ids)
        return q, q.detach().clone()

    @staticmethod
    def backward(ctx, grad_out, grad_rec):
        flat, per_slot = ctx.saved_tensors
        grad_x = grad_out if ctx.needs_input_grad[0] else None
        grad_w = None
        if ctx.needs_input_grad[1]:
            groups, num_codes, dim = ctx.weight_shape
            total = grad_rec
            if ctx.lm_grad_to_codes and grad_out is not None:
                total = grad_out if total is None else total + grad_out
            if total is None:
                grad_w = torch.zeros(ctx.weight_shape, dtype=ctx.weight_dtype, device=flat.device)
            else:
                grad_w = codes_grad(
                    total, (flat, per_slot), ctx.weight_shape, ctx.weight_dtype, ctx.empty_slots
                )
        return grad_x, grad_w, None, None, None, None


class LookupLoss(torch.autograd.Function):
    """:class:`CodebookLookup`'s sum of codes ``q`` together with the reconstruction loss
    ``MSE(q, stop_grad(x))`` over the rows of ``keep`` (``(N, G)``, None for all).

    Returns ``(q, mse)``. ``q``'s gradient passes to ``x`` unchanged and, when
    ``lm_grad_to_codes``, to the selected codes; ``mse``'s gradient reaches only the
    selected codes, as ``2 (q - x) / count``, with ``q`` computed again from the ids in
    backward, so that no second ``N x d`` tensor is kept between the passes.
    """

    @staticmethod
    def forward(ctx, x, weight, ids, lm_grad_to_codes, empty_slots, scales, keep):
        q, scatter, again = bag_of_codes(x.shape, weight, ids, empty_slots, scales)
        q = q.to(x.dtype)
        err = (q.float() - x.float()).square_().sum(-1)  # (N, G)
        if keep is not None:
            err = err * keep
        count = (x.shape[0] * x.shape[1] if keep is None else int(keep.sum())) * x.shape[2]
        mse = err.sum() / count if count else err.new_zeros(())
        ctx.save_for_backward(x, weight, *scatter, *again, keep)
        ctx.count = count
        ctx.lm_grad_to_codes = lm_grad_to_codes
        ctx.empty_slots = empty_slots
        return q, mse

    @staticmethod
    def backward(ctx, grad_q, grad_mse):
        x, weight, flat, per_slot, flat_again, per_slot_again, keep = ctx.saved_tensors
        grad_x = grad_q if ctx.needs_input_grad[0] else None
        grad_w = None
        if ctx.needs_input_grad[1]:
            total = grad_q if ctx.lm_grad_to_codes else None
            if grad_mse is not None and ctx.count:
                groups, num_codes, dim = weight.shape
                table = weight.reshape(groups * num_codes, dim)
                q = F.embedding_bag(
                    flat_again, table, mode="sum", per_sample_weights=per_slot_again
                )
                diff = q.view(x.shape).float().sub_(x).mul_(2 * grad_mse.float() / ctx.count)
                if keep is not None:
                    diff.mul_(keep.unsqueeze(-1))
                total = diff if total is None else diff.add_(total)
            if total is None:
                grad_w = torch.zeros_like(weight)
            else:
                grad_w = codes_grad(
                    total, (flat, per_slot), weight.shape, weight.dtype, ctx.empty_slots
                )
        return grad_x, grad_w, None, None, None, None, None
