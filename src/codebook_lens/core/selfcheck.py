"""A short end-to-end check of an installation: every family, every site, on the CPU.

For each supported family it builds a tiny random model from config (no download),
attaches codebooks at every site, and checks: codebooks off reproduce the base
logits exactly; a few optimizer steps lower the reconstruction loss; a save/load
round trip reproduces the logits bit for bit.
"""

from __future__ import annotations

import tempfile
import time

import torch
from tqdm import tqdm

from codebook_lens.core.codebook import CodebookConfig
from codebook_lens.core.model import CodebookModel, CodebookModelConfig, SiteSpec
from codebook_lens.core.sites import FAMILIES, SITES


def tiny_config(
    family: str, hidden: int = 64, vocab: int = 128, layers: int = 2, positions: int = 128
):
    """Config of a small random model of ``family``: 4 heads (2 KV heads where grouped)."""
    from transformers import AutoConfig

    common = dict(vocab_size=vocab, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    if family == "gpt2":
        sizes = dict(n_embd=hidden, n_head=4, n_layer=layers, n_positions=positions)
    elif family == "gpt_neo":
        sizes = dict(
            hidden_size=hidden,
            num_heads=4,
            num_layers=layers,
            max_position_embeddings=positions,
            attention_types=[[["global", "local"], layers // 2]],
            window_size=8,
        )
    else:
        sizes = dict(
            hidden_size=hidden,
            num_attention_heads=4,
            num_hidden_layers=layers,
            intermediate_size=2 * hidden,
            max_position_embeddings=positions,
        )
        if family in ("llama", "mistral", "qwen2"):
            sizes["num_key_value_heads"] = 2
    return AutoConfig.for_model(family, **common, **sizes)


def tiny_base(family: str):
    """A 2-layer random model of ``family`` with hidden size 64 and 4 heads."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_config(tiny_config(family)).eval()


def check_family(family: str, steps: int = 20) -> dict:
    torch.manual_seed(0)
    base = tiny_base(family)
    tokens = torch.randint(2, 128, (4, 32))
    with torch.no_grad():
        reference = base(tokens).logits
    specs = [SiteSpec(site, CodebookConfig(num_codes=64, k=2)) for site in SITES]
    model = CodebookModel(base, CodebookModelConfig(specs))
    with torch.no_grad(), model.codebooks_disabled():
        off_exact = torch.equal(model(tokens).logits, reference)
    opt = torch.optim.Adam(model.codebooks.parameters(), lr=1e-2)
    losses = []
    for _ in range(steps):
        out = model(tokens, labels=tokens)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.reconstruction_loss.item())
    with torch.no_grad():
        before = model(tokens).logits
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp, include_base=True)
        loaded = CodebookModel.from_pretrained(tmp).eval()
        with torch.no_grad():
            round_trip = torch.equal(loaded(tokens).logits, before)
    return {
        "family": family,
        "codebooks": len(model.codebooks),
        "off_exact": off_exact,
        "rec_first": losses[0],
        "rec_last": losses[-1],
        "round_trip": round_trip,
    }


def run() -> bool:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    start = time.perf_counter()
    rows = [check_family(f) for f in tqdm(sorted(FAMILIES), desc="families", unit="family")]
    print(
        f"\n{'family':10s} {'codebooks':>9s} {'off == base':>11s} {'rec loss':>17s} {'save/load':>9s}"
    )
    ok = True
    for r in rows:
        fine = r["off_exact"] and r["round_trip"] and r["rec_last"] < r["rec_first"]
        ok &= fine
        print(
            f"{r['family']:10s} {r['codebooks']:9d} {str(r['off_exact']):>11s} "
            f"{r['rec_first']:7.3f} -> {r['rec_last']:6.3f} {str(r['round_trip']):>9s}"
        )
    print(f"\nself-check {'passed' if ok else 'FAILED'} in {time.perf_counter() - start:.1f} s")
    return ok
