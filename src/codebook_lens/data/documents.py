"""Text corpora as fixed-length token blocks, and a deterministic batch order.

A corpus is read as documents, tokenized, joined with the EOS token between
documents and cut into blocks of ``seq_len`` tokens. The batch for a given global
micro-step and process rank is a pure function of ``(seed, micro_step, rank)``, so
resuming at a step reproduces the data an uninterrupted run would have seen.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from tqdm import tqdm

from codebook_lens.core.errors import CodebookLensError
from codebook_lens.data.corpus import CORPORA, iter_corpus


class DataError(CodebookLensError):
    """A corpus that cannot be read or is too small."""


def _text_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    files = sorted(
        p for p in path.rglob("*") if p.suffix in (".txt", ".md", ".jsonl") and p.is_file()
    )
    if not files:
        raise DataError(f"{path} holds no .txt, .md or .jsonl files")
    return files


def _in_eval(key: str, fraction: float) -> bool:
    digest = hashlib.sha256(key.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def iter_documents(
    corpus: str, split: str, text_field: str = "text", eval_fraction: float = 0.02
) -> Iterator[str]:
    """Documents of ``split`` ("train" or "eval") from a corpus spec.

    ``offline`` (or another name of :data:`~codebook_lens.data.corpus.CORPORA`, such as
    ``offline-wide``): the packaged corpus (its own fixed split). A local ``datasets``
    directory (``save_to_disk``): its ``train``/``validation``/``test`` splits when
    present, else a hash split. Text files or a directory of them: one document per
    file (``.jsonl``: one per line, ``text_field``), split by a hash of the document id.
    """
    if split not in ("train", "eval"):
        raise CodebookLensError(f"split must be 'train' or 'eval', got {split!r}")
    if corpus in CORPORA:
        for doc in iter_corpus(split, name=corpus):
            yield doc["text"]
        return
    path = Path(corpus)
    if not path.exists():
        raise DataError(
            f"corpus {corpus!r} is neither one of {', '.join(CORPORA)} nor an existing file "
            "or directory"
        )
    if path.is_dir() and (
        (path / "dataset_dict.json").is_file() or (path / "dataset_info.json").is_file()
    ):
        yield from _dataset_documents(path, split, text_field, eval_fraction)
        return
    for file in _text_files(path):
        if file.suffix == ".jsonl":
            with file.open() as fh:
                for i, line in enumerate(fh):
                    if not line.strip():
                        continue
                    try:
                        record = json.loads(line)
                    except ValueError as err:
                        raise DataError(f"{file}:{i + 1} is not a JSON line: {err}") from None
                    if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
                        raise DataError(f"{file}:{i + 1} has no text field {text_field!r}")
                    if _in_eval(f"{file.name}:{i}", eval_fraction) == (split == "eval"):
                        yield record[text_field]
        elif _in_eval(file.name, eval_fraction) == (split == "eval"):
            yield file.read_text(errors="replace")


def _dataset_documents(path: Path, split: str, text_field: str, fraction: float) -> Iterator[str]:
    from datasets import DatasetDict, load_from_disk

    ds = load_from_disk(str(path))

    def check(table) -> None:
        if text_field not in table.column_names:
            raise DataError(
                f"{path} has no column {text_field!r}; columns: {', '.join(table.column_names)}"
            )

    if isinstance(ds, DatasetDict):
        names = ["train"] if split == "train" else ["validation", "test", "eval"]
        chosen = [n for n in names if n in ds]
        if chosen:
            check(ds[chosen[0]])
            for row in ds[chosen[0]]:
                yield row[text_field]
            return
        ds = ds[next(iter(ds))]
    check(ds)
    for i, row in enumerate(ds):
        if _in_eval(str(i), fraction) == (split == "eval"):
            yield row[text_field]


def tokenize_documents(
    texts: Iterable[str], tokenizer, max_tokens: int | None = None, desc: str = "tokenizing"
) -> torch.Tensor:
    """One flat int64 tensor: the documents' tokens with EOS between documents."""
    eos = tokenizer.eos_token_id
    pieces: list[torch.Tensor] = []
    total = 0
    for text in tqdm(texts, desc=desc, unit="doc", leave=False):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if eos is not None:
            ids = [*ids, eos]
        pieces.append(torch.tensor(ids, dtype=torch.long))
        total += len(ids)
        if max_tokens is not None and total >= max_tokens:
            break
    if not pieces:
        return torch.empty(0, dtype=torch.long)
    flat = torch.cat(pieces)
    return flat[:max_tokens] if max_tokens is not None else flat


class Blocks:
    """Fixed-length blocks of a token stream, drawn in a seeded order."""

    def __init__(self, tokens: torch.Tensor, seq_len: int, name: str = "corpus") -> None:
        count = tokens.numel() // seq_len
        if count == 0:
            raise DataError(
                f"the {name} has {tokens.numel()} tokens, fewer than one block of {seq_len}"
            )
        self.blocks = tokens[: count * seq_len].view(count, seq_len)
        self.seq_len = seq_len

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def order(self, seed: int, epoch: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        return torch.randperm(len(self), generator=gen)

    def batch(self, seed: int, index: int, batch_size: int) -> torch.Tensor:
        """The ``index``-th batch of a seeded endless stream of shuffled epochs."""
        start = index * batch_size
        rows = []
        epoch_cache: dict[int, torch.Tensor] = {}
        for pos in range(start, start + batch_size):
            epoch, offset = divmod(pos, len(self))
            if epoch not in epoch_cache:
                epoch_cache[epoch] = self.order(seed, epoch)
            rows.append(epoch_cache[epoch][offset])
        return self.blocks[torch.stack(rows)]

    def first(self, count: int, batch_size: int) -> list[torch.Tensor]:
        """The first ``count`` batches in corpus order (for evaluation)."""
        n = min(count * batch_size, len(self))
        return [self.blocks[i : i + batch_size] for i in range(0, n, batch_size)]
