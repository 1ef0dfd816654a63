"""The k-means initialisation of one codebook group, as training runs it: k-means++
seeding (one weighted draw per seed) and the Lloyd iterations, timed apart.

Side by side in one run, the seeding with its draws where the samples are (ours) and
with each draw's weights copied to the CPU first (the way before 2026-12-04), the latter
over fewer seeds (``--old-seeds``) since it is the slow one; both per seed.
The default shape is one attention layer of SmolLM2-135M in configs/paper-gpu.yaml:
9 heads of 64 dimensions, 10,000 codes, 65,536 tokens.

    python benchmarks/kmeans_init.py --device cuda
    python benchmarks/kmeans_init.py --tokens 8192 --codes 1024      # the CPU, a minute

Results: benchmarks/kmeans-init-DEVICE-latest.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from codebook_lens.core.cpu import describe_cpu
from codebook_lens.core.kmeans import kmeans, kmeans_plus_plus, weighted_draw

HERE = Path(__file__).resolve().parent


def seed_on_cpu(a: torch.Tensor, num: int, generator: torch.Generator) -> None:
    """k-means++ seeding with each draw's weights copied to the CPU (the old way)."""
    n, groups, dim = a.shape
    ag = a.transpose(0, 1)
    rows = torch.arange(groups, device=a.device)
    seed = ag[rows, torch.randint(0, n, (groups,), generator=generator).to(a.device)]
    sq = ag.square().sum(-1)
    d2 = sq - 2 * torch.bmm(ag, seed.unsqueeze(-1)).squeeze(-1) + seed.square().sum(-1, True)
    for _ in range(1, num):
        pick = weighted_draw(d2.clamp(min=0).double().cpu(), generator).to(a.device)
        seed = ag[rows, pick]
        d = sq - 2 * torch.bmm(ag, seed.unsqueeze(-1)).squeeze(-1) + seed.square().sum(-1, True)
        d2 = torch.minimum(d2, d.clamp_(min=0))


def timed(fn, device: str) -> float:
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--tokens", type=int, default=65536)
    parser.add_argument("--groups", type=int, default=9)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--codes", type=int, default=10_000)
    parser.add_argument("--old-seeds", type=int, default=500)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: PyTorch sees no CUDA GPU here")
    torch.manual_seed(0)
    # activations with repeats, as a model's are (the same token in the same context)
    a = torch.randn(args.tokens, args.groups, args.dim)
    a[1::7] = a[::7][: a[1::7].shape[0]]
    a = a.to(args.device)
    where = torch.cuda.get_device_name() if args.device == "cuda" else describe_cpu()
    print(f"{args.device}: {where}; torch {torch.__version__}")
    print(f"{args.tokens} tokens x {args.groups} groups x {args.dim} dims, {args.codes} codes")
    gen = lambda: torch.Generator().manual_seed(1)  # noqa: E731
    kmeans_plus_plus(a[:2048], 16, gen())  # warm-up
    old_s = timed(lambda: seed_on_cpu(a, args.old_seeds, gen()), args.device)
    old_per = old_s / max(args.old_seeds - 1, 1)
    ours_s = timed(lambda: kmeans_plus_plus(a, args.codes, gen()), args.device)
    ours_per = ours_s / max(args.codes - 1, 1)
    total_s = timed(lambda: kmeans(a, args.codes, "cosine", args.iters, gen()), args.device)
    rows = {
        "seeding, draws on the CPU (old), per seed ms": old_per * 1e3,
        "seeding, draws on the device (ours), per seed ms": ours_per * 1e3,
        "old / ours per seed": old_per / ours_per,
        f"seeding, {args.codes} seeds (ours) s": ours_s,
        f"seeding, {args.codes} seeds (old, extrapolated) s": old_per * (args.codes - 1),
        f"k-means: seeding + {args.iters} Lloyd iterations (ours) s": total_s,
    }
    for label, value in rows.items():
        print(f"  {label:58s} {value:10.3f}")
    out = args.json or HERE / f"kmeans-init-{args.device}-latest.json"
    report = {
        "command": "python benchmarks/kmeans_init.py " + " ".join(sys.argv[1:]),
        "device": args.device,
        "where": where,
        "torch": torch.__version__,
        "shape": {k: getattr(args, k) for k in ("tokens", "groups", "dim", "codes", "iters")},
        "rows": rows,
    }
    out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
