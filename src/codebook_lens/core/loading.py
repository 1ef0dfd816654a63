"""Open a saved codebook model for reading and steering: the model plus a text codec.

A saved model's ``codebook_config.json`` says how to load it (its ``source``): where its
base model is (``base/`` beside the codebooks, another local directory, or a Hub name),
which codec reads its text (the base's tokenizer, or TokFSM's digits, one token per
character with ``|`` as BOS/EOS) and the task files it came with (TokFSM's machine).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from codebook_lens.core.errors import CodebookLensError, ModelLoadError
from codebook_lens.core.model import BASE_DIR, CodebookModel, load_base_weights, read_config


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
            raise CodebookLensError("character offsets need a fast (Rust) tokenizer")
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
            raise CodebookLensError(f"the digit codec handles bases 2..10, got {base}")
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
                raise CodebookLensError(
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
    task: dict[str, str] = field(default_factory=dict)  # e.g. {"fsm": "/abs/RUN/fsm.json"}


def context_length(model: Loaded | CodebookModel) -> int | None:
    """The longest sequence the model's positions allow, when its config says.

    Rotary models state one too (``max_position_embeddings``): past it they run, slower
    and slower, on positions they were never trained on, so it is a limit here as well.
    """
    cbm = model.model if isinstance(model, Loaded) else model
    config = cbm.model.config
    for name in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def check_positions(model: Loaded | CodebookModel, tokens: int, what: str) -> None:
    """Raise a CodebookLensError when a sequence of ``tokens`` tokens (``what`` says where
    it comes from, e.g. ``seq_len 1000``) does not fit the model's positions."""
    length = context_length(model)
    if length is not None and tokens > length:
        name = f"the model {model.source}" if isinstance(model, Loaded) else "the model"
        raise CodebookLensError(f"{what} needs {tokens} positions; {name} has {length}")


def load_source(directory: Path, meta: dict[str, Any]) -> dict[str, Any]:
    """How to load a saved model: its base, its codec and its task, as recorded in its JSON.

    ``source.base`` is a path relative to the model directory, an absolute path, or a
    Hugging Face Hub name; ``source.codec`` is ``{"kind": "tokenizer"}`` (the base's own
    tokenizer) or ``{"kind": "digits", "base": N}`` (TokFSM text); ``source.task`` maps
    names to files relative to the model directory. Models saved before ``source`` was
    recorded load their included base, or the base they name.
    """
    source = meta.get("source") or {}
    if not isinstance(source, dict):
        raise ModelLoadError(f"{directory} records a source that is not a mapping: {source!r}")
    source = dict(source)
    if "base" not in source:
        source["base"] = (
            BASE_DIR if meta.get("base_included") else meta.get("base_name_or_path", "")
        )
    source.setdefault("codec", {"kind": "tokenizer"})
    source.setdefault("task", {})
    task = source["task"]
    if not isinstance(source["base"], str) or not (
        isinstance(task, dict) and all(isinstance(v, str) for v in task.values())
    ):
        raise ModelLoadError(f"{directory} records a damaged source: {source!r}")
    return source


def _resolve_base(directory: Path, base: str) -> str:
    """A local directory (relative to the model or absolute) or else a Hub name."""
    if not base:
        raise ModelLoadError(f"{directory} records no base model to load its codebooks onto")
    local = (directory / base).resolve()
    if (local / "config.json").is_file():
        return str(local)
    if Path(base).is_absolute() or base.startswith("."):
        raise ModelLoadError(f"the base model of {directory} ({base}) is not a model directory")
    return base  # a Hub name: transformers resolves it from its cache or the network


def load_codebook_model(model_dir: str | Path, dtype: torch.dtype | None = None) -> Loaded:
    """The saved codebook model in ``model_dir`` with its codec, in eval mode.

    Everything needed is read from the model's own ``codebook_config.json`` (see
    :func:`load_source`); nothing is guessed from paths or names.
    """
    from transformers import AutoTokenizer

    directory = Path(model_dir)
    meta = read_config(directory)  # clear error when this is not a saved codebook model
    source = load_source(directory, meta)
    kwargs = {} if dtype is None else {"dtype": dtype}
    base_dir = _resolve_base(directory, source["base"])
    base = load_base_weights(base_dir, directory, **kwargs)
    model = CodebookModel.from_pretrained(directory, base_model=base).eval()
    task = {name: str((directory / rel).resolve()) for name, rel in source["task"].items()}
    codec = source["codec"]
    if not isinstance(codec, dict):
        raise ModelLoadError(f"{directory} records a codec that is not a mapping: {codec!r}")
    if codec.get("kind") == "digits":
        digits = codec.get("base")
        if not isinstance(digits, int) or isinstance(digits, bool):
            raise ModelLoadError(f"{directory} records a digit codec without a base: {codec!r}")
        return Loaded(model, DigitCodec(digits), str(directory), "tokfsm", task=task)
    if codec.get("kind") != "tokenizer":
        raise ModelLoadError(f"{directory} records an unknown codec {codec!r}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(base_dir)
    except (OSError, ValueError, TypeError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelLoadError(
            f"cannot load the tokenizer of {directory} ({base_dir}): {reason}"
        ) from None
    return Loaded(model, HFCodec(tokenizer), str(directory), "hf", tokenizer, task=task)
