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

``CodeCache.open(OUT)`` reads it back without loading the code arrays into memory. It
checks the manifest and the array headers first (see :mod:`.manifest`); the other files
are checked when first read. A damaged or inconsistent cache is reported as a
:class:`CacheError` naming the file, never as another exception or a wrong answer.
"""

from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open

from codebook_lens.cache.manifest import (
    FORMAT_NAME,
    FORMAT_VERSION,
    MANIFEST,
    CacheError,
    CodebookInfo,
    cache_file,
    check_arrays,
    code_dtype,
    read_manifest,
)
from codebook_lens.core.loading import Loaded, context_length, load_codebook_model
from codebook_lens.core.refs import CodeRef, check_ref

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "MANIFEST",
    "CacheError",
    "CodeCache",
    "CodebookInfo",
    "Context",
    "check_model_fits",
    "code_counts",
    "code_dtype",
    "stored_ids",
]
EFFECT_NAMES = ("promoted", "suppressed", "promoted_logit", "suppressed_logit")


def stored_ids(ids: np.ndarray, num_codes: int) -> np.ndarray:
    """Code ids as a cache stores them: an empty slot (``EMPTY_SLOT``, -1: an activation
    that passed through dense, see ``CodebookConfig.outlier_factor``) becomes
    ``num_codes``, which no code has; every query skips it."""
    ids = np.asarray(ids)
    return np.where(ids < 0, num_codes, ids) if ids.size and ids.min() < 0 else ids


def code_counts(ids: np.ndarray, num_codes: int) -> np.ndarray:
    """How often each code ``0 .. num_codes - 1`` occurs in ``ids`` (any shape); empty
    slots (id ``num_codes``, see :func:`stored_ids`) are not counted, nor are ids past it
    (which only a damaged cache holds)."""
    flat = np.asarray(ids).reshape(-1)
    return np.bincount(np.minimum(flat, num_codes), minlength=num_codes + 1)[:num_codes]


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
        self._checked: set[str] = set()
        self.num_docs = int(manifest["num_docs"])
        self._arrays: dict[str, Any] = {}
        self._columns: dict[str, np.ndarray] = {}
        self._docs: list[str] | None = None
        self._loaded: Loaded | None = None
        self._doc_first: np.ndarray | None = None

    @classmethod
    def open(cls, path: str | Path) -> CodeCache:
        """Open the cache in ``path`` after checking its manifest and array headers."""
        path = Path(path)
        manifest, infos = read_manifest(path)
        check_arrays(path, manifest["num_tokens"], infos)
        return cls(path, manifest)

    # -- raw arrays ------------------------------------------------------------------------

    def _file(self, rel: str) -> Path:
        return cache_file(self.path, rel)

    def _npy(self, rel: str) -> np.ndarray:
        if rel not in self._arrays:
            try:
                self._arrays[rel] = np.load(self._file(rel), mmap_mode="r")
            except (OSError, ValueError) as err:
                raise CacheError(f"{self.path / rel} cannot be read: {err}") from None
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
        rel = f"counts/{key}.npy"
        counts = self._npy(rel)
        if rel not in self._checked:
            if counts.size and (counts.min() < 0 or counts.max() > self.num_tokens):
                raise CacheError(
                    f"{self.path / rel} is damaged: counts must lie in 0..{self.num_tokens}"
                )
            self._checked.add(rel)
        return counts

    def check(self, ref: CodeRef) -> None:
        check_ref(ref, {k: (i.groups, i.num_codes) for k, i in self.codebooks.items()})

    def occurrences(self, ref: CodeRef) -> np.ndarray:
        """Sorted token positions where ``ref`` fires (from the inverted index)."""
        self.check(ref)
        offsets = self._npy(f"index/{ref.codebook}.offsets.npy")
        rows = self._npy(f"index/{ref.codebook}.rows.npy")
        lo, hi = int(offsets[ref.group, ref.code]), int(offsets[ref.group, ref.code + 1])
        if not 0 <= lo <= hi <= rows.shape[0]:
            raise CacheError(
                f"the index of {ref.codebook} in {self.path} is damaged: code {ref} spans "
                f"rows {lo}..{hi} of {rows.shape[0]}"
            )
        found = np.asarray(rows[lo:hi], dtype=np.int64)
        if found.size and (found[-1] >= self.num_tokens or (np.diff(found) <= 0).any()):
            raise CacheError(
                f"the index of {ref.codebook} in {self.path} is damaged: code {ref} lists "
                f"positions that do not rise within 0..{self.num_tokens - 1}"
            )
        return found

    def _read_parquet(self, name: str, column: str, rows: int) -> np.ndarray | list:
        """One column of ``name`` (a parquet file of the cache) with ``rows`` values: an
        integer array, or a list of strings for a text column."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = self._file(name)
        try:
            table = pq.read_table(path, columns=[column])
            if table.num_rows != rows:
                raise CacheError(f"{path} has {table.num_rows:,} rows; the manifest says {rows:,}")
            values = table.column(column)
            if pa.types.is_integer(values.type) and values.null_count == 0:
                return values.to_numpy()
            if pa.types.is_string(values.type) or pa.types.is_large_string(values.type):
                texts = values.to_pylist()
                if all(isinstance(t, str) for t in texts):
                    return texts
        except (OSError, ValueError, KeyError, pa.ArrowException) as err:
            if isinstance(err, CacheError):
                raise
            raise CacheError(f"{path} cannot be read: {err}") from None
        raise CacheError(f"{path}: {column} holds values of type {values.type} or nulls")

    def _column(self, name: str) -> np.ndarray:
        if name not in self._columns:
            values = self._read_parquet("tokens.parquet", name, self.num_tokens)
            if not isinstance(values, np.ndarray):
                raise CacheError(f"{self.path / 'tokens.parquet'}: {name} must hold integers")
            self._columns[name] = values
        if name not in self._checked:
            self._check_column(name, self._columns[name])
            self._checked.add(name)
        return self._columns[name]

    def _check_column(self, name: str, values: np.ndarray) -> None:
        """The token table's values must fit the documents and the vocabulary."""
        where = self.path / "tokens.parquet"
        if name == "doc_id":
            if values[0] != 0 or values[-1] != self.num_docs - 1 or (np.diff(values) < 0).any():
                raise CacheError(
                    f"{where}: doc_id must rise from 0 to {self.num_docs - 1} in corpus order"
                )
        elif name == "token_id":
            if values.min() < 0 or values.max() >= len(self.vocab()):
                raise CacheError(f"{where}: token_id must lie in 0..{len(self.vocab()) - 1}")
        else:
            starts, ends = self._columns.get("start"), self._columns.get("end")
            if starts is None or ends is None:
                return  # checked when the second of the two is read
            lengths = np.array([len(d) for d in self.docs], dtype=np.int64)[self.doc_ids]
            if (starts < 0).any() or (ends < starts).any() or (ends > lengths).any():
                raise CacheError(
                    f"{where}: token offsets must satisfy 0 <= start <= end <= document length"
                )
            self._checked.update(("start", "end"))

    @property
    def token_ids(self) -> np.ndarray:
        return self._column("token_id")

    @property
    def doc_ids(self) -> np.ndarray:
        return self._column("doc_id")

    @property
    def starts(self) -> np.ndarray:
        self._column("end")
        return self._column("start")

    @property
    def ends(self) -> np.ndarray:
        self._column("start")
        return self._column("end")

    @property
    def docs(self) -> list[str]:
        if self._docs is None:
            docs = self._read_parquet("docs.parquet", "text", self.num_docs)
            if not isinstance(docs, list):
                raise CacheError(f"{self.path / 'docs.parquet'}: text must hold strings")
            self._docs = docs
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
        if window < 0:
            raise CacheError(f"the context window must be >= 0 tokens, got {window}")
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
        if limit < 0 or offset < 0 or window < 0:
            raise CacheError(
                f"limit, offset and window must be >= 0, got {limit}, {offset}, {window}"
            )
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
        info = self.info(key)
        path = self._file("codebooks.safetensors")
        try:
            with safe_open(str(path), framework="pt") as fh:
                if f"{key}.weight" not in fh.keys():
                    raise CacheError(f"{path} holds no code vectors of {key}")
                vectors = fh.get_tensor(f"{key}.weight")
        except (SafetensorError, OSError) as err:
            raise CacheError(f"{path} cannot be read: {err}") from None
        if (
            vectors.dim() != 3
            or tuple(vectors.shape[:2]) != (info.groups, info.num_codes)
            or vectors.shape[2] < 1
            or not vectors.is_floating_point()
        ):
            raise CacheError(
                f"{path}: {key}.weight is a {vectors.dtype} tensor of shape "
                f"{tuple(vectors.shape)}; the manifest needs ({info.groups}, {info.num_codes}, d)"
            )
        return vectors

    def effects(self, key: str) -> dict[str, np.ndarray]:
        """Each code's stored direct effect on the logits: ``promoted``/``suppressed``
        token ids and their logits, each ``(G, C, top)``."""
        info = self.info(key)
        rel = f"effects/{key}.npz"
        if rel not in self._arrays:
            path = self._file(rel)
            try:
                with np.load(path) as data:
                    effects = {name: data[name] for name in EFFECT_NAMES}
            except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:
                raise CacheError(f"{path} cannot be read: {err!r}") from None
            shape = effects["promoted"].shape
            fits = len(shape) == 3 and shape[:2] == (info.groups, info.num_codes) and shape[2] > 0
            if not fits or any(a.shape != shape for a in effects.values()):
                raise CacheError(
                    f"{path}: every array must have shape ({info.groups}, {info.num_codes}, top)"
                )
            vocab = len(self.vocab())
            for name in ("promoted", "suppressed"):
                ids = effects[name]
                if ids.dtype.kind not in "iu" or ids.min() < 0 or ids.max() >= vocab:
                    raise CacheError(f"{path}: {name} must hold token ids in 0..{vocab - 1}")
            for name in ("promoted_logit", "suppressed_logit"):
                if effects[name].dtype.kind != "f":
                    raise CacheError(f"{path}: {name} must hold floats")
            self._arrays[rel] = effects
        return self._arrays[rel]

    def vocab(self) -> list[str]:
        """Text of every token id of the model's vocabulary."""
        if "vocab" not in self._arrays:
            path = self._file("vocab.json")
            try:
                vocab = json.loads(path.read_bytes())
            except (OSError, ValueError) as err:
                raise CacheError(f"{path} cannot be read: {err}") from None
            if (
                not isinstance(vocab, list)
                or not vocab
                or not all(isinstance(t, str) for t in vocab)
            ):
                raise CacheError(f"{path} must hold a non-empty list of token texts")
            self._arrays["vocab"] = vocab
        return self._arrays["vocab"]

    def model(self) -> Loaded:
        """The model this cache was built from (loaded once, on first use)."""
        if self._loaded is None:
            loaded = load_codebook_model(self.manifest["model"])
            check_model_fits(self, loaded)
            self._loaded = loaded
        return self._loaded

    def set_model(self, loaded: Loaded) -> None:
        """Use an already loaded model for queries that run the model (after checking that
        it is the model the cache was built with: :func:`check_model_fits`)."""
        check_model_fits(self, loaded)
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


def check_model_fits(cache: CodeCache, loaded: Loaded) -> None:
    """Raise a CacheError unless ``loaded`` has every codebook of the cache, with the
    same shape and, when the cache recorded them, the same code vectors: codes read
    from a cache mean something only for the model that wrote them."""
    for key, info in cache.codebooks.items():
        if key not in loaded.model.codebooks:
            raise CacheError(f"the model has no codebook {key!r}, which the cache {cache.path} has")
        cb = loaded.model.codebooks[key]
        if (cb.groups, cb.num_codes) != (info.groups, info.num_codes):
            raise CacheError(
                f"codebook {key} has {cb.groups} group(s) of {cb.num_codes} codes in the model "
                f"but {info.groups} of {info.num_codes} in the cache"
            )
    length = context_length(loaded)
    if length is not None and cache.manifest["seq_len"] > length:
        raise CacheError(
            f"the cache {cache.path} was built in blocks of {cache.manifest['seq_len']} tokens; "
            f"the model {loaded.source} has {length} positions"
        )
    recorded = cache.manifest.get("codebook_digest")
    if recorded is None:
        return
    digests = loaded.model.codebook_digests()
    changed = sorted(key for key in cache.codebooks if digests.get(key) != recorded[key])
    if changed:
        raise CacheError(
            f"the model {loaded.source} is not the one the cache {cache.path} was built with: "
            f"the code vectors of {', '.join(changed)} differ"
        )
