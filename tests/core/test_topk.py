"""The nearest-code search's result rule, attacked with near ties, against a brute force.

The rule (core/rescore.py): the k codes of highest float64 score, ties to the lower id.
Near ties are where a float32 search decides by rounding, and rounding changes with the
chunking, the tiles, the thread count, the SIMD scan and the path; every one of those is
varied here and every answer must equal the brute force's.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers import near_tie_inputs

from codebook_lens.core import _native, search_path, topk
from codebook_lens.core.rescore import exact_scores
from codebook_lens.core.topk import MIB, native_topk, topk_codes, torch_topk

SIMS = ["cosine", "inner_product", "euclidean"]


def brute_ids(x: torch.Tensor, w: torch.Tensor, k: int, similarity: str) -> torch.Tensor:
    """(N, G, k) ids by the rule, from correctly rounded sums (math.fsum) of exact float64
    products, ranked by (score descending, id ascending)."""
    xs, ws = x.double().tolist(), w.double().tolist()
    out = []
    for row in xs:
        per_group = []
        for g, xv in enumerate(row):
            scores = []
            for code in ws[g]:
                dot = math.fsum(a * b for a, b in zip(xv, code, strict=True))
                if similarity == "inner_product":
                    s = dot
                elif similarity == "cosine":
                    s = dot / max(math.sqrt(math.fsum(b * b for b in code)), 1e-12)
                else:
                    s = -math.fsum((a - b) ** 2 for a, b in zip(xv, code, strict=True))
                scores.append(s)
            order = sorted(range(len(scores)), key=lambda c: (-scores[c], c))
            per_group.append(order[:k])
        out.append(per_group)
    return torch.tensor(out, dtype=torch.long)


def rows_mib(rows: int, groups: int, num_codes: int, itemsize: int = 4) -> float:
    """The chunk_mib that gives the PyTorch search chunks of ``rows`` tokens."""
    return rows * groups * num_codes * itemsize / MIB


@pytest.mark.parametrize("similarity", SIMS)
@pytest.mark.parametrize("k", [1, 2, 3, 6])
def test_near_ties_give_the_brute_force_answer_whatever_the_chunking(similarity, k):
    """The PyTorch path in chunks of 1, 2, 7 and all tokens, float32 and float64."""
    x, w = near_tie_inputs(seed=k)
    want = brute_ids(x, w, k, similarity)
    groups, num_codes = w.shape[:2]
    for rows in (1, 2, 7, x.shape[0]):
        got = torch_topk(x, w, k, similarity, chunk_mib=rows_mib(rows, groups, num_codes))
        assert torch.equal(got, want), f"{rows} rows per chunk"
    got = torch_topk(
        x.double(), w.double(), k, similarity, chunk_mib=rows_mib(2, groups, num_codes, 8)
    )
    assert torch.equal(got, want)


@pytest.mark.parametrize("similarity", SIMS)
@pytest.mark.parametrize("k", [1, 2, 3, 6])
def test_near_ties_give_the_brute_force_answer_whatever_the_kernel_tiles(similarity, k):
    """The compiled kernel with tiles of 1, 2, 7 and 256 tokens, code tiles leaving
    C % tile = 1..7 codes in the last one, the smallest tile a tiny budget allows, one
    and two threads, and every SIMD scan this CPU has."""
    kernel = _native.load()
    assert kernel is not None, "the compiled search kernel should build here"
    x, w = near_tie_inputs(seed=10 + k)
    want = brute_ids(x, w, k, similarity)
    num_codes = w.shape[1]
    tiles = [(1, 17), (2, 16), (7, 51), (256, 20), (5, num_codes)]
    assert {num_codes % cb for _, cb in tiles} >= {1, 7, 3}
    threads = torch.get_num_threads()
    try:
        for n_threads in (1, 2):
            torch.set_num_threads(n_threads)
            for level in range(int(kernel.simd_supported()) + 1):
                with pytest.MonkeyPatch.context() as mp:
                    mp.setenv("CODEBOOK_LENS_SIMD", _native.SIMD_LEVELS[level])
                    for tb, cb in tiles:
                        got = native_topk(kernel, x, w, k, similarity, tok_block=tb, code_block=cb)
                        assert torch.equal(got, want), (n_threads, level, tb, cb)
                    tiny = native_topk(kernel, x, w, k, similarity, chunk_mib=1e-9)
                    assert torch.equal(tiny, want)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("native", [False, True])
@pytest.mark.parametrize("scale", [1e-25, 1e15])
def test_near_ties_of_tiny_and_huge_activations(native, scale):
    """Activations whose squares underflow (or overflow) in float32: their norm, which
    sizes the tolerance, must still be right, or near ties are decided by rounding."""
    x, w = near_tie_inputs(seed=5)
    x = x * scale
    for similarity in ("cosine", "inner_product"):
        for k in (1, 3):
            got = topk_codes(x, w, k, similarity, native_search=native)
            assert torch.equal(got, brute_ids(x, w, k, similarity)), (similarity, k)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_are_ranked_by_their_own_exact_scores(dtype):
    x, w = near_tie_inputs(seed=3)
    x, w = x.to(dtype), w.to(dtype)
    for similarity in SIMS:
        assert torch.equal(topk_codes(x, w, 3, similarity), brute_ids(x, w, 3, similarity))


def test_the_kernel_rescores_bit_for_bit_as_the_pytorch_path():
    kernel = _native.load()
    gen = torch.Generator().manual_seed(0)
    for dim in (1, 3, 12, 64, 100, 768):
        x = torch.randn(50, dim, generator=gen)
        w = torch.randn(50, dim, generator=gen) * torch.rand(50, 1, generator=gen)
        for mode, similarity in enumerate(("inner_product", "cosine", "euclidean")):
            assert torch.equal(kernel.exact_scores(x, w, mode), exact_scores(x, w, similarity))


@pytest.mark.parametrize("native", [False, True])
def test_many_exact_duplicates_keep_the_lowest_ids(native):
    """More tied codes than the kernel holds per token (2k + 16): every one ties, the
    lowest ids win, in order."""
    gen = torch.Generator().manual_seed(1)
    code = 3 * torch.randn(8, generator=gen)  # above every other code for each similarity
    w = torch.randn(1, 300, 8, generator=gen)
    tied = torch.arange(40, 300, 3)  # 87 copies, spread over the code tiles
    w[0, tied] = code
    x = (code + 0.01 * torch.randn(5, 8, generator=gen)).view(5, 1, 8)
    for similarity in SIMS:
        got = topk_codes(x, w, 4, similarity, chunk_mib=1e-9, native_search=native)
        assert torch.equal(got, brute_ids(x, w, 4, similarity))
        assert torch.equal(got[:, 0], tied[:4].expand(5, 4))


@pytest.mark.parametrize("native", [False, True])
def test_zero_and_non_finite_activations(native):
    """A zero activation ties every code (cosine, inner product): ids 0..k-1. A NaN or
    infinite one gets k distinct valid ids and no error."""
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(2, 40, 6, generator=gen)
    x = torch.randn(4, 2, 6, generator=gen)
    x[0] = 0.0
    x[1, 0, 2] = math.nan
    x[2, 1, 0] = math.inf
    for similarity in SIMS:
        ids = topk_codes(x, w, 5, similarity, native_search=native)
        assert ((ids >= 0) & (ids < 40)).all()
        assert (ids.sort(-1).values.diff(dim=-1) != 0).all()
        if similarity != "euclidean":
            assert torch.equal(ids[0], torch.arange(5).expand(2, 5))
        else:  # no tie there: the codes nearest the origin
            assert torch.equal(ids[0], brute_ids(x[:1], w, 5, similarity)[0])
        assert torch.equal(ids[3], brute_ids(x[3:], w, 5, similarity)[0])


def test_simd_override_and_its_refusals(monkeypatch):
    kernel = _native.load()
    best = int(kernel.simd_supported())
    monkeypatch.setenv("CODEBOOK_LENS_SIMD", "scalar")
    assert _native.simd_level(kernel) == 0
    monkeypatch.setenv("CODEBOOK_LENS_SIMD", "sse9")
    with pytest.warns(RuntimeWarning, match="sse9"):
        assert _native.simd_level(kernel) == best
    if best < 2:
        monkeypatch.setenv("CODEBOOK_LENS_SIMD", "avx512")
        with pytest.warns(RuntimeWarning, match="not supported"):
            assert _native.simd_level(kernel) == best


def test_the_path_choice_is_measured_once_recorded_and_read_back(monkeypatch, tmp_path):
    """Enough work to be measured: both paths are timed, the faster one is recorded with
    its times in the per-machine file, and a later process reads the record instead of
    measuring (here: a record edited to the other path is obeyed)."""
    record_file = tmp_path / "search-paths.json"
    monkeypatch.setattr(search_path, "cache_file", lambda: record_file)
    monkeypatch.setattr(search_path, "_choices", {})
    monkeypatch.delenv("CODEBOOK_LENS_SEARCH_PATH", raising=False)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1024, 1, 64, generator=gen)
    w = torch.randn(1, 2048, 64, generator=gen)
    assert 1024 * 2048 * 64 >= topk.MEASURE_MIN_MACS
    path = topk.chosen_path(x, w, 4, "cosine")
    key = topk.shape_class(x, w, 4, "cosine", _native.load())
    record = search_path.recorded(key)
    assert record is not None and record["path"] == path
    faster = min(("kernel", "pytorch"), key=lambda p: record[f"{p}_s"])
    assert path == faster and record["tokens"] == 1024
    other = "pytorch" if path == "kernel" else "kernel"
    data = json.loads(record_file.read_text())
    data[search_path.machine_key()][key]["path"] = other
    record_file.write_text(json.dumps(data))
    monkeypatch.setattr(search_path, "_choices", {})
    assert topk.chosen_path(x, w, 4, "cosine") == other
    # forced, and small calls go to the kernel unmeasured
    monkeypatch.setenv("CODEBOOK_LENS_SEARCH_PATH", "pytorch")
    assert topk.chosen_path(x, w, 4, "cosine") == "pytorch"
    monkeypatch.setenv("CODEBOOK_LENS_SEARCH_PATH", "gpu")
    with pytest.warns(RuntimeWarning, match="'gpu' is not one of auto, kernel, pytorch"):
        assert topk.chosen_path(x, w, 4, "cosine") == other
    monkeypatch.delenv("CODEBOOK_LENS_SEARCH_PATH")
    assert topk.chosen_path(x[:8], w, 4, "cosine") == "kernel"
    assert topk.chosen_path(x.double(), w.double(), 4, "cosine") == "pytorch"


def test_bad_k_and_similarity_are_refused_in_one_sentence():
    x, w = torch.randn(3, 1, 4), torch.randn(1, 5, 4)
    with pytest.raises(
        ValueError, match=r"k must be an integer with 1 <= k <= num_codes \(5\), got 6"
    ):
        topk_codes(x, w, 6)
    with pytest.raises(ValueError, match="similarity must be one of"):
        topk_codes(x, w, 2, "dot")


def test_the_default_chunk_is_256_mib_on_the_cpu_and_gives_the_same_ids():
    """chunk_mib=None is the device's default bound (256 MiB on the CPU); the ids do not
    depend on the bound."""
    assert topk.default_chunk_mib(torch.device("cpu")) == 256.0
    x, w = near_tie_inputs(seed=4)
    for similarity in SIMS:
        want = topk_codes(x, w, 3, similarity, chunk_mib=256.0, native_search=False)
        assert torch.equal(topk_codes(x, w, 3, similarity, native_search=False), want)
