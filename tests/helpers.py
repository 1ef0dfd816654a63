"""Shared test helpers: tiny random models of every family, a tiny LM with a real tokenizer,
synthetic text and a tiny saved codebook model, all built offline from config."""

from __future__ import annotations

import math

import torch
from transformers import AutoModelForCausalLM

from codebook_lens.cache.build import build_cache
from codebook_lens.cache.store import CodeCache
from codebook_lens.core.loading import load_codebook_model
from codebook_lens.core.selfcheck import tiny_config as shared_tiny_config

VOCAB = 97


def tiny_config(family: str):
    return shared_tiny_config(family, hidden=32, vocab=VOCAB, positions=64)


FAMILY_NAMES = ["gpt2", "gpt_neo", "gpt_neox", "llama", "qwen2", "mistral"]


def tiny_model(family: str, seed: int = 0):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family))
    model.eval()
    return model


def save_tiny_lm(directory, family: str = "gpt_neox", seed: int = 0):
    """A tiny random model plus a real (byte-level BPE) tokenizer, saved like a hub model."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    text = corpus_text(200)
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=["<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([text], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")
    config = tiny_config(family)
    config.vocab_size = len(fast)
    config.eos_token_id = config.pad_token_id = fast.eos_token_id
    config.bos_token_id = fast.eos_token_id
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(directory)
    fast.save_pretrained(directory)
    return directory


def save_tiny_training_dir(root, docs: int = 40):
    """ROOT/model (a tiny LM with a real tokenizer) and ROOT/corpus (``docs`` text files)
    for training runs; returns ROOT."""
    save_tiny_lm(root / "model")
    corpus = root / "corpus"
    corpus.mkdir()
    for i in range(docs):
        (corpus / f"doc{i:02d}.txt").write_text(corpus_text(30, seed=i))
    return root


def tiny_train_args(tiny_dir, out, *extra):
    """key=value arguments of a tiny training run (later ones override earlier ones)."""
    return [
        f"output_dir={out}",
        f"model.path={tiny_dir / 'model'}",
        f"data.corpus={tiny_dir / 'corpus'}",
        "data.seq_len=32",
        "data.eval_fraction=0.1",
        "codebooks.sites=[{site: attn_heads, codebook: {num_codes: 32, k: 1}}, "
        "{site: mlp, layers: [1], codebook: {num_codes: 64, k: 2}}]",
        "codebooks.revive_after_steps=2",
        "schedule.max_steps=6",
        "schedule.batch_size=4",
        "schedule.grad_accum=2",
        "schedule.warmup_steps=2",
        "logging.every=2",
        "eval.every=3",
        "eval.batches=2",
        "checkpoint.every=100",
        *extra,
    ]


def corpus_text(lines: int, seed: int = 0) -> str:
    """Deterministic English-like text with learnable regularities."""
    import random

    rng = random.Random(seed)
    subjects = ["the cat", "a dog", "my friend", "the old man", "she", "he"]
    verbs = ["sees", "likes", "finds", "eats", "paints", "builds"]
    objects = ["a red apple", "the blue house", "a small boat", "the big tree", "an old book"]
    months = ["January", "February", "March", "April", "May", "June"]
    out = []
    for _ in range(lines):
        out.append(
            f"In {rng.choice(months)} {rng.randint(1900, 2020)}, {rng.choice(subjects)} "
            f"{rng.choice(verbs)} {rng.choice(objects)}."
        )
    return "\n".join(out)


def tiny_bert_config(**kw):
    """A small BERT config: a family this project does not support."""
    from transformers import BertConfig

    return BertConfig(
        num_hidden_layers=1,
        hidden_size=32,
        num_attention_heads=2,
        intermediate_size=64,
        vocab_size=50,
        **kw,
    )


def save_tiny_codebook_model(root, outlier_factor: float | None = None):
    """A tiny llama with MLP codebooks (16 codes, k=2) on layers 0 and 1 and per-head
    codebooks (8 codes, k=1) on layer 1, saved with its base and tokenizer in ROOT/model.
    ``outlier_factor`` goes to the MLP codebooks."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from codebook_lens.core.codebook import CodebookConfig
    from codebook_lens.core.model import CodebookModel, CodebookModelConfig, SiteSpec

    save_tiny_lm(root / "lm", "llama")
    base = AutoModelForCausalLM.from_pretrained(root / "lm")
    torch.manual_seed(0)
    cfg = CodebookModelConfig(
        [
            SiteSpec(
                "mlp",
                CodebookConfig(num_codes=16, k=2, outlier_factor=outlier_factor),
                layers=[0, 1],
            ),
            SiteSpec("attn_heads", CodebookConfig(num_codes=8, k=1), layers=[1]),
        ]
    )
    model = CodebookModel(base, cfg)
    out = root / "model"
    model.save_pretrained(out, include_base=True)
    AutoTokenizer.from_pretrained(root / "lm").save_pretrained(out / "base")
    return out


WEB_DOCS = [
    "In January 1999 the café opened. Über naïve résumé — 東京 and 1984!",
    corpus_text(40, seed=5),
    "May 2001: a small boat, the big tree.\nJune 1950 → the blue house.",
    corpus_text(30, seed=6),
]


def save_tiny_bpe_codebook_model(root, vocab: int = 400):
    """A tiny GPT-NeoX with a BPE tokenizer of ``vocab`` tokens trained on synthetic text
    (so words are tokens of their own), attention-head and MLP codebooks on both layers,
    saved with its base and tokenizer in ROOT/model."""
    from transformers import AutoModelForCausalLM, GPTNeoXConfig

    from codebook_lens.core.codebook import CodebookConfig
    from codebook_lens.core.model import CodebookModel, CodebookModelConfig, SiteSpec
    from codebook_lens.data.tokenizer import train_tokenizer

    tok = train_tokenizer([corpus_text(400, seed) for seed in range(3)], vocab)
    config = GPTNeoXConfig(
        vocab_size=len(tok),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        use_parallel_residual=False,
        bos_token_id=tok.eos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.eos_token_id,
    )
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(config)
    cfg = CodebookModelConfig(
        [
            SiteSpec("attn_heads", CodebookConfig(num_codes=16, k=2)),
            SiteSpec("mlp", CodebookConfig(num_codes=32, k=3)),
        ]
    )
    model = CodebookModel(base, cfg)
    out = root / "model"
    model.save_pretrained(out, include_base=True)
    tok.save_pretrained(str(out / "base"))
    return out


def tiny_cache(root, model_dir, *, docs: int, lines: int, seq_len: int, batch_size: int):
    """A cache of ``docs`` corpus documents of ``lines`` lines each (seeds 0, 1, ...) built
    with the saved model in ``model_dir``, in ``root/cache``."""
    loaded = load_codebook_model(model_dir)
    texts = [corpus_text(lines, seed=s) for s in range(docs)]
    build_cache(
        loaded, texts, root / "cache", corpus_name="t", seq_len=seq_len, batch_size=batch_size
    )
    return CodeCache.open(root / "cache")


def near_tie_inputs(seed: int, n: int = 24, groups: int = 2, num_codes: int = 103, dim: int = 12):
    """Codes that tie or nearly tie, and activations that put them in their top k."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(groups, num_codes, dim, generator=gen)
    w[:, 1] = w[:, 0]  # exact duplicates
    w[:, 3] = 2 * w[:, 2]  # the same direction: a cosine tie
    w[:, 5] = w[:, 4]
    w[:, 5, 0] = torch.nextafter(w[:, 4, 0], torch.tensor(math.inf))  # one ulp apart
    w[:, 7] = w[:, 6] * (1 + 2e-7)  # scores agreeing to ~1e-7
    w[:, num_codes - 1] = w[:, 8]  # a duplicate in the last code tile
    x = torch.randn(n, groups, dim, generator=gen)
    anchors = [0, 2, 4, 6, 8]
    for i in range(n - 4):
        j = anchors[i % len(anchors)]
        x[i] = w[:, j] + 1e-3 * torch.randn(groups, dim, generator=gen)
    x[n - 4] = w[:, 0]  # exactly on a duplicated code
    x[n - 3] = w[:, 4]
    return x, w
