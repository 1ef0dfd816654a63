"""Code caches: a codebook model's code ids over a corpus, written once
(:func:`build_cache`) and read by every query (:class:`CodeCache`)."""

from codebook_lens.cache.build import BuildResult, build_cache, corpus_documents
from codebook_lens.cache.store import CacheError, CodebookInfo, CodeCache, Context

__all__ = [
    "BuildResult",
    "CacheError",
    "CodeCache",
    "CodebookInfo",
    "Context",
    "build_cache",
    "corpus_documents",
]
