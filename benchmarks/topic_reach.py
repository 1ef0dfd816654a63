"""What limits a topic's steering: the codebook's codes, or the network's response.

For every topic of a file and every codebook head of a ``codebook lm`` run, to first
order (:func:`codebook_lens.analysis.topics.code_gradients`, on the cache's first
blocks): the effect on the topic logit of the head's best code, against the effect of a
vector along the gradient itself with the median norm of the head's codes (the most
that any vector of that norm could do there). A ratio near 1 says the codebook holds a
code as good as any of its size; the gradient's norm says how far the network moves the
topic's words for a given push, whatever is forced. Beside them, the steered share the
run measured for the topic, where it was steered on that file.

    python benchmarks/topic_reach.py RUN_DIR
    python benchmarks/topic_reach.py RUN_DIR --topic-file topics-heldout2

RUN_DIR: a ``codebook lm`` run directory (its ``codebook/model`` and ``cache``).
Results: benchmarks/topic-reach-latest.json (``--out`` to write elsewhere).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from codebook_lens.analysis.topics import code_gradients, topic_tokens
from codebook_lens.cache.store import CodeCache
from codebook_lens.core.cpu import describe_cpu
from codebook_lens.core.loading import load_codebook_model
from codebook_lens.experiments.language.config import TOPIC_FILE
from codebook_lens.experiments.language.files import data_file, load_topics

HERE = Path(__file__).resolve().parent


def reach(model, parts: list[torch.Tensor], tokens) -> list[dict]:
    """Per codebook head: the gradient's norm, the best code's first-order effect, and
    the effect of the gradient's direction at the median code norm."""
    rows = []
    for key, grad in code_gradients(model, parts, tokens).items():
        weight = model.codebooks[key].weight.detach().float()  # (G, C, d)
        g = grad.float()  # (G, d)
        best = torch.einsum("gcd,gd->gc", weight, g).max(dim=-1).values
        ideal = g.norm(dim=-1) * weight.norm(dim=-1).median(dim=-1).values
        for head in range(g.shape[0]):
            rows.append(
                {
                    "codebook": key,
                    "head": head,
                    "gradient_norm": float(g[head].norm()),
                    "best_code": float(best[head]),
                    "gradient_direction": float(ideal[head]),
                }
            )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a codebook lm run directory")
    parser.add_argument("--topic-file", default="topics", help="a path, or a packaged file's name")
    parser.add_argument("--blocks", type=int, default=64, help="cache blocks the gradient averages")
    parser.add_argument("--out", type=Path, default=HERE / "topic-reach-latest.json")
    args = parser.parse_args(argv)

    path = data_file(args.topic_file, TOPIC_FILE)
    _, topics = load_topics(path)
    loaded = load_codebook_model(args.run / "codebook" / "model")
    cache = CodeCache.open(args.run / "cache")
    cache.set_model(loaded)
    seq_len = int(cache.manifest["seq_len"])
    ids = torch.from_numpy(np.asarray(cache.token_ids, dtype=np.int64))
    rows_in_cache = min(args.blocks, ids.numel() // seq_len)
    blocks = ids[: rows_in_cache * seq_len].view(rows_in_cache, seq_len)
    parts = [blocks[i : i + 16] for i in range(0, rows_in_cache, 16)]
    metrics_file = args.run / "metrics.json"
    metrics = json.loads(metrics_file.read_text()) if metrics_file.exists() else {}

    out = []
    print(f"{'topic':10s} {'gradient norm':>14s} {'best code / direction':>22s} {'steered':>8s}")
    for topic in topics:
        heads = reach(loaded.model, parts, topic_tokens(cache, topic.words))
        norm = float(np.mean([h["gradient_norm"] for h in heads]))
        ratio = float(np.mean([h["best_code"] / h["gradient_direction"] for h in heads]))
        share = metrics.get(f"steer.{topic.name}.steered_share")
        out.append(
            {
                "topic": topic.name,
                "mean_gradient_norm": norm,
                "mean_best_over_direction": ratio,
                "steered_share": share,
                "heads": heads,
            }
        )
        shown = "" if share is None else f"{share:.0%}"
        print(f"{topic.name:10s} {norm:14.3f} {ratio:22.2f} {shown:>8s}", flush=True)
    result = {
        "run": str(args.run),
        "topic_file": str(path),
        "blocks": rows_in_cache,
        "cpu": describe_cpu(),
        "topics": out,
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"results: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
