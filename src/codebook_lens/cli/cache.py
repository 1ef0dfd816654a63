"""``codebook cache``: run a codebook model over a corpus and cache every code.

The queries over a cache (contexts, freq, regex, ...) are in :mod:`codebook_lens.cli.query`.
"""

from __future__ import annotations

import argparse

from codebook_lens.cli.args import positive_int, print_json
from codebook_lens.core.files import check_output_dir


def _cache(args: argparse.Namespace) -> int:
    from codebook_lens.cache.build import build_cache, corpus_documents
    from codebook_lens.core.loading import check_positions, load_codebook_model

    check_output_dir(args.out, "--out directory")
    loaded = load_codebook_model(args.model_dir)
    check_positions(loaded, args.seq_len, f"--seq-len {args.seq_len}")
    texts = corpus_documents(args.corpus, loaded, args.split, args.max_tokens, args.seq_len)
    result = build_cache(
        loaded,
        texts,
        args.out,
        corpus_name=args.corpus if args.corpus != "offline" else f"offline:{args.split}",
        max_tokens=args.max_tokens,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        restart=args.restart,
        overwrite=args.overwrite,
    )
    rate = (result.tokens - result.resumed_from) / max(result.forward_seconds, 1e-9)
    summary = {
        "cache": str(result.path),
        "tokens": result.tokens,
        "resumed_from": result.resumed_from,
        "seconds": round(result.seconds, 2),
        "forward_tokens_per_second": round(rate, 1),
        "code_bytes_per_token": result.bytes_per_token,
    }
    if args.json:
        print_json(summary)
    else:
        print(
            f"cached {result.tokens:,} tokens in {result.seconds:.1f} s "
            f"(model forward {rate:,.0f} tok/s) -> {result.path}"
        )
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("cache", help="run a codebook model over a corpus and cache every code")
    p.add_argument("model_dir", metavar="MODEL_DIR", help="a saved codebook model")
    p.add_argument(
        "--corpus",
        default="offline",
        help="offline (the packaged corpus), a text/jsonl file or directory, a datasets "
        "directory, or fsm (walks of a TokFSM model's machine)",
    )
    p.add_argument("--split", default="train", choices=["train", "eval"])
    p.add_argument("--out", required=True, metavar="CACHE_DIR")
    p.add_argument("--max-tokens", type=positive_int, default=None, metavar="N")
    p.add_argument("--seq-len", type=positive_int, default=128)
    p.add_argument("--batch-size", type=positive_int, default=8)
    p.add_argument("--restart", action="store_true", help="discard an unfinished build")
    p.add_argument("--overwrite", action="store_true", help="replace an existing cache")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cache)
