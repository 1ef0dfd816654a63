"""Cache build throughput against the plain forward pass of the same model, same batches.

The corpus is tokenized once and cut into the blocks the cache uses. Then, in one
process and alternating (plain, build, plain, build, ...) so that machine drift hits
both, it times

    plain: model(blocks) batch by batch, nothing kept (inference mode, no KV cache)
    build: build_cache(...) end to end over the same documents: tokenizing, the forward
           passes with code capture, writing the memory-mapped code arrays, the
           inverted index, the counts, the logit effects, the Parquet tables

and prints both throughputs and their ratio (target: build >= 90% of plain).

    python benchmarks/cache_build.py runs/smollm2-cpu/model --tokens 32768
    python benchmarks/cache_build.py runs/tokfsm-cpu/codebook/model --corpus fsm --tokens 1000000
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from codebook_lens.cache.build import build_cache, corpus_documents, tokenize_stream
from codebook_lens.core.loading import load_codebook_model

HERE = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir")
    parser.add_argument("--corpus", default="offline")
    parser.add_argument("--tokens", type=int, default=32768)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()

    loaded = load_codebook_model(args.model_dir)
    model = loaded.model
    docs = list(corpus_documents(args.corpus, loaded, "train", args.tokens, args.seq_len))
    stream = tokenize_stream(docs, loaded.codec, args.tokens)
    ids = torch.from_numpy(stream.token_ids.astype(np.int64))
    n = ids.numel()
    step = args.seq_len * args.batch_size

    def plain() -> float:
        t0 = time.perf_counter()
        with torch.inference_mode():
            for s in range(0, n, step):
                chunk = ids[s : s + step]
                full = chunk.numel() // args.seq_len
                if full:
                    model(chunk[: full * args.seq_len].view(full, -1), use_cache=False)
                if chunk.numel() % args.seq_len:
                    model(chunk[full * args.seq_len :].view(1, -1), use_cache=False)
        return time.perf_counter() - t0

    def build() -> tuple[float, float]:
        tmp = Path(tempfile.mkdtemp(prefix="cache-bench-"))
        try:
            t0 = time.perf_counter()
            result = build_cache(
                loaded,
                docs,
                tmp / "cache",
                max_tokens=args.tokens,
                seq_len=args.seq_len,
                batch_size=args.batch_size,
            )
            return time.perf_counter() - t0, result.forward_seconds
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    plain()  # warm-up (allocator, kernels)
    t_plain, t_build, t_fwd = [], [], []
    for _ in range(args.rounds):
        t_plain.append(plain())
        total, fwd = build()
        t_build.append(total)
        t_fwd.append(fwd)
    p, b, f = (statistics.median(x) for x in (t_plain, t_build, t_fwd))
    result = {
        "model": args.model_dir,
        "tokens": n,
        "threads": torch.get_num_threads(),
        "plain_tokens_per_s": n / p,
        "build_tokens_per_s": n / b,
        "build_forward_tokens_per_s": n / f,
        "ratio_end_to_end": p / b,
        "ratio_forward_loop": p / f,
        "rounds": args.rounds,
    }
    print(
        f"{args.model_dir}: {n:,} tokens, {torch.get_num_threads()} threads, median of {args.rounds}"
    )
    print(f"  plain forward         {n / p:10.1f} tok/s")
    print(f"  cache build (all)     {n / b:10.1f} tok/s   ratio {p / b:.3f}")
    print(f"  build's forward loop  {n / f:10.1f} tok/s   ratio {p / f:.3f}")
    name = Path(args.model_dir).parts[1] if len(Path(args.model_dir).parts) > 1 else "model"
    (HERE / f"cache-build-{name}-latest.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
