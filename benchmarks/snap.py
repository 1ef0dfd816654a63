"""Forward and forward+backward cost of the codebook bottleneck, next to its lower bound.

For each shape, in one run and one process:
  matmul   the bare similarity matmul of the same shape into a preallocated output
           (the FLOP floor every exact search pays),
  ours     codebook_lens.Codebook: forward, and forward+backward with the reconstruction
           loss, on the path topk_codes chooses for this machine; then forward with each
           search path forced (the compiled kernel, the pure-PyTorch chunked search),
  naive    a dense PyTorch version: the full score matrix, topk, gather-sum with autograd
           and a straight-through estimator.
Rows are timed in interleaved rounds, so that drift of a shared machine hits every row
alike; times are medians and minima over the rounds, and ratios are to the bare matmul
of the same round set. Peak memory is the rise of resident memory during one call (see
memtime.py), with glibc's mmap threshold fixed so that it does not depend on what ran
before. The CPU's model and vector features, the SIMD scan in use (and whether
CODEBOOK_LENS_SIMD forced it) and the path chosen per case are printed and recorded.
With --simd avx2 the run restarts with MKL_ENABLE_INSTRUCTIONS=AVX2 and
ATEN_CPU_CAPABILITY=avx2, so that the libraries' kernels (the bare matmul's too) are
the AVX2 ones as well.
The results go to benchmarks/snap-latest.json (snap-SIMD-latest.json with --simd).

    python benchmarks/snap.py                  # full shapes
    python benchmarks/snap.py --simd avx2      # as on an AVX2 CPU, on an AVX-512 one
                                               # (results: benchmarks/snap-avx2-latest.json)
    python benchmarks/snap.py --quick          # small shapes, seconds
    python benchmarks/snap.py --device cuda    # on a GPU (results: snap-cuda-latest.json)

On CUDA every call is timed between two synchronisations, peak memory is the rise of
PyTorch's peak allocation over what was allocated before the call, there is no compiled
kernel (the PyTorch search is the path), three more rows time the forward with larger
bounds on the score matrix held at once (chunk_mib), and two the forward+backward under
bf16 autocast, as training runs on a GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from memtime import peak_extra_mib  # noqa: E402

from codebook_lens.core import _native, search_path  # noqa: E402
from codebook_lens.core.codebook import Codebook, CodebookConfig, search_keys  # noqa: E402
from codebook_lens.core.cpu import cpu_info, describe_cpu  # noqa: E402
from codebook_lens.core.topk import chosen_path, shape_class  # noqa: E402

HERE = Path(__file__).resolve().parent
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
    groups = torch.arange(weight.shape[0], device=weight.device).view(1, -1, 1)
    q = weight[groups, ids].sum(-2)  # (N, G, d)
    out = a + (q - a).detach()
    loss = F.mse_loss(q, a.detach())
    return out.reshape(x.shape), loss


@contextlib.contextmanager
def forced_path(path: str):
    """Run topk_codes on one search path ("kernel" or "pytorch")."""
    before = os.environ.get("CODEBOOK_LENS_SEARCH_PATH")
    os.environ["CODEBOOK_LENS_SEARCH_PATH"] = path
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("CODEBOOK_LENS_SEARCH_PATH")
        else:
            os.environ["CODEBOOK_LENS_SEARCH_PATH"] = before


def cuda_peak_extra_mib(fn) -> float:
    """MiB that PyTorch's CUDA allocator holds at the call's peak beyond what it held
    before the call."""
    gc.collect()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def bf16(fn):
    """``fn`` under CUDA bf16 autocast."""

    def wrapped():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return fn()

    return wrapped


def run_case(name, tokens, repeats, similarity, kernel, device="cpu"):
    shape = CASES[name]
    G, d, C, k = shape["groups"], shape["dim"], shape["num_codes"], shape["k"]
    cuda = device == "cuda"
    torch.manual_seed(0)
    cb = Codebook(d, CodebookConfig(num_codes=C, k=k, similarity=similarity), groups=G)
    cb.to(device)
    x = torch.randn(tokens, G * d).to(device)
    xg = x.detach().view(tokens, G, d).transpose(0, 1)
    keys_t = search_keys(cb.weight.detach(), similarity)[0].transpose(1, 2).contiguous()
    full = [torch.empty(G, tokens, C, device=device)]  # the whole score matrix, allocated once
    upstream = torch.randn(tokens, G * d).to(device)

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

    def on(path):
        def fn():
            with forced_path(path):
                return cb(x.requires_grad_(True)).output

        return fn

    # the path the default takes (measured now if this machine has no record of it yet)
    path = chosen_path(x.detach().view(tokens, G, d), cb.weight.detach(), k, similarity)
    fns = {
        "matmul": bare,
        "ours fwd": ours_fwd,
        "ours fwd+bwd": ours_fwdbwd,
        "ours fwd, kernel": on("kernel") if kernel is not None else None,
        "ours fwd, pytorch search": on("pytorch"),
        "naive fwd": naive_fwd,
        "naive fwd+bwd": naive_fwdbwd,
    }

    def chunked(mib):  # "ours fwd" with another bound on the score matrix held at once
        def fn():
            before, cb.config.chunk_mib = cb.config.chunk_mib, mib
            try:
                return cb(x.requires_grad_(True)).output
            finally:
                cb.config.chunk_mib = before

        return fn

    if cuda:  # no compiled kernel on a GPU; training there runs under bf16 autocast
        for mib in (1024, 4096, 16384):
            fns[f"ours fwd, {mib} MiB chunks"] = chunked(mib)
        fns["ours fwd, kernel"] = None
        fns["ours fwd, pytorch search"] = None  # the only path there: "ours fwd"
        fns["ours fwd+bwd, bf16 autocast"] = bf16(ours_fwdbwd)
        fns["naive fwd+bwd, bf16 autocast"] = bf16(naive_fwdbwd)
    fns = {label: fn for label, fn in fns.items() if fn is not None}
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    times = {label: [] for label in fns}
    for fn in fns.values():
        fn()  # warm-up
    for _ in range(repeats):
        for label, fn in fns.items():
            gc.collect()
            sync()
            start = time.perf_counter()
            fn()
            sync()
            times[label].append(time.perf_counter() - start)
    full.clear()  # peak memory is read without the whole score matrix resident
    peak = cuda_peak_extra_mib if cuda else peak_extra_mib
    rows = {}
    for label, fn in fns.items():
        rows[label] = {
            "time_s": statistics.median(times[label]),
            "min_s": min(times[label]),
            "times_s": times[label],
            "peak_extra_mib": peak(fn) if label != "matmul" else 0.0,
        }
    m0, n0 = rows["matmul"]["time_s"], rows["matmul"]["min_s"]
    for row in rows.values():
        row["x_matmul_median"] = row["time_s"] / m0
        row["x_matmul_min"] = row["min_s"] / n0
    x3 = x.detach().view(tokens, G, d)
    record = (
        search_path.recorded(shape_class(x3, cb.weight, k, similarity, kernel))
        if kernel and not cuda
        else None
    )
    return {
        "case": name,
        "tokens": tokens,
        "similarity": similarity,
        **shape,
        "path": path,
        "path_record": record,
        "rows": rows,
        "memory_naive_over_ours_fwdbwd": rows["naive fwd+bwd"]["peak_extra_mib"]
        / max(rows["ours fwd+bwd"]["peak_extra_mib"], 1e-9),
    }


def fixed_mmap_threshold(nbytes: int = 128 * 1024) -> None:
    """Serve every allocation of ``nbytes`` or more by mmap and give it back at free.

    glibc raises its mmap threshold after large frees, after which large tensors come
    from the heap and their pages may stay resident when freed: the rise of resident
    memory during a call then depends on what ran before. With the threshold fixed, it
    is the memory the call itself touches.
    """
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, nbytes)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--similarity", default="cosine")
    parser.add_argument("--cases", nargs="*", default=list(CASES))
    parser.add_argument(
        "--simd",
        choices=["auto", *_native.SIMD_LEVELS],
        default=None,
        help="force a SIMD scan (sets CODEBOOK_LENS_SIMD for this run)",
    )
    parser.add_argument("--quick", action="store_true", help="1024 tokens, 1 repeat")
    parser.add_argument(
        "--device", choices=["cpu", "cuda"], default="cpu", help="where the codebook runs"
    )
    parser.add_argument(
        "--json",
        type=Path,
        help="where to write the results (default benchmarks/snap-latest.json, or "
        "benchmarks/snap-SIMD-latest.json with --simd)",
    )
    args = parser.parse_args()
    if args.quick:
        args.tokens, args.repeats = 1024, 1
    if args.simd == "avx2" and os.environ.get("MKL_ENABLE_INSTRUCTIONS") != "AVX2":
        # the whole process as on an AVX2 CPU: our scan, MKL's kernels (the bare matmul
        # among them) and ATen's; the libraries read these at start, hence the restart
        env = dict(os.environ, MKL_ENABLE_INSTRUCTIONS="AVX2", ATEN_CPU_CAPABILITY="avx2")
        os.execve(sys.executable, [sys.executable, *sys.argv], env)
    if args.simd:
        os.environ["CODEBOOK_LENS_SIMD"] = args.simd
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: PyTorch sees no CUDA GPU here")
    if args.json is None:
        forced = args.simd not in (None, "auto")
        args.json = HERE / (
            "snap-cuda-latest.json"
            if args.device == "cuda"
            else f"snap-{args.simd}-latest.json"
            if forced
            else "snap-latest.json"
        )
    fixed_mmap_threshold()
    kernel = _native.load()
    cpu = cpu_info()
    simd = _native.SIMD_LEVELS[_native.simd_level(kernel)] if kernel is not None else None
    forced_simd = os.environ.get("CODEBOOK_LENS_SIMD") or None
    load_before = os.getloadavg()
    print(f"CPU: {describe_cpu(cpu)}")
    gpu = None
    if args.device == "cuda":
        props = torch.cuda.get_device_properties(0)
        gpu = {
            "name": props.name,
            "memory_gib": round(props.total_memory / 2**30, 1),
            "multiprocessors": props.multi_processor_count,
            "cuda": torch.version.cuda,
            "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
        }
        print(
            f"GPU: {gpu['name']}, {gpu['memory_gib']} GiB, {gpu['multiprocessors']} SMs, "
            f"CUDA {gpu['cuda']}, TF32 matmuls {'on' if gpu['tf32_matmul'] else 'off'}"
        )
    if kernel is None:
        print("compiled kernel: not available (PyTorch search only)")
    else:
        best = _native.SIMD_LEVELS[int(kernel.simd_supported())]
        how = f"forced by CODEBOOK_LENS_SIMD={forced_simd}" if forced_simd else "auto"
        print(f"compiled kernel: SIMD scan {simd} ({how}; best on this CPU: {best})")
    libs = {
        name: os.environ.get(name) for name in ("MKL_ENABLE_INSTRUCTIONS", "ATEN_CPU_CAPABILITY")
    }
    aten = torch.backends.cpu.get_cpu_capability()
    set_libs = "".join(f", {name}={value}" for name, value in libs.items() if value)
    print(
        f"torch {torch.__version__} (ATen kernels: {aten}{set_libs}), "
        f"{torch.get_num_threads()} threads, {args.tokens} tokens, "
        f"similarity={args.similarity}; load average before: {load_before[0]:.1f}"
    )
    results = []
    for name in args.cases:
        res = run_case(name, args.tokens, args.repeats, args.similarity, kernel, args.device)
        results.append(res)
        print(f"\n{name}: {res['groups']} x {res['dim']} dims, C={res['num_codes']}, k={res['k']}")
        rec = res["path_record"]
        how = "forced" if search_path.forced() else ("measured" if rec else "rule: little work")
        extra = ""
        if rec:
            extra = (
                f" (kernel {rec['kernel_s'] * 1e3:.0f} ms, pytorch {rec['pytorch_s'] * 1e3:.0f} ms"
                f" on {rec['tokens']} tokens)"
            )
        print(f"  search path used by default: {res['path']} [{how}]{extra}")
        print(
            f"  {'':26s} {'median s':>8s} {'x matmul':>8s} {'min s':>7s} {'x matmul':>8s} {'peak MiB':>8s}"
        )
        for label, row in res["rows"].items():
            print(
                f"  {label:26s} {row['time_s']:8.3f} {row['x_matmul_median']:8.2f} "
                f"{row['min_s']:7.3f} {row['x_matmul_min']:8.2f} {row['peak_extra_mib']:8.0f}"
            )
        print(f"  naive/ours peak memory, fwd+bwd: {res['memory_naive_over_ours_fwdbwd']:.1f}x")
    load_after = os.getloadavg()
    print(f"\nload average after: {load_after[0]:.1f} (on {os.cpu_count()} CPUs)")
    report = {
        "command": "python benchmarks/snap.py " + " ".join(sys.argv[1:]),
        "device": args.device,
        "gpu": gpu,
        "cpu": {**dataclasses.asdict(cpu), "kind": cpu.kind},
        "simd": simd,
        "simd_forced": forced_simd,
        "aten_capability": aten,
        "library_env": libs,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "load_average": {"before": load_before[0], "after": load_after[0]},
        "cases": results,
    }
    args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
