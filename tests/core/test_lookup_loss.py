"""The lookup with its reconstruction loss, and the codes' gradient kernel, against the
plain formulation they replace (CodebookLookup, F.mse_loss, index_add_)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from codebook_lens.core import _native
from codebook_lens.core.lookup import EMPTY_SLOT, CodebookLookup, LookupLoss
from codebook_lens.core.topk import topk_codes


def reference(x, w, ids, lm_grad, empty, scales, keep):
    """CodebookLookup's (q, rec) and F.mse_loss over the kept rows."""
    q, rec = CodebookLookup.apply(x, w, ids, lm_grad, empty, scales)
    if keep is None:
        return q, F.mse_loss(rec.float(), x.detach().float())
    return q, F.mse_loss(rec[keep].float(), x.detach()[keep].float())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("lm_grad", [True, False])
@pytest.mark.parametrize("variant", ["plain", "outliers", "scaled slots"])
def test_lookup_loss_equals_the_lookup_plus_mse(dtype, lm_grad, variant):
    gen = torch.Generator().manual_seed(7)
    x0 = torch.randn(9, 2, 5, generator=gen, dtype=dtype)
    w0 = torch.randn(2, 11, 5, generator=gen, dtype=dtype)
    ids = topk_codes(x0, w0, 3, "cosine")
    keep, empty, scales = None, False, None
    if variant == "outliers":
        keep = torch.ones(9, 2, dtype=torch.bool)
        keep[2, 0] = keep[5, 1] = False
        ids = ids.masked_fill(~keep.unsqueeze(-1), EMPTY_SLOT)
        empty = True
    elif variant == "scaled slots":
        empty, scales = True, torch.rand(ids.shape, generator=gen, dtype=dtype) * 2
        ids[1, 1, 2] = EMPTY_SLOT
    upstream = torch.randn(x0.shape, generator=gen, dtype=dtype)
    results = []
    for fn in (LookupLoss.apply, reference):
        x = x0.clone().requires_grad_(True)
        w = w0.clone().requires_grad_(True)
        q, mse = fn(x, w, ids, lm_grad, empty, scales, keep)
        ((q * upstream).sum() + 0.7 * mse).backward()
        results.append((q.detach(), mse.detach(), x.grad, w.grad))
    tol = 1e-6 if dtype == torch.float64 else 1e-5  # the loss is computed in float32
    for got, want in zip(results[0], results[1], strict=True):
        assert torch.allclose(got.to(want.dtype), want, atol=tol, rtol=tol)


def test_lookup_loss_with_no_kept_row_is_zero_and_trains_nothing():
    x = torch.randn(3, 1, 4, requires_grad=True)
    w = torch.randn(1, 6, 4, requires_grad=True)
    keep = torch.zeros(3, 1, dtype=torch.bool)
    ids = torch.full((3, 1, 2), EMPTY_SLOT)
    q, mse = LookupLoss.apply(x, w, ids, False, True, None, keep)
    assert mse.item() == 0.0
    (q.sum() + mse).backward()
    assert torch.equal(w.grad, torch.zeros_like(w))


def test_the_codes_gradient_kernel_sums_as_index_add_does():
    """out[flat[i, j]] += weight[i, j] * rows[i], repeated targets and a spare row
    included, against index_add_ in float64."""
    kernel = _native.load()
    gen = torch.Generator().manual_seed(0)
    rows = torch.randn(500, 24, generator=gen)
    flat = torch.randint(0, 41, (500, 3), generator=gen)
    flat[::7, 0] = 40  # the spare row
    weights = torch.randn(500, 3, generator=gen)
    for wts in (None, weights):
        want = torch.zeros(41, 24, dtype=torch.float64)
        for slot in range(3):
            part = (
                rows.double() if wts is None else rows.double() * wts[:, slot : slot + 1].double()
            )
            want.index_add_(0, flat[:, slot], part)
        got = kernel.scatter_rows(flat, rows, torch.empty(0) if wts is None else wts, 41)
        assert got.shape == (41, 24) and got.dtype == torch.float32
        assert torch.allclose(got.double(), want, atol=1e-5)
    with pytest.raises(RuntimeError, match="out of range"):
        kernel.scatter_rows(flat, rows, torch.empty(0), 40)
