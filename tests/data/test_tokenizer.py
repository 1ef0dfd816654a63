"""The BPE tokenizer trained on a corpus: round trips, offsets, size, determinism."""

from __future__ import annotations

import pytest
from helpers import corpus_text

from codebook_lens.core.errors import CodebookLensError
from codebook_lens.data.tokenizer import EOS, load_tokenizer, save_tokenizer, train_tokenizer

TEXTS = [corpus_text(300, seed) for seed in range(3)]
ODD = "Ünïcödé — “quotes”, tabs\tand\nnew lines; 1923 + 42 = 1965 ✓ 日本語"


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(TEXTS, vocab_size=400)


def test_vocabulary_size_and_special_token(tok):
    assert len(tok) == 400
    assert tok.eos_token == EOS and tok.bos_token == EOS
    assert tok.convert_tokens_to_ids(EOS) == tok.eos_token_id
    # merges were learned: a frequent word of the corpus is one token, not its bytes
    assert len(tok(" apple", add_special_tokens=False)["input_ids"]) == 1


@pytest.mark.parametrize("text", [TEXTS[0][:500], ODD, " leading and trailing  ", ""])
def test_round_trip_and_offsets_tile_the_text(tok, text):
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    assert tok.decode(ids) == text
    # spans tile the text in order; the byte tokens of one multi-byte character share
    # that character's span
    spans = [o for i, o in enumerate(offsets) if i == 0 or o != offsets[i - 1]]
    assert "".join(text[s:e] for s, e in spans) == text
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:], strict=False))


def test_token_spans_are_the_tokens_text(tok):
    text = "In May 1999, the cat sees a red apple."
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    for i, (s, e) in zip(enc["input_ids"], enc["offset_mapping"], strict=True):
        assert tok.decode([i]) == text[s:e]


def test_save_load_gives_the_same_ids(tok, tmp_path):
    save_tokenizer(tok, tmp_path / "tok")
    again = load_tokenizer(tmp_path / "tok")
    for text in (TEXTS[1][:800], ODD):
        assert again(text)["input_ids"] == tok(text)["input_ids"]
    assert again.eos_token_id == tok.eos_token_id and len(again) == len(tok)


def test_training_is_deterministic_and_respects_max_chars(tok):
    assert train_tokenizer(TEXTS, vocab_size=400).get_vocab() == tok.get_vocab()
    small = train_tokenizer(TEXTS, vocab_size=400, max_chars=200)
    # 200 characters hold far fewer than 400 - 257 distinct merges
    assert len(small) < 400


def test_bad_arguments_name_the_value(tmp_path):
    with pytest.raises(CodebookLensError, match="vocab_size must be an integer >= 257"):
        train_tokenizer(TEXTS, vocab_size=100)
    with pytest.raises(CodebookLensError, match="needs some text"):
        train_tokenizer([], vocab_size=300)
    with pytest.raises(CodebookLensError, match="holds no tokenizer"):
        load_tokenizer(tmp_path)
