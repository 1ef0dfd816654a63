"""Tiny random-initialised models of every supported family, built from config (offline)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from codebook_lens.selfcheck import tiny_config as shared_tiny_config

VOCAB = 97


def tiny_config(family: str):
    return shared_tiny_config(family, hidden=32, vocab=VOCAB, positions=64)


FAMILY_NAMES = ["gpt2", "gpt_neo", "gpt_neox", "llama", "qwen2", "mistral"]


def tiny_model(family: str, seed: int = 0):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family))
    model.eval()
    return model


@pytest.fixture(params=FAMILY_NAMES)
def family(request):
    return request.param


@pytest.fixture
def tokens():
    gen = torch.Generator().manual_seed(1)
    return torch.randint(2, VOCAB, (2, 12), generator=gen)


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
