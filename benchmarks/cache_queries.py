"""Query latency and storage of a code cache (targets on a 1M-token cache: regex search
< 1 s, top contexts of a code < 50 ms, topic search < 200 ms).

Timed in one process after opening the cache (the first query of each kind also
reads the token table or loads the model; that cold time is printed separately):

    regex   regex_codes over the whole cache for a few realistic patterns
    top     top_contexts(code, limit=20) for random live codes of every codebook
    topic   topic_codes for short texts (runs the model on the text)

    python benchmarks/cache_queries.py runs/cache-smollm2-1m
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np

from codebook_lens.analysis.search import regex_codes, topic_codes
from codebook_lens.cache.store import CodeCache
from codebook_lens.core.refs import CodeRef

HERE = Path(__file__).resolve().parent

TEXT_PATTERNS = [
    r"\b(January|February|March|April|May|June|July|August|September|October|November|December)\b",
    r"\b(1[5-9]|20)\d\d\b",
    r"\bthe\b",
    r"[A-Z][a-z]+ing\b",
    r"(a+)+$",
]
FSM_PATTERNS = [r"\|", r"42", r"(?:\d\d)*17", r"[0-4][5-9]"]
TEXT_TOPICS = [
    "The king and his army marched to the castle, where the queen waited with her knights.",
    "In 1999 the company reported revenue of 3 million dollars, up from the previous year.",
    "The river flows through the valley into the sea, past forests and mountains.",
]
FSM_TOPICS = ["|1742174217421742", "|0099009900990099"]


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q))


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cache_dir")
    parser.add_argument("--codes", type=int, default=200, help="random codes for top contexts")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()

    t0 = time.perf_counter()
    cache = CodeCache.open(args.cache_dir)
    open_s = time.perf_counter() - t0
    fsm = cache.manifest.get("model_kind") == "tokfsm"
    patterns = FSM_PATTERNS if fsm else TEXT_PATTERNS
    topics = FSM_TOPICS if fsm else TEXT_TOPICS
    out: dict = {"cache": args.cache_dir, "tokens": cache.num_tokens, "open_s": open_s}

    cold = timed(lambda: regex_codes(cache, patterns[0]))
    out["regex_cold_s"] = cold
    out["regex"] = {}
    for p in patterns:
        times = [timed(lambda p=p: regex_codes(cache, p)) for _ in range(args.repeat)]
        matches = regex_codes(cache, p).matches
        out["regex"][p] = {"median_s": statistics.median(times), "matches": matches}

    rng = np.random.default_rng(0)
    refs = []
    for key in cache.codebooks:
        counts = cache.counts(key)
        live = np.argwhere(counts > 0)
        for g, c in live[rng.choice(len(live), size=min(len(live), args.codes), replace=False)]:
            refs.append(CodeRef(key, int(c), int(g)))
    rng.shuffle(refs)
    refs = refs[: args.codes]
    cold = timed(lambda: cache.top_contexts(refs[0], limit=20))
    top_times = [timed(lambda r=r: cache.top_contexts(r, limit=20)) for r in refs]
    # the most frequent code of each codebook: the largest occurrence lists
    heavy = []
    for key in cache.codebooks:
        g, c = np.unravel_index(int(cache.counts(key).argmax()), cache.counts(key).shape)
        ref = CodeRef(key, int(c), int(g))
        heavy.append(timed(lambda ref=ref: cache.top_contexts(ref, limit=20)))
    out["top_contexts"] = {
        "cold_s": cold,
        "codes": len(refs),
        "median_s": statistics.median(top_times),
        "p95_s": pct(top_times, 95),
        "most_frequent_code_max_s": max(heavy),
    }

    cache.model()  # load once; topic search runs the model on the text
    cold = timed(lambda: topic_codes(cache, topics[0]))
    topic_times = [
        timed(lambda t=t: topic_codes(cache, t)) for t in topics for _ in range(args.repeat)
    ]
    out["topic"] = {
        "cold_s": cold,
        "median_s": statistics.median(topic_times),
        "p95_s": pct(topic_times, 95),
    }
    out["bytes_per_token"] = {}
    for key, info in cache.codebooks.items():
        codes_b = (cache.path / "codes" / f"{key}.npy").stat().st_size / cache.num_tokens
        index_b = (cache.path / "index" / f"{key}.rows.npy").stat().st_size / cache.num_tokens
        out["bytes_per_token"][key] = {"codes": codes_b, "index": index_b, "k": info.k}

    print(f"{args.cache_dir}: {cache.num_tokens:,} tokens; open {open_s * 1000:.0f} ms")
    print(f"  regex (cold first call {out['regex_cold_s'] * 1000:.0f} ms)")
    for p, r in out["regex"].items():
        print(f"    {r['median_s'] * 1000:8.1f} ms  {r['matches']:>8} matches  {p[:60]}")
    t = out["top_contexts"]
    print(
        f"  top contexts: median {t['median_s'] * 1000:.1f} ms, p95 {t['p95_s'] * 1000:.1f} ms "
        f"over {t['codes']} codes; most frequent codes up to {t['most_frequent_code_max_s'] * 1000:.1f} ms"
    )
    t = out["topic"]
    print(f"  topic search: median {t['median_s'] * 1000:.1f} ms, p95 {t['p95_s'] * 1000:.1f} ms")
    for key, b in out["bytes_per_token"].items():
        print(
            f"  {key}: codes {b['codes']:.2f} B/token (k={b['k']}, 2k={2 * b['k']}), "
            f"index {b['index']:.2f} B/token"
        )
    name = Path(args.cache_dir).name
    (HERE / f"cache-queries-{name}-latest.json").write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
