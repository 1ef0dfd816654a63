"""Open a saved codebook model for reading and steering: the model plus a text codec.

Two kinds of saved model are understood:

- a directory written by ``codebook train`` (``codebook_config.json`` and, unless the
  base was frozen, ``base/`` with the finetuned weights and the tokenizer); a frozen-base
  run names its base model in ``base_name_or_path`` and that is loaded instead;
- a TokFSM stage (``RUN/codebook/model``), whose base is ``RUN/base/model`` and whose
  text is the machine's digits (one token per character; the BOS/EOS token is ``|``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .model import BASE_DIR, CodebookModel, read_config


class TextCodec:
    """Text <-> tokens with character offsets, the same interface for every tokenizer."""

    name: str = "codec"
    eos_id: int | None = None
    bos_id: int | None = None
    vocab_size: int = 0

    def encode(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Token ids of ``text`` (no special tokens) and each token's (start, end) characters."""
        raise NotImplementedError

    def decode(self, ids: list[int]) -> str:
        raise NotImplementedError

    def token_texts(self, ids: list[int]) -> list[str]:
        """Readable text of each token on its own."""
        return [self.decode([i]) for i in ids]


class HFCodec(TextCodec):
    """A transformers fast tokenizer (offsets come from its offset mapping)."""

    def __init__(self, tokenizer: Any, name: str = "") -> None:
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError("character offsets need a fast (Rust) tokenizer")
        self.tokenizer = tokenizer
        self.name = name or getattr(tokenizer, "name_or_path", "") or "tokenizer"
        self.eos_id = tokenizer.eos_token_id
        self.bos_id = tokenizer.bos_token_id
        self.vocab_size = len(tokenizer)

    def encode(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def token_texts(self, ids: list[int]) -> list[str]:
        return [self.tokenizer.decode([i]) for i in ids]


class DigitCodec(TextCodec):
    """TokFSM text: each digit character is a token; ``|`` is the BOS/EOS token."""

    BOS_CHAR = "|"

    def __init__(self, base: int) -> None:
        if not 2 <= base <= 10:
            raise ValueError(f"the digit codec handles bases 2..10, got {base}")
        self.base = base
        self.name = f"tokfsm-digits-{base}"
        self.bos_id = base  # every TokFSM sequence starts with it; documents need no separator
        self.vocab_size = base + 1

    def encode(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        ids, offsets = [], []
        for i, ch in enumerate(text):
            if ch == self.BOS_CHAR:
                ids.append(self.base)
            elif ch.isdigit() and int(ch) < self.base:
                ids.append(int(ch))
            elif ch.isspace():
                continue
            else:
                raise ValueError(
                    f"TokFSM text holds digits 0..{self.base - 1}, '|' and spaces; got {ch!r} at {i}"
                )
            offsets.append((i, i + 1))
        return ids, offsets

    def decode(self, ids: list[int]) -> str:
        return "".join(self.BOS_CHAR if i == self.base else str(int(i)) for i in ids)


@dataclass
class Loaded:
    model: CodebookModel
    codec: TextCodec
    source: str  # the directory given
    kind: str  # "hf" or "tokfsm"
    tokenizer: Any = None  # the transformers tokenizer, when there is one
    fsm: Any = None  # the state machine of a TokFSM model


def load_codebook_model(model_dir: str | Path, dtype: torch.dtype | None = None) -> Loaded:
    """The saved codebook model in ``model_dir`` with its codec, in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory = Path(model_dir)
    meta = read_config(directory)  # clear error when this is not a saved codebook model
    kwargs = {} if dtype is None else {"dtype": dtype}
    # a stage of a TokFSM run (RUN/base/model or RUN/codebook/model, the machine in
    # RUN/fsm.json); a frozen-base codebook stage takes its base from RUN/base/model
    run = directory.parent.parent
    fsm_base = directory / BASE_DIR
    if not (fsm_base / "config.json").is_file():
        fsm_base = run / "base" / "model" / BASE_DIR
    if (run / "fsm.json").is_file() and (fsm_base / "config.json").is_file():
        from .fsm import FSM

        fsm = FSM.load(run / "fsm.json")
        base = AutoModelForCausalLM.from_pretrained(str(fsm_base), **kwargs)
        model = CodebookModel.from_pretrained(directory, base_model=base).eval()
        return Loaded(model, DigitCodec(fsm.base), str(directory), "tokfsm", fsm=fsm)
    if (directory / BASE_DIR / "config.json").is_file():
        base_dir = directory / BASE_DIR
    else:
        named = meta.get("base_name_or_path") or ""
        if named and (Path(named) / "config.json").is_file():
            base_dir = Path(named)
        elif named in ("smollm2-135m",) or "SmolLM2" in named:
            from .assets import smollm2_dir

            base_dir = smollm2_dir()
        else:
            raise FileNotFoundError(
                f"{directory} holds codebooks only and its base model "
                f"({named or 'unnamed'}) is not a local directory"
            )
    base = AutoModelForCausalLM.from_pretrained(str(base_dir), **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(str(base_dir))
    model = CodebookModel.from_pretrained(directory, base_model=base).eval()
    return Loaded(model, HFCodec(tokenizer), str(directory), "hf", tokenizer)
