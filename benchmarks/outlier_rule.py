"""What the outlier rule buys on a pretrained model: eval loss with k-means-initialised
codebooks on every layer's MLP, with and without dense outliers.

SmolLM2-135M writes huge MLP outputs at its attention-sink positions (layer 11: norm
~24,000 at a sequence's first token, against a median of ~31). This script prints each
layer's MLP output norms (median, first position, largest elsewhere). It then sets
every codebook of ``configs/smollm2-all-mlp.yaml`` to k-means centroids of the
activations that the rule keeps, as ``codebook train`` does (but on all 30 layers). Finally it measures the
held-out LM loss of the base model, of the codebook model with the rule, and of the
same codes without it (every activation quantized), and of subsets of layers, and of
each codebook alone.

    python benchmarks/outlier_rule.py                 # about 12 min on 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from codebook_lens.core import sites as S
from codebook_lens.core.codebook import CodebookOutput
from codebook_lens.training.config import load_train_config
from codebook_lens.training.loop import _corpus_data, build_model, kmeans_init, load_base

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


class _Off(torch.nn.Module):
    """Stands in for a codebook that is left out: the activation passes unchanged."""

    def forward(self, x: torch.Tensor) -> CodebookOutput:
        zero = x.new_zeros((), dtype=torch.float32)
        return CodebookOutput(output=x, codes=None, loss=zero, mse=zero, variance=zero)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "smollm2-all-mlp.yaml"))
    parser.add_argument("--eval-batches", type=int, default=2, help="batches of 8 x 128 tokens")
    parser.add_argument("--max-train-tokens", type=int, default=400_000)
    args = parser.parse_args()

    cfg = load_train_config(args.config, [f"data.max_train_tokens={args.max_train_tokens}"])
    for site in cfg.codebooks.sites:  # every layer, whatever the config chose
        site.layers = None
    base, tokenizer = load_base(cfg.model.path)
    data = _corpus_data(cfg, tokenizer)
    bs = cfg.schedule.batch_size
    batches = torch.cat([data.eval.batch(1, i, bs) for i in range(args.eval_batches)])
    model = build_model(cfg, base)
    model.eval()

    norms: dict[str, torch.Tensor] = {}
    handles = [
        S.attach(base, site, layer, lambda x, key=key: norms.__setitem__(key, x.norm(dim=-1)))
        for key, (site, layer) in model.placement.items()
    ]
    with torch.no_grad(), model.codebooks_disabled():
        base_loss = model(batches, labels=batches).lm_loss.item()
    for h in handles:
        h.remove()
    layers = []
    for key, n in norms.items():
        row = {
            "codebook": key,
            "median_norm": n.median().item(),
            "first_position_median_norm": n[:, 0].median().item(),
            "max_norm_elsewhere": n[:, 1:].max().item(),
        }
        layers.append(row)
        print(
            f"{key:<12} norm median {row['median_norm']:8.1f}  first position "
            f"{row['first_position_median_norm']:9.1f}  max elsewhere {row['max_norm_elsewhere']:8.1f}"
        )

    t0 = time.perf_counter()
    kmeans_init(model, data.train, cfg.codebooks.kmeans_tokens, bs, cfg.schedule.seed)
    print(f"k-means init of {len(model.codebooks)} codebooks: {time.perf_counter() - t0:.0f} s")
    shared = {id(cb.config): cb.config for cb in model.codebooks.values()}  # one per site
    configs = list(shared.values())
    factors = {id(c): c.outlier_factor for c in configs}
    keys = list(model.codebooks)
    subsets = {
        "all": keys,
        "every 3rd layer": keys[::3],
        "layers 6, 12, 18, 24": [
            k for k in keys if k in {f"layer{i}_mlp" for i in (6, 12, 18, 24)}
        ],
        "all but the first and last": keys[1:-1],
        "first half": keys[: len(keys) // 2],
        "second half": keys[len(keys) // 2 :],
    }

    def loss(active: list[str], rule: bool) -> float:
        books = {k: model.codebooks[k] for k in keys}
        for c in configs:
            c.outlier_factor = factors[id(c)] if rule else None
        for k in keys:
            if k not in active:
                model.codebooks[k] = _Off()
        try:
            with torch.no_grad():
                return model(batches, labels=batches).lm_loss.item()
        finally:
            for k, cb in books.items():
                model.codebooks[k] = cb
            for c in configs:
                c.outlier_factor = factors[id(c)]

    rows = []
    print(f"base model (codebooks off): {base_loss:.3f}")
    for name, active in subsets.items():
        with_rule, without = loss(active, True), loss(active, False)
        rows.append({"codebooks": name, "with_rule": with_rule, "without_rule": without})
        print(f"{name:<22} with the rule {with_rule:7.3f}   without {without:7.3f}", flush=True)
    single = {}
    for key in keys:  # the damage of each codebook alone (with the rule)
        single[key] = loss([key], True)
        print(f"{key} alone: {single[key]:.3f}", flush=True)
    result = {
        "base_lm_loss": base_loss,
        "single_codebook_lm_loss": single,
        "eval_tokens": batches.numel(),
        "layers": layers,
    }
    result["codebook_lm_loss"] = rows
    (HERE / "outlier-rule-latest.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
