"""Topic steering rates (paper Table 3 protocol) on a code cache's model.

For each topic: its codes come from topic search on a short text about the topic
(codes covering at least ``--min-fraction`` of the text's tokens, firing on at most
``--max-frequency`` of the cached corpus, the ``--codes`` most covering), or with
``--select effect`` from the codes whose direct logit effect most promotes the topic's
words (same frequency cap); then
``--samples`` continuations of each of the prompts are sampled with and without those
codes forced on (same seeds), and the fraction of continuations that use one of the
topic's words is reported, with the model's mean next-token loss on the baseline and
steered continuations (unsteered model; a fluency check). Samples are saved next to
the summary for inspection.
``--strength 1,4,10`` repeats the steered runs with each forced code times 4 and 10.

    python benchmarks/steering_topics.py runs/cache-smollm2-1m --out runs/steering
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from codebook_lens.analysis.search import effect_codes, per_codebook, topic_codes
from codebook_lens.cache.store import CodeCache
from codebook_lens.steering.sampling import steering_eval

TOPICS = {
    "religion": (
        "And the LORD God said unto Moses, Go, pray unto the Lord in the holy temple, "
        "for God is in heaven and his spirit is with the prophets and the priests.",
        [
            "god",
            "lord",
            "jesus",
            "christ",
            "heaven",
            "holy",
            "pray",
            "prayer",
            "church",
            "spirit",
            "temple",
            "faith",
            "bible",
            "priest",
            "prophet",
            "angel",
            "sin",
        ],
    ),
    "war": (
        "The army marched into battle; soldiers and troops fought the enemy forces, and "
        "the war ended when the general's military victory was complete.",
        [
            "war",
            "wars",
            "army",
            "armies",
            "battle",
            "battles",
            "soldier",
            "soldiers",
            "troops",
            "military",
            "fight",
            "fought",
            "enemy",
            "weapons",
            "attack",
            "forces",
            "general",
        ],
    ),
    "music": (
        "The band released a new album; the singer wrote every song, and the music was "
        "played on the radio with guitar, piano and drums.",
        [
            "music",
            "musical",
            "song",
            "songs",
            "album",
            "band",
            "singer",
            "sing",
            "sang",
            "guitar",
            "piano",
            "drums",
            "concert",
            "melody",
            "musician",
            "record",
        ],
    ),
    "sea": (
        "The ship sailed across the sea; the sailors watched the ocean waves crash on the "
        "shore as the boat left the harbour for the island.",
        [
            "sea",
            "seas",
            "ocean",
            "ship",
            "ships",
            "sail",
            "sailed",
            "sailor",
            "sailors",
            "boat",
            "boats",
            "waves",
            "shore",
            "harbour",
            "harbor",
            "island",
            "coast",
        ],
    ),
    "love": (
        "She loved him with all her heart; his sweet words of love made her heart sing, "
        "and the lovers kissed.",
        [
            "love",
            "loved",
            "loves",
            "lover",
            "lovers",
            "loving",
            "heart",
            "hearts",
            "kiss",
            "kissed",
            "sweet",
            "darling",
            "beloved",
            "romance",
            "passion",
        ],
    ),
}
PROMPTS = [
    "I think that",
    "The next day,",
    "It was a long time ago when",
    "Here is what happened:",
    "My favourite thing is",
]


@torch.no_grad()
def mean_nll(loaded, prompts: list[str], samples: list[list[str]]) -> float:
    """Mean next-token loss of the continuations under the model without intervention:
    a fluency check, since a strong push can make text on topic but broken."""
    model, codec = loaded.model, loaded.codec
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for prompt, texts in zip(prompts, samples, strict=True):
        start = len(codec.encode(prompt)[0])
        for text in texts:
            ids = codec.encode(prompt + text)[0]
            if len(ids) <= start or start == 0:
                continue
            x = torch.tensor([ids], device=device)
            logits = model(x).logits[0, start - 1 : -1].float()
            target = x[0, start:]
            total += torch.nn.functional.cross_entropy(logits, target, reduction="sum").item()
            count += target.numel()
    return total / max(1, count)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cache_dir")
    parser.add_argument("--out", default="runs/steering")
    parser.add_argument("--topics", default=",".join(TOPICS))
    parser.add_argument("--codes", type=int, default=3, help="the N most covering codes")
    parser.add_argument(
        "--per-codebook",
        type=int,
        default=None,
        help="instead of --codes: the N most covering codes of every codebook (for models "
        "with a codebook on every layer, as the paper steers)",
    )
    parser.add_argument(
        "--select",
        choices=["topic", "effect"],
        default="topic",
        help="topic: codes that fire on the topic text (the paper); effect: codes whose "
        "direct effect on the logits promotes the topic's words",
    )
    parser.add_argument("--min-fraction", type=float, default=0.1)
    parser.add_argument("--max-frequency", type=float, default=0.005)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--mode", default="append")
    parser.add_argument(
        "--strength",
        default="1",
        help="factor(s) of each forced code, comma-separated: one steered run per strength",
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    strengths = [float(v) for v in args.strength.split(",")]
    cache = CodeCache.open(args.cache_dir)
    loaded = cache.model()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in args.topics.split(","):
        text, words = TOPICS[name]
        limit = args.codes if args.per_codebook is None else None
        if args.select == "topic":
            hits = topic_codes(
                cache,
                text,
                min_fraction=args.min_fraction,
                max_frequency=args.max_frequency,
                limit=limit,
            )
        else:
            hits = effect_codes(cache, words, max_frequency=args.max_frequency, limit=limit)
        if args.per_codebook is not None:  # hits are best first: keep each book's first N
            hits = per_codebook(hits, args.per_codebook)
        if not hits:
            rows.append({"topic": name, "codes": [], "note": "no code passed the filters"})
            continue
        codes = [h.ref for h in hits]
        for strength in strengths:
            result = steering_eval(
                loaded,
                None,
                codes,
                PROMPTS,
                samples_per_prompt=args.samples,
                words=words,
                mode=args.mode,
                strength=strength,
                max_new_tokens=args.max_new_tokens,
                seed=args.seed,
                progress=False,
            )
            nll = (
                mean_nll(loaded, PROMPTS, result.baseline),
                mean_nll(loaded, PROMPTS, result.steered),
            )
            suffix = "" if strength == 1 else f"-x{strength:g}"
            result.save(out / f"{name}{suffix}.json")
            rows.append(
                {
                    "topic": name,
                    "strength": strength,
                    "codes": [h.to_dict() for h in hits],
                    "baseline": result.baseline_fraction,
                    "steered": result.steered_fraction,
                    "baseline_nll": nll[0],
                    "steered_nll": nll[1],
                    "samples": args.samples * len(PROMPTS),
                }
            )
            print(
                f"{name:<10} x{strength:<5g} baseline {result.baseline_fraction:6.1%}  steered "
                f"{result.steered_fraction:6.1%}  loss of the samples {nll[0]:.2f} -> "
                f"{nll[1]:.2f}  codes "
                + (", ".join(str(c) for c in codes) if len(codes) <= 5 else f"{len(codes)} codes"),
                flush=True,
            )
    summary = {"settings": vars(args), "prompts": PROMPTS, "topics": rows}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
