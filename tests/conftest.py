"""Tiny random-initialised models of every supported family, built from config (offline)."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPTNeoConfig,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
)

VOCAB = 97


def tiny_config(family: str):
    common = dict(vocab_size=VOCAB, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    if family == "gpt2":
        return GPT2Config(n_layer=2, n_embd=32, n_head=4, n_positions=64, **common)
    if family == "gpt_neo":
        return GPTNeoConfig(
            num_layers=2,
            hidden_size=32,
            num_heads=4,
            max_position_embeddings=64,
            attention_types=[[["global", "local"], 1]],
            window_size=8,
            **common,
        )
    if family == "gpt_neox":
        return GPTNeoXConfig(
            num_hidden_layers=2,
            hidden_size=32,
            num_attention_heads=4,
            intermediate_size=64,
            max_position_embeddings=64,
            **common,
        )
    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config, "mistral": MistralConfig}[family]
    return cls(
        num_hidden_layers=2,
        hidden_size=32,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        **common,
    )


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
