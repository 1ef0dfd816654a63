"""Training throughput of a codebook model against its base model, next to the FLOP prediction.

One training step (forward, backward, AdamW step) of the base model and of the same
model with codebooks are timed alternately (ABAB..., so machine drift hits both),
in one process. The FLOP-predicted ratio is

    base FLOPs / (base FLOPs + codebook FLOPs)

with the base model's FLOPs counted by torch.utils.flop_counter on one real step and
the codebooks' added FLOPs computed from their shapes: the similarity search
(2 * G * C * d per token per site) plus the gather and scatter of k codes
(about 4 * k * G * d per token). Efficiency = measured ratio / predicted ratio.

    python benchmarks/train_overhead.py                      # SmolLM2-135M, configs/smollm2-cpu.yaml sites
    python benchmarks/train_overhead.py --steps 3 --batch 4 --seq 128
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from codebook_lens.core.model import CodebookModel, CodebookModelConfig
from codebook_lens.training.config import load_train_config
from codebook_lens.training.loop import load_base

ROOT = Path(__file__).resolve().parent.parent


def step_fn(model, opt, batch):
    def step():
        out = model(batch, labels=batch)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()

    return step


def codebook_flops_per_token(model: CodebookModel) -> float:
    total = 0.0
    for cb in model.codebooks.values():
        g, c, d, k = cb.groups, cb.num_codes, cb.dim, cb.k
        total += 2 * g * c * d + 4 * k * g * d
    return total


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "smollm2-cpu.yaml"))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=4, help="timed steps per model")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    cfg = load_train_config(args.config)
    base, _ = load_base(cfg.model.path, cfg.model.dtype)
    torch.manual_seed(0)
    batch = torch.randint(0, base.config.vocab_size, (args.batch, args.seq))
    tokens = batch.numel()

    with FlopCounterMode(display=False) as counter:
        out = base(batch, labels=batch)
        out.loss.backward()
    base_flops = counter.get_total_flops()
    base.zero_grad(set_to_none=True)

    cb_base = copy.deepcopy(base)
    cbm = CodebookModel(cb_base, CodebookModelConfig(list(cfg.codebooks.sites)))
    cbm.track_usage(True)
    extra = codebook_flops_per_token(cbm) * tokens
    predicted = base_flops / (base_flops + extra)

    opt_a = torch.optim.AdamW(base.parameters(), lr=1e-5)
    opt_b = torch.optim.AdamW(cbm.parameters(), lr=1e-5)
    run_a = step_fn(base, opt_a, batch)
    run_b = step_fn(cbm, opt_b, batch)
    run_a()
    run_b()  # warm-up (and the compiled kernel's first build)
    times = {"base": [], "codebook": []}
    for _ in range(args.steps):
        for name, fn in (("base", run_a), ("codebook", run_b)):
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    t_base = statistics.median(times["base"])
    t_cb = statistics.median(times["codebook"])
    measured = t_base / t_cb
    result = {
        "model": cfg.model.path,
        "sites": [site.to_dict() for site in cfg.codebooks.sites],
        "tokens_per_step": tokens,
        "base_tokens_per_s": tokens / t_base,
        "codebook_tokens_per_s": tokens / t_cb,
        "measured_ratio": measured,
        "base_flops_per_step": base_flops,
        "codebook_flops_per_step": extra,
        "predicted_ratio": predicted,
        "efficiency": measured / predicted,
        "step_times": times,
        "threads": torch.get_num_threads(),
    }
    print(f"{cfg.model.path}: {tokens} tokens/step, {torch.get_num_threads()} threads")
    print(f"  base model      {tokens / t_base:8.1f} tokens/s   (median of {args.steps} steps)")
    print(f"  codebook model  {tokens / t_cb:8.1f} tokens/s")
    print(f"  measured ratio  {measured:.3f}")
    print(
        f"  FLOP-predicted  {predicted:.3f}   (base {base_flops / 1e12:.2f} TFLOP + codebooks "
        f"{extra / 1e12:.3f} TFLOP per step)"
    )
    print(f"  efficiency      {measured / predicted:.1%} of the FLOP-predicted throughput")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
