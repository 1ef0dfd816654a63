"""Code caches: which codes fired on every token of a corpus, on disk, memory-mapped.

:func:`~codebook_lens.cache.build.build_cache` runs a codebook model over a corpus and writes a directory::

    manifest.json             format version, model, corpus, token count, codebooks
    docs.parquet              doc_id, text: the original documents
    tokens.parquet            doc_id, token_id, text, start, end (character offsets
                              into the document), one row per token in corpus order
    codes/<codebook>.npy      (tokens, groups, k) code ids, best first, in the smallest
                              unsigned type that holds them (uint16 when C <= 65,536)
    counts/<codebook>.npy     (groups, C) int64 activation counts
    index/<codebook>.offsets.npy  (groups, C + 1) int64
    index/<codebook>.rows.npy     token positions where each code fires, sorted, CSR by
                              code: rows[offsets[g, c]:offsets[g, c + 1]]
    effects/<codebook>.npz    every code's direct effect on the logits (top tokens)
    codebooks.safetensors     the code vectors (for similar-code queries)

Documents are tokenized without special tokens, joined into one stream with the EOS
token between documents (when the tokenizer has one; it belongs to the document
before it and covers no characters) and cut into blocks of ``seq_len`` tokens, as in
training. The build happens in ``OUT.partial`` and is renamed to ``OUT`` at the end,
so an interrupted build never leaves a half cache; rerunning the same command resumes
from the last finished batch, and ``restart=True`` starts over.

``CodeCache.open(OUT)`` reads it back without loading the code arrays into memory.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from codebook_lens.core.errors import CodebookLensError
from codebook_lens.core.loading import Loaded, load_codebook_model
from codebook_lens.core.refs import CodeRef, check_ref

FORMAT_NAME = "codebook-lens-cache"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"


class CacheError(CodebookLensError):
    """A cache that cannot be built or read as asked."""


def code_dtype(num_codes: int) -> np.dtype:
    """The smallest unsigned integer type that holds ids ``0 .. num_codes``: the code ids,
    and ``num_codes`` itself, which marks an empty slot (see :func:`stored_ids`)."""
    for dtype in (np.uint8, np.uint16, np.uint32):
        if num_codes <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    return np.dtype(np.uint64)


def stored_ids(ids: np.ndarray, num_codes: int) -> np.ndarray:
    """Code ids as a cache stores them: an empty slot (``EMPTY_SLOT``, -1: an activation
    that passed through dense, see ``CodebookConfig.outlier_factor``) becomes
    ``num_codes``, which no code has; every query skips it."""
    ids = np.asarray(ids)
    return np.where(ids < 0, num_codes, ids) if ids.size and ids.min() < 0 else ids


def code_counts(ids: np.ndarray, num_codes: int) -> np.ndarray:
    """How often each code ``0 .. num_codes - 1`` occurs in ``ids`` (any shape); empty
    slots (id ``num_codes``, see :func:`stored_ids`) are not counted."""
    return np.bincount(np.asarray(ids).reshape(-1), minlength=num_codes + 1)[:num_codes]


@dataclass
class CodebookInfo:
    key: str
    site: str
    layer: int
    groups: int
    k: int
    num_codes: int
    dtype: str

    def to_dict(self) -> dict:
        return self.__dict__.copy()


# ----------------------------------------------------------------------------------------
# reading


@dataclass
class Context:
    """One occurrence of a code: the firing token and the text around it."""

    position: int  # token position in the cache
    doc_id: int
    rank: int  # slot of the code among the token's k codes (0 = best match)
    left: str
    token: str
    right: str

    def to_dict(self) -> dict:
        return self.__dict__.copy()


class CodeCache:
    """A code cache opened for reading; arrays are memory-mapped on first use."""

    def __init__(self, path: Path, manifest: dict) -> None:
        self.path = path
        self.manifest = manifest
        self.codebooks = {k: CodebookInfo(**v) for k, v in manifest["codebooks"].items()}
        self.num_tokens = int(manifest["num_tokens"])
        self.num_docs = int(manifest["num_docs"])
        self._arrays: dict[str, Any] = {}
        self._columns: dict[str, np.ndarray] = {}
        self._docs: list[str] | None = None
        self._loaded: Loaded | None = None
        self._doc_first: np.ndarray | None = None

    @classmethod
    def open(cls, path: str | Path) -> CodeCache:
        path = Path(path)
        manifest_path = path / MANIFEST
        if not manifest_path.is_file():
            hint = (
                " (an unfinished build is in " + path.name + ".partial; rerun `codebook cache`)"
                if path.with_name(path.name + ".partial").exists()
                else ""
            )
            raise CacheError(f"{path} is not a code cache: {MANIFEST} is missing{hint}")
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("format") != FORMAT_NAME:
            raise CacheError(f"{manifest_path} is not a {FORMAT_NAME} manifest")
        if manifest.get("format_version", 0) > FORMAT_VERSION:
            raise CacheError(
                f"{path} has cache format {manifest['format_version']}; "
                f"this codebook-lens reads up to {FORMAT_VERSION}"
            )
        return cls(path, manifest)

    # -- raw arrays ------------------------------------------------------------------------

    def _npy(self, rel: str) -> np.ndarray:
        if rel not in self._arrays:
            self._arrays[rel] = np.load(self.path / rel, mmap_mode="r")
        return self._arrays[rel]

    def info(self, key: str) -> CodebookInfo:
        if key not in self.codebooks:
            raise CacheError(f"no codebook {key!r}; present: {', '.join(self.codebooks)}")
        return self.codebooks[key]

    def codes(self, key: str) -> np.ndarray:
        """(tokens, groups, k) code ids of codebook ``key`` (memory-mapped)."""
        self.info(key)
        return self._npy(f"codes/{key}.npy")

    def counts(self, key: str) -> np.ndarray:
        """(groups, C) how many tokens each code fired on."""
        self.info(key)
        return self._npy(f"counts/{key}.npy")

    def check(self, ref: CodeRef) -> None:
        check_ref(ref, {k: (i.groups, i.num_codes) for k, i in self.codebooks.items()})

    def occurrences(self, ref: CodeRef) -> np.ndarray:
        """Sorted token positions where ``ref`` fires (from the inverted index)."""
        self.check(ref)
        offsets = self._npy(f"index/{ref.codebook}.offsets.npy")
        rows = self._npy(f"index/{ref.codebook}.rows.npy")
        lo, hi = int(offsets[ref.group, ref.code]), int(offsets[ref.group, ref.code + 1])
        return np.asarray(rows[lo:hi], dtype=np.int64)

    def _column(self, name: str) -> np.ndarray:
        if name not in self._columns:
            import pyarrow.parquet as pq

            table = pq.read_table(self.path / "tokens.parquet", columns=[name])
            self._columns[name] = table.column(name).to_numpy()
        return self._columns[name]

    @property
    def token_ids(self) -> np.ndarray:
        return self._column("token_id")

    @property
    def doc_ids(self) -> np.ndarray:
        return self._column("doc_id")

    @property
    def starts(self) -> np.ndarray:
        return self._column("start")

    @property
    def ends(self) -> np.ndarray:
        return self._column("end")

    @property
    def docs(self) -> list[str]:
        if self._docs is None:
            import pyarrow.parquet as pq

            self._docs = (
                pq.read_table(self.path / "docs.parquet", columns=["text"])
                .column("text")
                .to_pylist()
            )
        return self._docs

    def utf8(self) -> tuple[list[bytes], np.ndarray, np.ndarray]:
        """The documents as UTF-8 and every token's (start, end) byte offsets in its
        document (computed once, on first use), for byte-level regex matching."""
        if "utf8" not in self._arrays:
            docs = [d.encode("utf-8", "surrogatepass") for d in self.docs]
            first = self.doc_first_token()
            byte_starts = np.empty(self.num_tokens, dtype=np.int64)
            byte_ends = np.empty(self.num_tokens, dtype=np.int64)
            starts, ends = self.starts, self.ends
            for doc, text in enumerate(self.docs):
                lo, hi = int(first[doc]), int(first[doc + 1])
                cps = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype="<u4")
                width = 1 + (cps >= 0x80) + (cps >= 0x800) + (cps >= 0x10000)
                at = np.concatenate([[0], np.cumsum(width)])  # byte offset of each character
                byte_starts[lo:hi] = at[starts[lo:hi]]
                byte_ends[lo:hi] = at[ends[lo:hi]]
            self._arrays["utf8"] = (docs, byte_starts, byte_ends)
        return self._arrays["utf8"]

    def doc_first_token(self) -> np.ndarray:
        """(docs + 1,) the first token position of each document (and the total)."""
        if self._doc_first is None:
            counts = np.bincount(self.doc_ids, minlength=self.num_docs)
            self._doc_first = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        return self._doc_first

    # -- queries ---------------------------------------------------------------------------

    def frequencies(self, key: str) -> np.ndarray:
        """(groups, C) fraction of tokens each code fires on."""
        return self.counts(key) / max(1, self.num_tokens)

    def dead_fraction(self, key: str) -> float:
        return float((self.counts(key) == 0).mean())

    def context(self, position: int, window: int = 12, rank: int = 0) -> Context:
        """The text of ``window`` tokens either side of ``position`` (within its document)."""
        if not 0 <= position < self.num_tokens:
            raise CacheError(f"token position {position} is outside 0..{self.num_tokens - 1}")
        doc = int(self.doc_ids[position])
        first = self.doc_first_token()
        lo = max(int(first[doc]), position - window)
        hi = min(int(first[doc + 1]) - 1, position + window)
        text = self.docs[doc]
        starts, ends = self.starts, self.ends
        s, e = int(starts[position]), int(ends[position])
        return Context(
            position=position,
            doc_id=doc,
            rank=rank,
            left=text[int(starts[lo]) : s],
            token=text[s:e],
            right=text[e : int(ends[hi])],
        )

    def top_contexts(
        self,
        ref: CodeRef,
        limit: int = 20,
        offset: int = 0,
        window: int = 12,
        order: str = "rank",
    ) -> tuple[int, list[Context]]:
        """(total occurrences, one page of contexts) of a code.

        ``order="rank"``: occurrences where the code is the best match (slot 0) first,
        then slot 1, ...; corpus order within a slot. ``order="corpus"``: corpus order.
        """
        if order not in ("rank", "corpus"):
            raise CacheError(f"order must be 'rank' or 'corpus', got {order!r}")
        if limit < 0 or offset < 0:
            raise CacheError(f"limit and offset must be >= 0, got {limit}, {offset}")
        rows = self.occurrences(ref)
        k = self.codebooks[ref.codebook].k
        if order == "rank" and k > 1 and rows.size:
            slots = self.codes(ref.codebook)[rows, ref.group, :]  # (n, k)
            ranks = (slots == ref.code).argmax(axis=1)
            keep = np.argsort(ranks, kind="stable")[offset : offset + limit]
            page, page_ranks = rows[keep], ranks[keep]
        else:
            page = rows[offset : offset + limit]
            if k > 1 and page.size:
                page_ranks = (self.codes(ref.codebook)[page, ref.group, :] == ref.code).argmax(1)
            else:
                page_ranks = np.zeros(page.size, dtype=np.int64)
        contexts = [
            self.context(int(p), window, int(r))
            for p, r in zip(page.tolist(), page_ranks.tolist(), strict=True)
        ]
        return int(rows.size), contexts

    def code_vectors(self, key: str) -> torch.Tensor:
        """(G, C, d) code vectors of codebook ``key``."""
        from safetensors import safe_open

        self.info(key)
        with safe_open(str(self.path / "codebooks.safetensors"), framework="pt") as fh:
            return fh.get_tensor(f"{key}.weight")

    def effects(self, key: str) -> dict[str, np.ndarray]:
        self.info(key)
        rel = f"effects/{key}.npz"
        if rel not in self._arrays:
            with np.load(self.path / rel) as data:
                self._arrays[rel] = {name: data[name] for name in data.files}
        return self._arrays[rel]

    def vocab(self) -> list[str]:
        """Text of every token id of the model's vocabulary."""
        if "vocab" not in self._arrays:
            self._arrays["vocab"] = json.loads((self.path / "vocab.json").read_text())
        return self._arrays["vocab"]

    def model(self) -> Loaded:
        """The model this cache was built from (loaded once, on first use)."""
        if self._loaded is None:
            self._loaded = load_codebook_model(self.manifest["model"])
        return self._loaded

    def set_model(self, loaded: Loaded) -> None:
        """Use an already loaded model for queries that run the model."""
        self._loaded = loaded

    def summary(self) -> dict:
        """Model, corpus, sizes, and per codebook its shape and dead-code fraction."""
        return {
            "path": str(self.path),
            "model": self.manifest["model"],
            "corpus": self.manifest["corpus"],
            "num_tokens": self.num_tokens,
            "num_docs": self.num_docs,
            "codebooks": {
                key: {**info.to_dict(), "dead_fraction": self.dead_fraction(key)}
                for key, info in self.codebooks.items()
            },
        }
