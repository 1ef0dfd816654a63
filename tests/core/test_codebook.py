"""The bottleneck against brute-force and dense references."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from codebook_lens.core.codebook import (
    EMPTY_SLOT,
    Codebook,
    CodebookConfig,
    CodebookLookup,
    topk_codes,
)


def brute_scores(x: torch.Tensor, w: torch.Tensor, similarity: str) -> torch.Tensor:
    """(N, G, C) similarity in float64, straight from the definitions."""
    x, w = x.double(), w.double()
    if similarity == "cosine":
        return torch.einsum("ngd,gcd->ngc", F.normalize(x, dim=-1), F.normalize(w, dim=-1))
    if similarity == "inner_product":
        return torch.einsum("ngd,gcd->ngc", x, w)
    diff = x.unsqueeze(2) - w.unsqueeze(0)  # (N, G, C, d)
    return -(diff * diff).sum(-1)


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 40),
    groups=st.integers(1, 4),
    dim=st.integers(1, 12),
    num_codes=st.integers(2, 50),
    k_frac=st.floats(0, 1),
    similarity=st.sampled_from(["cosine", "inner_product", "euclidean"]),
    seed=st.integers(0, 2**31 - 1),
    chunk_mib=st.sampled_from([1e-6, 1e-3, 256.0]),
    native=st.booleans(),
)
def test_topk_matches_brute_force(
    n, groups, dim, num_codes, k_frac, similarity, seed, chunk_mib, native
):
    k = 1 + int(k_frac * (num_codes - 2))
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, groups, dim, generator=gen)
    w = torch.randn(groups, num_codes, dim, generator=gen)
    ids = topk_codes(x, w, k, similarity, chunk_mib, native_search=native)
    assert ids.shape == (n, groups, k) and ids.dtype == torch.long
    ref = brute_scores(x, w, similarity)
    chosen = torch.gather(ref, 2, ids)
    best = ref.topk(k, dim=-1).values
    scale = ref.abs().amax(-1, keepdim=True) + 1
    # the chosen codes score as well as the true top k (float32 search vs float64 reference)
    assert torch.allclose(chosen, best, atol=1e-5 * scale.max().item())
    # chosen ids are distinct within a token, best first
    assert (ids.sort(-1).values.diff(dim=-1) != 0).all()
    # where the reference leaves a clear margin, the ids themselves agree
    full = ref.sort(dim=-1, descending=True).values
    margin = full[..., :k].diff(dim=-1).abs().amin(-1, keepdim=True) if k > 1 else scale
    gap = (full[..., k - 1] - full[..., k]).unsqueeze(-1) if k < num_codes else scale
    clear = ((gap > 1e-4 * scale) & (margin > 1e-4 * scale)).squeeze(-1)
    ref_ids = ref.topk(k, dim=-1).indices
    assert torch.equal(ids[clear], ref_ids[clear])


@pytest.mark.parametrize("native", [False, True])
@pytest.mark.parametrize("similarity", ["cosine", "inner_product", "euclidean"])
@pytest.mark.parametrize("k", [1, 5])
def test_chunked_equals_unchunked(similarity, k, native):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(300, 3, 16, generator=gen)
    w = torch.randn(3, 1500, 16, generator=gen)  # several code tiles in the native kernel
    whole = topk_codes(x, w, k, similarity, chunk_mib=1e6, native_search=native)
    for mib in (1e-9, 0.01, 0.1):  # 1 row, 1 row, 17 rows per chunk
        got = topk_codes(x, w, k, similarity, chunk_mib=mib, native_search=native)
        assert torch.equal(got, whole)


def test_native_kernel_is_built_and_agrees_with_pytorch():
    from codebook_lens.core import _native

    assert _native.load() is not None, "the compiled search kernel should build here"
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(700, 2, 32, generator=gen)  # several token tiles, a ragged last one
    w = torch.randn(2, 1300, 32, generator=gen)
    for similarity in ("cosine", "inner_product", "euclidean"):
        a = topk_codes(x, w, 4, similarity, native_search=True)
        b = topk_codes(x, w, 4, similarity, native_search=False)
        assert (a == b).float().mean() > 0.999  # float rounding may swap a rare near-tie


def test_chunk_budget_bounds_peak_memory(monkeypatch):
    """The score buffer allocated by the search never exceeds the budget."""
    sizes = []
    real_empty = torch.empty

    def spy(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        sizes.append(t.numel() * t.element_size())
        return t

    monkeypatch.setattr(torch, "empty", spy)
    x = torch.randn(1000, 2, 8)
    w = torch.randn(2, 4000, 8)
    topk_codes(x, w, 3, "cosine", chunk_mib=0.5, native_search=False)
    monkeypatch.undo()
    assert max(sizes) <= 0.5 * (1 << 20)
    assert max(sizes) >= 0.25 * (1 << 20)  # and it does use the budget


def make(groups=2, dim=8, num_codes=20, k=3, **kw):
    torch.manual_seed(0)
    return Codebook(dim, CodebookConfig(num_codes=num_codes, k=k, **kw), groups=groups)


def test_forward_output_is_sum_of_chosen_codes():
    cb = make(similarity="euclidean")
    x = torch.randn(4, 5, 16)
    out = cb(x)
    assert out.codes.shape == (4, 5, 2, 3)
    w = cb.weight.detach()
    expect = torch.stack([w[g][out.codes[..., g, :]].sum(-2) for g in range(2)], dim=-2)
    assert torch.allclose(out.output, expect.reshape(4, 5, 16), atol=1e-6)
    assert torch.allclose(out.mse, F.mse_loss(expect.reshape(4, 5, 16), x))


def test_input_gradient_is_straight_through():
    cb = make()
    x = torch.randn(6, 16, requires_grad=True)
    upstream = torch.randn(6, 16)
    out = cb(x)
    (out.output * upstream).sum().backward()
    assert torch.equal(x.grad, upstream)
    # the reconstruction loss adds nothing to the input gradient (stop-grad on a)
    x.grad = None
    out = cb(x)
    ((out.output * upstream).sum() + 10 * out.loss).backward()
    assert torch.equal(x.grad, upstream)


@pytest.mark.parametrize("lm_grad", [True, False])
@pytest.mark.parametrize("commit", [0.0, 0.5])
def test_codebook_gradient_matches_dense_reference(lm_grad, commit):
    cb = make(reconstruction_weight=0.7, commitment_weight=commit, lm_grad_to_codes=lm_grad)
    x = torch.randn(7, 16, requires_grad=True)
    upstream = torch.randn(7, 16)
    out = cb(x)
    ((out.output * upstream).sum() + out.loss).backward()

    # dense reference: a one-hot (N, G, C) selection matrix, autograd does the rest
    w = cb.weight.detach().clone().requires_grad_(True)
    onehot = F.one_hot(out.codes.view(7, 2, 3), 20).sum(-2).double()
    a = x.detach().view(7, 2, 8).double()
    q = torch.einsum("ngc,gcd->ngd", onehot, w.double())
    lm = (q * upstream.view(7, 2, 8).double()).sum() if lm_grad else 0.0
    rec = 0.7 * F.mse_loss(q, a)
    commit_term = commit * F.mse_loss(a, q.detach())
    (lm + rec + commit_term).backward()
    assert torch.allclose(cb.weight.grad, w.grad.float(), atol=1e-6)
    # commitment pulls the input toward its codes
    expect_x = upstream + commit * 2 * (x.detach() - out.output.detach()) / x.numel()
    assert torch.allclose(x.grad, expect_x, atol=1e-6)


def test_codebook_gradient_finite_differences():
    torch.manual_seed(3)
    x = torch.randn(5, 2, 4, dtype=torch.float64)
    w = torch.randn(2, 9, 4, dtype=torch.float64, requires_grad=True)
    ids = topk_codes(x, w.detach(), 2, "cosine")

    def f(weight):
        out, rec = CodebookLookup.apply(x, weight, ids, True)
        return (out * out).sum() + (rec**3).sum()

    assert torch.autograd.gradcheck(f, (w,), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])  # CSR and index_add paths
def test_slot_scales_weigh_codes_and_their_gradient(dtype):
    """With slot scales (an intervention's strength), the sum and the codes' gradient
    equal those of sum_j scale_j * W[id_j]; empty slots add nothing."""
    torch.manual_seed(4)
    x = torch.randn(5, 2, 4, dtype=dtype)
    w = torch.randn(2, 9, 4, dtype=dtype, requires_grad=True)
    ids = topk_codes(x.double(), w.detach().double(), 3, "cosine")
    ids[1, 0, 2] = EMPTY_SLOT
    scales = torch.rand(ids.shape) * 3 - 1
    out, _ = CodebookLookup.apply(x, w, ids, True, True, scales)
    upstream = torch.randn(out.shape, dtype=dtype)
    (out * upstream).sum().backward()
    ref_w = w.detach().double().requires_grad_(True)
    ref = torch.zeros(5, 2, 4, dtype=torch.float64)
    for n, g, j in torch.nonzero(ids >= 0).tolist():
        ref[n, g] = ref[n, g] + scales[n, g, j].double() * ref_w[g, ids[n, g, j]]
    (ref * upstream.double()).sum().backward()
    tol = 1e-10 if dtype == torch.float64 else 5e-2
    assert torch.allclose(out.double(), ref.detach(), atol=tol)
    assert torch.allclose(w.grad.double(), ref_w.grad, atol=tol)


def test_gradient_reaches_only_selected_rows():
    cb = make(num_codes=200, k=2)
    x = torch.randn(10, 16)
    out = cb(x)
    (out.output.square().sum() + out.loss).backward()
    touched = cb.weight.grad.abs().sum(-1) > 0  # (G, C)
    selected = torch.zeros(2, 200, dtype=torch.bool)
    for g in range(2):
        selected[g, out.codes[:, g].reshape(-1)] = True
    assert torch.equal(touched, selected)
    assert selected.sum() < 200  # most rows untouched


def test_backward_never_builds_dense_token_by_code_tensor():
    """No tensor with N x C elements is stored in backward (sparse ones count their entries)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Sizes(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.stored = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor):
                    dense = t.layout == torch.strided
                    self.stored.append(t.numel() if dense else t.values().numel())
            return out

    cb = make(groups=1, dim=4, num_codes=3000, k=2)
    x = torch.randn(500, 4, requires_grad=True)
    out = cb(x)
    loss = out.output.sum() + out.loss
    with Sizes() as sizes:
        loss.backward()
    assert sizes.stored and max(sizes.stored) <= 3000 * 4  # the codebook's own gradient at most
    assert cb.weight.grad is not None


def test_usage_off_by_default_and_counts_when_on():
    cb = make(num_codes=30, k=2)
    x = torch.randn(50, 16)
    cb(x)
    assert cb.usage.sum() == 0
    cb.track_usage()
    out = cb(x)
    ref = torch.zeros(2, 30, dtype=torch.long)
    for g in range(2):
        ref[g] = torch.bincount(out.codes[:, g].reshape(-1), minlength=30)
    assert torch.equal(cb.usage, ref)
    assert cb.usage.sum() == 50 * 2 * 2


def test_dead_code_revival_replaces_unused_codes():
    torch.manual_seed(0)
    cb = Codebook(8, CodebookConfig(num_codes=10, k=1, similarity="euclidean"))
    with torch.no_grad():
        cb.weight[0, 5:] = 100.0  # far from every input: never chosen
    opt = torch.optim.Adam(cb.parameters(), lr=1e-2)
    cb.track_usage()
    x = torch.randn(64, 8)
    for _ in range(3):
        out = cb(x)
        opt.zero_grad()
        (out.loss + out.output.sum() * 0 + (cb.weight**2).sum() * 1e-3).backward()
        opt.step()
        cb.step_idle()
    before = cb.weight.detach().clone()
    assert (cb.idle_steps[0, 5:] == 3).all()
    revived = cb.revive_dead_codes(max_idle_steps=3, optimizer=opt)
    dead = cb.idle_steps.new_zeros(1, 10, dtype=torch.bool)
    dead[0, 5:] = True
    assert revived == int(dead.sum()) == 5
    after = cb.weight.detach()
    assert torch.equal(after[~dead], before[~dead])  # live codes untouched
    assert (after[dead] - before[dead]).abs().amin() > 50  # dead codes moved ...
    assert after[dead].abs().amax() < 10  # ... to where the inputs are
    state = opt.state[cb.weight]
    assert (state["exp_avg"][dead] == 0).all() and (state["exp_avg_sq"][dead] == 0).all()
    assert (state["exp_avg_sq"][~dead] != 0).any()
    assert (cb.idle_steps[dead] == 0).all()
    # and now the revived codes get used
    cb.step_idle()
    out = cb(x)
    assert (out.codes >= 5).any()


def test_revived_codes_take_the_median_norm_of_live_codes():
    """With k summed codes a revived code must not be a whole activation (it would
    overshoot the sum it joins): it takes its group's median live-code norm."""
    torch.manual_seed(0)
    cb = Codebook(8, CodebookConfig(num_codes=12, k=4, similarity="cosine"), groups=2)
    with torch.no_grad():
        cb.weight.copy_(torch.randn(2, 12, 8))
        cb.weight.mul_(0.25 / cb.weight.norm(dim=-1, keepdim=True))
        cb.weight[:, :6] *= torch.linspace(0.5, 2.0, 6)[:, None]  # varied live norms
    live_norms = cb.weight[:, :6].norm(dim=-1).clone()
    cb.track_usage()
    cb(torch.randn(64, 16) * 5)  # recent inputs with norm ~ 5 * sqrt(8)
    cb.idle_steps.zero_()
    cb.idle_steps[:, 6:] = 10
    assert cb.revive_dead_codes(max_idle_steps=10) == 12
    revived = cb.weight[:, 6:].detach().norm(dim=-1)
    expected = live_norms.median(dim=-1).values  # torch's lower median, like nanmedian
    torch.testing.assert_close(revived, expected[:, None].expand(2, 6))


def test_with_k1_a_revived_code_is_the_activation_itself():
    torch.manual_seed(0)
    cb = Codebook(8, CodebookConfig(num_codes=6, k=1, similarity="cosine"))
    with torch.no_grad():
        cb.weight.mul_(0.01)  # live codes far smaller than the inputs
    cb.track_usage()
    x = torch.randn(32, 8) * 5
    cb(x)
    cb.idle_steps.zero_()
    cb.idle_steps[0, 3:] = 4
    cb.revive_dead_codes(max_idle_steps=4, noise=0.0)
    revived = cb.weight[0, 3:].detach()
    # each revived code is one of the recent inputs, at its own scale (exact distances:
    # cdist's matmul form has rounding error of ~1e-2 at these norms)
    dist = torch.cdist(revived, x, compute_mode="donot_use_mm_for_euclid_dist")
    assert dist.min(dim=1).values.max() < 1e-5


def test_revival_needs_tracking():
    cb = make()
    cb.idle_steps += 5
    with pytest.raises(RuntimeError, match="track_usage"):
        cb.revive_dead_codes(1)


def test_kmeans_init_finds_clusters():
    gen = torch.Generator().manual_seed(0)
    centers = torch.randn(2, 6, 4, generator=gen) * 10
    assign = torch.randint(0, 6, (600, 2), generator=gen)
    samples = torch.stack([centers[g][assign[:, g]] for g in range(2)], 1)
    samples = samples + 0.05 * torch.randn(samples.shape, generator=gen)
    cb = Codebook(4, CodebookConfig(num_codes=6, k=1, similarity="euclidean"), groups=2)
    cb.kmeans_init_(samples.reshape(600, 8), iters=20, generator=gen)
    for g in range(2):
        dist = torch.cdist(centers[g], cb.weight[g].detach())
        assert dist.amin(1).max() < 0.5  # every true center has a code next to it


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_codes=8, k=8), "k must be"),
        (dict(num_codes=8, k=0), "k must be"),
        (dict(num_codes=1), "num_codes"),
        (dict(similarity="dot"), "similarity must be one of cosine, inner_product, euclidean"),
        (dict(reconstruction_weight=-1.0), "reconstruction_weight"),
        (dict(commitment_weight=math.nan), "commitment_weight"),
        (dict(chunk_mib=0), "chunk_mib"),
        (dict(outlier_factor=1.0), "outlier_factor"),
        (dict(outlier_factor=math.inf), "outlier_factor"),
        (dict(outlier_factor=True), "outlier_factor"),
    ],
)
def test_bad_config_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CodebookConfig(**kwargs)


def test_unknown_option_and_width_mismatch():
    with pytest.raises(ValueError, match="unknown codebook option"):
        CodebookConfig.from_dict({"num_code": 5})
    cb = make()
    with pytest.raises(ValueError, match="activation width 15"):
        cb(torch.randn(3, 15))


def test_native_build_survives_a_stale_lock():
    """A build killed midway leaves a lock file; the next load must not wait on it forever."""
    import os
    import subprocess
    import sys
    import time

    from codebook_lens.core import _native

    _, directory = _native.build_dir()
    assert _native.load() is not None
    lock = directory / "lock"
    lock.touch()
    old = time.time() - 3600
    os.utime(lock, (old, old))
    code = (
        "from codebook_lens.core import _native; import sys; sys.exit(0 if _native.load() else 1)"
    )
    proc = subprocess.run([sys.executable, "-c", code], timeout=240, capture_output=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not lock.exists()


def test_kmeans_init_with_k_codes_starts_near_the_activation():
    gen = torch.Generator().manual_seed(0)
    samples = torch.randn(2000, 16, generator=gen) * 5 + 3
    cb = Codebook(16, CodebookConfig(num_codes=64, k=4, similarity="cosine"))
    cb.kmeans_init_(samples, iters=5, generator=gen)
    out = cb(samples)
    # the sum of 4 codes approximates the input, not 4 times it
    assert abs(out.output.mean() - samples.mean()) < 0.5  # both near 3 (4 times would be 12)
    assert out.mse < 0.5 * samples.square().mean()


def test_outliers_pass_through_dense_with_empty_slots():
    """Activations over outlier_factor x ref_norm keep their value, hold no code, get the
    downstream gradient unchanged and stay out of the reconstruction loss."""
    gen = torch.Generator().manual_seed(0)
    cb = Codebook(6, CodebookConfig(num_codes=10, k=2, commitment_weight=0.5, outlier_factor=4.0))
    cb.ref_norm.fill_(2.0)
    x = torch.randn(12, 6, generator=gen)
    x = 1.5 * x / x.norm(dim=-1, keepdim=True)  # norm 1.5: quantized
    x[[2, 7]] *= 6.0  # norm 9 > 4 x 2: dense
    x.requires_grad_(True)
    out = cb(x)
    dense = torch.zeros(12, dtype=torch.bool)
    dense[[2, 7]] = True
    assert (out.codes[dense] == EMPTY_SLOT).all() and (out.codes[~dense] >= 0).all()
    assert torch.equal(out.output[dense], x[dense])
    ids = topk_codes(x.detach().view(12, 1, 6), cb.weight.detach(), 2, "cosine")
    assert torch.equal(out.codes[~dense], ids[~dense])
    w = cb.weight.detach()[0]
    quantized = w[ids[~dense, 0]].sum(1)
    assert torch.allclose(out.output[~dense], quantized)
    mse = F.mse_loss(quantized, x.detach()[~dense])
    assert out.mse.item() == pytest.approx(mse.item(), rel=1e-6)
    assert out.loss.item() == pytest.approx(1.5 * mse.item(), rel=1e-6)  # rec + 0.5 commitment
    assert out.variance.item() == pytest.approx(
        x.detach()[~dense].var(0, unbiased=False).mean().item(), rel=1e-6
    )
    grad = torch.randn(12, 6, generator=gen)
    (out.output * grad).sum().backward()
    assert torch.allclose(x.grad, grad)  # straight through, dense rows included
    assert torch.equal(cb.codes(x.detach()), out.codes)
    cb.ids_hook = lambda ids, a: torch.zeros_like(ids)  # an intervention forcing code 0
    forced = cb(x.detach())
    assert torch.equal(forced.output[dense], x.detach()[dense])  # outliers stay dense
    assert (forced.codes[dense] == EMPTY_SLOT).all() and (forced.codes[~dense] == 0).all()


def test_outlier_reference_norm_from_kmeans_or_first_batch():
    gen = torch.Generator().manual_seed(1)
    samples = torch.randn(400, 5, generator=gen)
    samples[:4] *= 1000.0  # attention-sink-like rows
    cb = Codebook(5, CodebookConfig(num_codes=8, k=1, outlier_factor=8.0))
    cb.kmeans_init_(samples, generator=gen)
    assert cb.ref_norm.item() == pytest.approx(samples.norm(dim=-1).median().item())
    assert cb.weight.detach().norm(dim=-1).max() < 50  # no centroid spent on the outliers
    assert torch.equal(cb.state_dict()["ref_norm"], cb.ref_norm)
    fresh = Codebook(5, CodebookConfig(num_codes=8, k=1, outlier_factor=8.0))
    fresh.load_state_dict(cb.state_dict())
    assert fresh.ref_norm.item() == cb.ref_norm.item()
    lazy = Codebook(5, CodebookConfig(num_codes=8, k=1, outlier_factor=8.0))
    out = lazy(samples)
    assert lazy.ref_norm.item() == pytest.approx(samples.norm(dim=-1).median().item())
    assert (out.codes[:4] == EMPTY_SLOT).all() and (out.codes[4:] >= 0).all()
    assert "ref_norm" not in Codebook(5, CodebookConfig(num_codes=8, k=1)).state_dict()
