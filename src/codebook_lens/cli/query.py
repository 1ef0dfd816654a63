"""The queries over a code cache: ``codebook contexts``, ``freq``, ``regex``, ``topic``,
``promotes``, ``similar`` and ``effect``.

Every number is checked by argparse (see :mod:`codebook_lens.cli.args`), every output
path before the cache is read, and the cache itself when it is opened
(:meth:`codebook_lens.cache.store.CodeCache.open`).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from codebook_lens.cli.args import (
    fraction,
    nonneg_int,
    open_fraction,
    positive_int,
    print_json,
)
from codebook_lens.core.errors import CodebookLensError
from codebook_lens.core.files import check_output_file


def _open(path: str):
    from codebook_lens.cache.store import CodeCache

    return CodeCache.open(path)


def _contexts(args: argparse.Namespace) -> int:
    from codebook_lens.core.refs import CodeRef

    cache = _open(args.cache_dir)
    ref = CodeRef.parse(args.code)
    total, page = cache.top_contexts(ref, args.limit, args.offset, args.window, args.order)
    if args.json:
        print_json(
            {
                "code": str(ref),
                "total": total,
                "offset": args.offset,
                "contexts": [c.to_dict() for c in page],
            }
        )
        return 0
    freq = total / max(1, cache.num_tokens)
    print(f"{ref}: fires on {total:,} of {cache.num_tokens:,} tokens ({freq:.4%})")
    for c in page:
        left = c.left.replace("\n", "⏎")[-60:]
        right = c.right.replace("\n", "⏎")[:60]
        token = c.token.replace("\n", "⏎")
        print(f"  [{c.position:>9} r{c.rank}] {left}[[{token}]]{right}")
    return 0


def _freq(args: argparse.Namespace) -> int:
    from codebook_lens.analysis.search import frequency_by_rank

    if args.plot:
        check_output_file(args.plot, "--plot file")
    cache = _open(args.cache_dir)
    keys = [cache.info(args.codebook).key] if args.codebook else list(cache.codebooks)
    rows = {}
    for key in keys:
        ranked = frequency_by_rank(cache, key)
        active = int((ranked > 0).sum())
        rows[key] = {
            "codes": int(ranked.size),
            "active": active,
            "dead_fraction": cache.dead_fraction(key),
            "top10pct_share": float(ranked[: max(1, active // 10)].sum() / max(1, ranked.sum())),
            "most_frequent": float(ranked[0] / max(1, cache.num_tokens)),
        }
    if args.plot:
        from codebook_lens.plots import frequency_plot

        svg = frequency_plot({k: frequency_by_rank(cache, k).tolist() for k in keys})
        Path(args.plot).write_text(svg)
    if args.json:
        print_json({"tokens": cache.num_tokens, "codebooks": rows, "plot": args.plot})
        return 0
    print(f"{'codebook':<24}{'codes':>8}{'active':>8}{'dead':>8}{'top10% share':>14}")
    for key, r in rows.items():
        print(
            f"{key:<24}{r['codes']:>8}{r['active']:>8}{r['dead_fraction']:>8.1%}"
            f"{r['top10pct_share']:>14.1%}"
        )
    if args.plot:
        print(f"plot: {args.plot}")
    return 0


def _regex(args: argparse.Namespace) -> int:
    from codebook_lens.analysis.neurons import codes_vs_neurons, curve_table
    from codebook_lens.analysis.search import matching_tokens, regex_codes, score_codes

    cache = _open(args.cache_dir)
    recalls = _recall_list(args.recalls) if args.recalls else []
    result = regex_codes(
        cache,
        args.pattern,
        min_precision=args.min_precision,
        min_recall=args.min_recall,
        min_count=args.min_count,
        limit=args.limit,
        sort=args.sort,
        max_tokens=args.max_tokens,
    )
    data = result.to_dict()
    if (args.neurons or recalls) and result.codes:
        best = result.codes[0]
        positives = matching_tokens(cache, args.pattern, args.max_tokens)
        # the curve needs every candidate code (the listed ones are cut at --limit)
        candidates = (
            score_codes(
                cache, positives, min_count=args.min_count, limit=None, max_tokens=args.max_tokens
            )
            if recalls
            else result.codes
        )
        at_best, *curve = codes_vs_neurons(
            cache, positives, candidates, [best.recall, *recalls], max_tokens=args.max_tokens
        )
        data["neuron_baseline"] = {
            "recall_matched": best.recall,
            "best_code_precision": best.precision,
            "sites": [s.to_dict() for s in at_best.sites],
        }
        if curve:
            data["curve"] = [p.to_dict() for p in curve]
    if args.json:
        print_json(data)
        return 0
    print(
        f"{args.pattern!r}: {result.matches:,} matching tokens of {result.tokens:,} "
        f"({result.seconds * 1000:.0f} ms)"
    )
    print(f"  {'code':<30}{'precision':>10}{'recall':>9}{'fires':>9}")
    for s in result.codes:
        print(f"  {str(s.ref):<30}{s.precision:>10.3f}{s.recall:>9.3f}{s.count:>9}")
    if "neuron_baseline" in data:
        top = data["neuron_baseline"]["sites"][0]
        print(
            f"best neuron at recall {top['recall']:.3f}: {top['site']}[{top['neuron']}] "
            f"(sign {top['sign']:+d}) precision {top['precision']:.3f}"
        )
    if "curve" in data:
        print("\n".join(curve_table(curve)))
    return 0


def _recall_list(text: str) -> list[float]:
    """``0.25,0.5,1`` -> floats in (0, 1], or a CLI error naming the bad value."""
    out = []
    for part in text.split(","):
        try:
            value = float(part)
        except ValueError:
            value = math.nan
        if not 0.0 < value <= 1.0:
            raise CodebookLensError(
                f"--recalls takes recalls in (0, 1] separated by commas, got {part!r}"
            )
        out.append(value)
    return out


def _topic(args: argparse.Namespace) -> int:
    from codebook_lens.analysis.search import topic_codes

    cache = _open(args.cache_dir)
    hits = topic_codes(
        cache,
        args.text,
        min_fraction=args.min_fraction,
        max_frequency=args.max_frequency,
        limit=args.limit,
    )
    if args.json:
        print_json({"text": args.text, "codes": [h.to_dict() for h in hits]})
        return 0
    print(f"  {'code':<30}{'coverage':>10}{'frequency':>11}")
    for h in hits:
        print(f"  {str(h.ref):<30}{h.coverage:>10.2f}{h.frequency:>11.5f}")
    if not hits:
        print("  no code covers that much of the text at that frequency")
    return 0


def _promotes(args: argparse.Namespace) -> int:
    from codebook_lens.analysis.search import effect_codes

    cache = _open(args.cache_dir)
    words = [w for w in args.words.split(",") if w.strip()]
    hits = effect_codes(cache, words, max_frequency=args.max_frequency, limit=args.limit)
    if args.json:
        print_json({"words": words, "codes": [h.to_dict() for h in hits]})
        return 0
    print(f"  {'code':<30}{'score':>8}{'frequency':>11}  promoted words")
    for h in hits:
        shown = ", ".join(repr(w) for w in h.words[:6])
        print(f"  {str(h.ref):<30}{h.score:>8.2f}{h.frequency:>11.5f}  {shown}")
    if not hits:
        print("  no code at that frequency promotes those words among its top tokens")
    return 0


def _similar(args: argparse.Namespace) -> int:
    from codebook_lens.analysis.search import similar_codes
    from codebook_lens.core.refs import CodeRef

    cache = _open(args.cache_dir)
    found = similar_codes(cache, CodeRef.parse(args.code), args.top)
    if args.json:
        print_json([{"code": str(r), "cosine": v} for r, v in found])
        return 0
    for r, v in found:
        print(f"  {str(r):<30}{v:>8.3f}")
    return 0


def _effect(args: argparse.Namespace) -> int:
    from codebook_lens.analysis.search import logit_effect
    from codebook_lens.core.refs import CodeRef

    cache = _open(args.cache_dir)
    eff = logit_effect(cache, CodeRef.parse(args.code), args.top)
    if args.json:
        print_json(eff)
        return 0
    print(f"{eff['code']} promotes: " + ", ".join(repr(t["token"]) for t in eff["promoted"]))
    print(f"{eff['code']} suppresses: " + ", ".join(repr(t["token"]) for t in eff["suppressed"]))
    return 0


def add_parsers(sub) -> None:
    p = sub.add_parser("contexts", help="where a code fires, with the text around it")
    p.add_argument("cache_dir", metavar="CACHE_DIR")
    p.add_argument("code", metavar="CODE", help="e.g. layer12_mlp:345 or layer2_attn_heads/3:17")
    p.add_argument("--limit", type=positive_int, default=20)
    p.add_argument("--offset", type=nonneg_int, default=0)
    p.add_argument("--window", type=nonneg_int, default=12, help="tokens each side")
    p.add_argument("--order", default="rank", choices=["rank", "corpus"])
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_contexts)

    p = sub.add_parser("freq", help="code frequency by rank and dead codes per codebook")
    p.add_argument("cache_dir", metavar="CACHE_DIR")
    p.add_argument("--codebook", default=None, help="one codebook, e.g. layer12_mlp")
    p.add_argument("--plot", default=None, metavar="FILE.svg", help="write a rank-frequency plot")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_freq)

    p = sub.add_parser("regex", help="codes ranked by precision/recall on a regex's matches")
    p.add_argument("cache_dir", metavar="CACHE_DIR")
    p.add_argument("pattern", help="an RE2 pattern")
    p.add_argument("--min-precision", type=fraction, default=0.0)
    p.add_argument("--min-recall", type=fraction, default=0.0)
    p.add_argument("--min-count", type=positive_int, default=1)
    p.add_argument("--limit", type=positive_int, default=20)
    p.add_argument("--sort", default="precision", choices=["precision", "recall", "f1", "count"])
    p.add_argument(
        "--max-tokens", type=positive_int, default=None, help="search the first N tokens"
    )
    p.add_argument(
        "--neurons", action="store_true", help="also the best neuron at the best code's recall"
    )
    p.add_argument(
        "--recalls",
        default=None,
        metavar="R1,R2,...",
        help="also, at each recall, the best neuron against the most precise code of at least "
        "that recall (runs the model once over the tokens, like --neurons)",
    )
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_regex)

    p = sub.add_parser("topic", help="codes that cover a text (runs the cache's model)")
    p.add_argument("cache_dir", metavar="CACHE_DIR")
    p.add_argument("text")
    p.add_argument("--min-fraction", type=open_fraction, default=0.5)
    p.add_argument("--max-frequency", type=open_fraction, default=0.01)
    p.add_argument("--limit", type=positive_int, default=20)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_topic)

    p = sub.add_parser(
        "promotes", help="codes whose direct effect on the logits promotes given words"
    )
    p.add_argument("cache_dir", metavar="CACHE_DIR")
    p.add_argument("--words", required=True, help="comma-separated, e.g. war,army,battle")
    p.add_argument("--max-frequency", type=open_fraction, default=0.01)
    p.add_argument("--limit", type=positive_int, default=20)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_promotes)

    p = sub.add_parser("similar", help="codes whose vectors are closest (cosine) to a code's")
    p.add_argument("cache_dir", metavar="CACHE_DIR")
    p.add_argument("code", metavar="CODE")
    p.add_argument("--top", type=positive_int, default=10)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_similar)

    p = sub.add_parser("effect", help="tokens a code promotes and suppresses (direct path)")
    p.add_argument("cache_dir", metavar="CACHE_DIR")
    p.add_argument("code", metavar="CODE")
    p.add_argument("--top", type=positive_int, default=10)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_effect)
