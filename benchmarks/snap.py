"""Forward and forward+backward cost of the codebook bottleneck, next to its lower bound.

For each shape, in one run and one process:
  matmul   the bare similarity matmul of the same shape into a preallocated output
           (the FLOP floor every exact search pays),
  ours     codebook_lens.Codebook: forward, and forward+backward with the reconstruction
           loss (compiled search kernel), and forward with the pure-PyTorch chunked search,
  naive    a dense PyTorch version: the full score matrix, topk, gather-sum with autograd
           and a straight-through estimator.
Rows are timed in interleaved rounds; times are medians and minima over the rounds (on a
shared machine other load only adds time, so the minima are the steadier figures); ratios
are to the bare matmul. Peak memory is the rise of resident
memory during one call (see memtime.py).

    python benchmarks/snap.py            # full shapes (about 2 minutes on 2 cores)
    python benchmarks/snap.py --quick    # small shapes, seconds
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from memtime import peak_extra_mib  # noqa: E402

import codebook_lens.core.codebook as codebook_mod  # noqa: E402
from codebook_lens.core.codebook import Codebook, CodebookConfig, search_keys  # noqa: E402

CASES = {
    "heads": dict(groups=16, dim=64, num_codes=10_000, k=8),
    "vanilla": dict(groups=1, dim=768, num_codes=10_000, k=8),
}


def naive_forward(x, weight, k, similarity):
    """Dense reference: full (N, G, C) scores, topk, gather, straight-through."""
    a = x.view(x.shape[0], weight.shape[0], weight.shape[2])
    keys, bias = search_keys(weight, similarity)
    scores = torch.einsum("ngd,gcd->ngc", a, keys.detach())
    if bias is not None:
        scores = 2 * scores + bias.squeeze(1)
    ids = scores.topk(k, dim=-1).indices  # (N, G, k)
    q = weight[torch.arange(weight.shape[0]).view(1, -1, 1), ids].sum(-2)  # (N, G, d)
    out = a + (q - a).detach()
    loss = F.mse_loss(q, a.detach())
    return out.reshape(x.shape), loss


@contextlib.contextmanager
def native_disabled():
    """Run the pure-PyTorch chunked search instead of the compiled kernel."""
    real = codebook_mod.topk_codes
    codebook_mod.topk_codes = functools.partial(real, native_search=False)
    try:
        yield
    finally:
        codebook_mod.topk_codes = real


def run_case(name, tokens, repeats, similarity):
    shape = CASES[name]
    G, d, C, k = shape["groups"], shape["dim"], shape["num_codes"], shape["k"]
    torch.manual_seed(0)
    cb = Codebook(d, CodebookConfig(num_codes=C, k=k, similarity=similarity), groups=G)
    x = torch.randn(tokens, G * d)
    xg = x.detach().view(tokens, G, d).transpose(0, 1)
    keys_t = search_keys(cb.weight.detach(), similarity)[0].transpose(1, 2).contiguous()
    full = [torch.empty(G, tokens, C)]  # the whole score matrix, allocated once
    upstream = torch.randn(tokens, G * d)

    def bare():
        return torch.bmm(xg, keys_t, out=full[0])

    def ours_fwd():
        return cb(x.requires_grad_(True)).output

    def ours_fwdbwd():
        out = cb(x.requires_grad_(True))
        ((out.output * upstream).sum() + out.loss).backward()
        cb.weight.grad = None
        x.grad = None

    def naive_fwd():
        return naive_forward(x.requires_grad_(True), cb.weight, k, similarity)[0]

    def naive_fwdbwd():
        out, loss = naive_forward(x.requires_grad_(True), cb.weight, k, similarity)
        ((out * upstream).sum() + loss).backward()
        cb.weight.grad = None
        x.grad = None

    def ours_torch_fwd():
        with native_disabled():
            return cb(x.requires_grad_(True)).output

    fns = {
        "matmul": bare,
        "ours fwd": ours_fwd,
        "ours fwd+bwd": ours_fwdbwd,
        "ours fwd, pytorch search": ours_torch_fwd,
        "naive fwd": naive_fwd,
        "naive fwd+bwd": naive_fwdbwd,
    }
    # rounds interleave the rows, so drift of a shared machine hits every row alike
    times = {label: [] for label in fns}
    for fn in fns.values():
        fn()  # warm-up (and the compiled kernel's first build)
    for _ in range(repeats):
        for label, fn in fns.items():
            gc.collect()
            start = time.perf_counter()
            fn()
            times[label].append(time.perf_counter() - start)
    full.clear()  # peak memory is read without the whole score matrix resident
    rows = {}
    for label, fn in fns.items():
        rows[label] = {
            "time_s": statistics.median(times[label]),
            "min_s": min(times[label]),
            "times_s": times[label],
            "peak_extra_mib": peak_extra_mib(fn) if label != "matmul" else 0.0,
        }
    return {"case": name, "tokens": tokens, "similarity": similarity, **shape, "rows": rows}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--similarity", default="cosine")
    parser.add_argument("--cases", nargs="*", default=list(CASES))
    parser.add_argument("--quick", action="store_true", help="1024 tokens, 1 repeat")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    if args.quick:
        args.tokens, args.repeats = 1024, 1
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{args.tokens} tokens, similarity={args.similarity}"
    )
    results = []
    for name in args.cases:
        res = run_case(name, args.tokens, args.repeats, args.similarity)
        results.append(res)
        s = res
        print(f"\n{name}: {s['groups']} x {s['dim']} dims, C={s['num_codes']}, k={s['k']}")
        med, low = res["rows"]["matmul"]["time_s"], res["rows"]["matmul"]["min_s"]
        print(
            f"  {'':26s} {'median s':>8s} {'x matmul':>8s} {'min s':>7s} {'x matmul':>8s} {'peak MiB':>8s}"
        )
        for label, row in res["rows"].items():
            print(
                f"  {label:26s} {row['time_s']:8.3f} {row['time_s'] / med:8.2f} "
                f"{row['min_s']:7.3f} {row['min_s'] / low:8.2f} {row['peak_extra_mib']:8.0f}"
            )
        r = res["rows"]
        print(
            f"  naive/ours peak memory, fwd+bwd: "
            f"{r['naive fwd+bwd']['peak_extra_mib'] / max(r['ours fwd+bwd']['peak_extra_mib'], 1):.1f}x"
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
