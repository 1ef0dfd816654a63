"""A byte-level BPE tokenizer trained on a corpus, saved as a transformers fast tokenizer.

A small model trained from scratch on the offline corpus wants a small vocabulary (a
few thousand tokens keep the unembedding cheap) fitted to that corpus.
:func:`train_tokenizer` trains one with the ``tokenizers`` library (byte-level BPE:
every string encodes, nothing is unknown) and wraps it as a
``PreTrainedTokenizerFast``, whose ``save_pretrained`` directory ``AutoTokenizer``
loads again. Saved beside a model's weights it is what
:func:`codebook_lens.core.loading.load_codebook_model` reads through the model's
``source.codec`` (``{"kind": "tokenizer"}``).

Offsets: every token's ``(start, end)`` character span is its own text, leading space
included, so the spans of a text's tokens tile it without gaps; the byte tokens of a
character that BPE splits (outside the learned merges) share that character's span.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from codebook_lens.core.errors import CodebookLensError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

EOS = "<|endoftext|>"  # separates documents; also the BOS of an empty prompt
MIN_VOCAB = 256 + 1  # the byte alphabet plus the end-of-text token


def train_tokenizer(
    texts: Iterable[str],
    vocab_size: int = 4096,
    *,
    min_frequency: int = 2,
    max_chars: int | None = None,
) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer of ``vocab_size`` tokens (end-of-text included)
    trained on ``texts`` (the first ``max_chars`` characters of them when given).

    Deterministic: the same texts give the same vocabulary and merges.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if not isinstance(vocab_size, int) or vocab_size < MIN_VOCAB:
        raise CodebookLensError(
            f"vocab_size must be an integer >= {MIN_VOCAB} (256 bytes plus end-of-text), "
            f"got {vocab_size!r}"
        )
    if max_chars is not None and max_chars < 1:
        raise CodebookLensError(f"max_chars must be positive or None, got {max_chars!r}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    seen = {"chars": 0, "docs": 0}

    def limited() -> Iterator[str]:
        for text in texts:
            if max_chars is not None and seen["chars"] >= max_chars:
                return
            if max_chars is not None:
                text = text[: max_chars - seen["chars"]]
            seen["chars"] += len(text)
            seen["docs"] += 1
            yield text

    tok.train_from_iterator(limited(), trainer=trainer)
    if seen["chars"] == 0:
        raise CodebookLensError("the tokenizer needs some text to train on; got none")
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS,
        bos_token=EOS,
        unk_token=None,
        pad_token=EOS,
        model_max_length=1_000_000,
        clean_up_tokenization_spaces=False,
    )


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, directory: str | Path) -> Path:
    """Write ``tokenizer`` where ``AutoTokenizer.from_pretrained(directory)`` finds it."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(directory))
    return directory


def load_tokenizer(directory: str | Path) -> PreTrainedTokenizerFast:
    """A tokenizer saved by :func:`save_tokenizer` (or any fast tokenizer directory)."""
    from transformers import AutoTokenizer

    directory = Path(directory)
    if not (directory / "tokenizer.json").is_file():
        raise CodebookLensError(f"{directory} holds no tokenizer (tokenizer.json is missing)")
    return AutoTokenizer.from_pretrained(str(directory))
