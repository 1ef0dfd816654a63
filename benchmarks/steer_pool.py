"""How far forcing a topic's codes raises its words, by how the candidates are pooled.

For every topic and variant of the candidate pool, the measured path of
:func:`codebook_lens.steering.topic_codes.measured_topic_codes` on the last blocks of a
run's code cache, up to a predicted fluency cost of ``--max-cost``: the topic rate
(the mean probability that the next word is a topic word) before and after, the codes
chosen and the seconds the search took. Variants, side by side in one run:

- ``first-order``: each head's ``candidates_per_group`` codes of largest first-order
  effect (the cpu preset before 2026-12-04, night);
- ``first-order x4``: four times as many (a wider pool, searched greedily);
- ``screened``: each head's 64 codes of largest first-order effect forced alone on 2
  blocks, the best ``candidates_per_group`` per fluency cost kept (``screen_per_group``);
- ``screened, 8 per head``: the same, with up to 8 codes of one head forced together
  (``max_per_group``; the codebook's k before). The cpu preset since 2026-12-04, night.

No sampling: the topic rate per token is what the steered share follows (a sample of n
tokens is on topic with probability about ``1 - exp(-n * rate)``).

    python benchmarks/steer_pool.py RUN_DIR
    python benchmarks/steer_pool.py RUN_DIR --topics sickness,school --topic-file topics-heldout

RUN_DIR: a ``codebook lm`` run directory (its ``codebook/model`` and ``cache``).
Results: benchmarks/steer-pool-latest.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from codebook_lens.cache.store import CodeCache
from codebook_lens.core.cpu import describe_cpu
from codebook_lens.core.loading import load_codebook_model
from codebook_lens.experiments.language.config import TOPIC_FILE, load_lm_config
from codebook_lens.experiments.language.files import data_file, load_topics
from codebook_lens.steering.topic_codes import measured_topic_codes

HERE = Path(__file__).resolve().parent


def variants(per_group: int) -> dict[str, dict]:
    return {
        "first-order": {"candidates_per_group": per_group},
        "first-order x4": {"candidates_per_group": 4 * per_group},
        "screened": {"candidates_per_group": per_group, "screen_per_group": 64},
        "screened, 8 per head": {
            "candidates_per_group": per_group,
            "screen_per_group": 64,
            "max_per_group": 8,
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a codebook lm run directory")
    parser.add_argument(
        "--topic-file", default="topics-heldout", help="a path, or a packaged file's name"
    )
    parser.add_argument("--topics", default=None, help="comma-separated names (default: all)")
    parser.add_argument("--per-group", type=int, default=8, help="candidates per head")
    parser.add_argument("--max-cost", type=float, default=0.8)
    parser.add_argument("--blocks", type=int, default=8, help="cache blocks measured on")
    parser.add_argument("--out", type=Path, default=HERE / "steer-pool-latest.json")
    args = parser.parse_args(argv)

    topic_file = data_file(args.topic_file, TOPIC_FILE)
    _, topics = load_topics(topic_file)
    if args.topics:
        wanted = args.topics.split(",")
        unknown = sorted(set(wanted) - {t.name for t in topics})
        if unknown:
            parser.error(f"no topic {', '.join(unknown)} in {topic_file}")
        topics = [t for t in topics if t.name in wanted]
    loaded = load_codebook_model(args.run / "codebook" / "model")
    cache = CodeCache.open(args.run / "cache")
    cache.set_model(loaded)

    steer = load_lm_config("cpu").steer  # the preset's search settings, the pool aside
    rows = []
    print(f"{'topic':10s} {'pool':22s} {'codes':>5s} {'rate before':>12s} {'after':>9s}  ratio")
    for topic in topics:
        for label, pool in variants(args.per_group).items():
            t0 = time.perf_counter()
            found = measured_topic_codes(
                cache,
                topic.words,
                blocks=args.blocks,
                target_rate=steer.target_rate,
                max_cost=args.max_cost,
                min_count=steer.min_count,
                max_frequency=steer.max_frequency,
                mode=steer.mode,
                strength=steer.strength,
                objective="rate",
                **pool,
            )
            seconds = time.perf_counter() - t0
            before, after = found.before.topic_rate, found.after.topic_rate
            rows.append(
                {
                    "topic": topic.name,
                    "pool": label,
                    "settings": pool,
                    "codes": len(found.codes),
                    "rate_before": before,
                    "rate_after": after,
                    "cost": found.after.cost,
                    "seconds": seconds,
                }
            )
            print(
                f"{topic.name:10s} {label:22s} {len(found.codes):5d} {before:12.5f} "
                f"{after:9.5f}  x{after / max(before, 1e-30):.1f}  ({seconds:.0f} s)",
                flush=True,
            )
    result = {
        "run": str(args.run),
        "max_cost": args.max_cost,
        "blocks": args.blocks,
        "cpu": describe_cpu(),
        "torch_threads": torch.get_num_threads(),
        "rows": rows,
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"results: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
