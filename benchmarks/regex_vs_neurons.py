"""Codes against neurons as regex classifiers (paper Figure 3) on a code cache.

For each pattern, over the first ``--tokens`` cached tokens: the code with the highest
precision (among codes firing at least ``--min-count`` times), then the best single
neuron of the model (attention output, MLP output or MLP hidden unit of any layer,
either sign, codebooks off) at a threshold that matches that code's recall.

The same neuron pass also measures both sides along ``--recalls``: at each recall r,
the most precise code whose recall is at least r, and the best neuron at recall r. The
neuron curve bounds what any code can lead by (1 minus the neuron's precision at r),
and the largest code lead over all recalls is reported beside the best code's lead.
Writes ``regex-vs-neurons-<cache>-latest.json`` and a precision-recall plot (SVG).

    python benchmarks/regex_vs_neurons.py runs/cache-smollm2-1m --tokens 200000
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from codebook_lens.analysis.neurons import codes_vs_neurons, curve_table
from codebook_lens.analysis.search import matching_tokens, regex_codes
from codebook_lens.cache.store import CodeCache
from codebook_lens.plots import precision_recall_plot

HERE = Path(__file__).resolve().parent
PATTERNS = {
    "months": r"\b(January|February|March|April|May|June|July|August|September|October"
    r"|November|December)\b",
    "years": r"\b(1[5-9]|20)\d\d\b",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cache_dir")
    parser.add_argument("--tokens", type=int, default=200_000)
    parser.add_argument("--min-count", type=int, default=10)
    parser.add_argument("--patterns", default=",".join(PATTERNS))
    parser.add_argument("--recalls", default="0.1,0.25,0.5,0.75,0.9,1.0")
    args = parser.parse_args()

    cache = CodeCache.open(args.cache_dir)
    grid = [float(r) for r in args.recalls.split(",") if r]
    rows = []
    for name in args.patterns.split(","):
        pattern = PATTERNS[name]
        t0 = time.perf_counter()
        result = regex_codes(
            cache, pattern, min_count=args.min_count, max_tokens=args.tokens, limit=None
        )
        best = result.codes[0]
        positives = matching_tokens(cache, pattern, args.tokens)
        at_best, *curve = codes_vs_neurons(
            cache, positives, result.codes, [best.recall, *grid], max_tokens=args.tokens
        )
        top = at_best.neuron
        points = []
        for p in curve:
            point = {
                "recall": p.recall,
                "neuron": f"{p.neuron.site}[{p.neuron.neuron}]",
                "neuron_precision": p.neuron.precision,
                "code": None if p.code is None else str(p.code.ref),
                "code_precision": None if p.code is None else p.code.precision,
                "code_recall": None if p.code is None else p.code.recall,
            }
            if p.lead is not None:
                point["lead_points"] = 100 * p.lead
            points.append(point)
        leads = [p["lead_points"] for p in points if "lead_points" in p]
        row = {
            "pattern": name,
            "regex": pattern,
            "tokens": result.tokens,
            "matching_tokens": result.matches,
            "code": str(best.ref),
            "code_precision": best.precision,
            "code_recall": best.recall,
            "code_fires": best.count,
            "neuron": f"{top.site}[{top.neuron}]",
            "neuron_sign": top.sign,
            "neuron_precision": top.precision,
            "neuron_recall": top.recall,
            "gap_points": 100 * (best.precision - top.precision),
            "curve": points,
            "max_lead_points": max(leads) if leads else None,
            "seconds": time.perf_counter() - t0,
            "best_neuron_per_site": [n.to_dict() for n in at_best.sites[:10]],
        }
        rows.append(row)
        print(
            f"{name:<7} {result.matches:>6} matches in {result.tokens:,} tokens | code "
            f"{row['code']} precision {best.precision:.3f} at recall {best.recall:.3f} | "
            f"best neuron {row['neuron']} ({top.sign:+d}) precision {top.precision:.3f} at "
            f"recall {top.recall:.3f} | gap {row['gap_points']:+.1f} points",
            flush=True,
        )
        print("\n".join(curve_table(curve)))
    name = Path(args.cache_dir).name
    (HERE / f"regex-vs-neurons-{name}-latest.json").write_text(json.dumps(rows, indent=2))
    plot = HERE / f"regex-vs-neurons-{name}-latest.svg"
    plot.write_text(precision_recall_plot(rows))
    print(f"plot: {plot}")


if __name__ == "__main__":
    main()
