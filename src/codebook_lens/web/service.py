"""What the code browser answers, as plain dicts, independent of the web framework.

:class:`Browser` holds one opened :class:`~codebook_lens.cache.store.CodeCache` (memory-mapped,
nothing read up front) and, optionally, a loaded model for topic search and steering.
Every method is safe to call from several threads at once: model calls are serialised
with a lock, the regex searches that may run at once are bounded, and the first read of
the token table happens once.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from codebook_lens.analysis.search import (
    RegexResult,
    frequency_by_rank,
    logit_effect,
    matching_tokens,
    score_codes,
    topic_codes,
)
from codebook_lens.cache.store import CodeCache, check_model_fits
from codebook_lens.core.errors import CodebookLensError
from codebook_lens.core.loading import Loaded, load_codebook_model
from codebook_lens.core.refs import CodeRef
from codebook_lens.plots import frequency_plot
from codebook_lens.steering.intervene import Intervention, check_intervention
from codebook_lens.steering.sampling import generate

VECTOR_CACHE = 4  # codebooks whose code vectors stay in memory for similar-code queries
MATCH_CACHE_BYTES = 64 << 20  # regex match masks kept, so re-sorting a search is quick


class QueryError(CodebookLensError):
    """A request that cannot be answered, with the HTTP status that says why."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class BrowserCache(CodeCache):
    """A CodeCache that keeps the unit-length code vectors of recently used codebooks in
    memory, for similar-code queries."""

    def __init__(self, path: Path, manifest: dict) -> None:
        super().__init__(path, manifest)
        self._units: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._units_lock = threading.Lock()

    def unit_vectors(self, key: str) -> torch.Tensor:
        """(G, C, d) code vectors of codebook ``key``, each scaled to unit length."""
        with self._units_lock:
            if key in self._units:
                self._units.move_to_end(key)
                return self._units[key]
        units = torch.nn.functional.normalize(self.code_vectors(key).float(), dim=-1)
        with self._units_lock:
            self._units[key] = units
            while len(self._units) > VECTOR_CACHE:
                self._units.popitem(last=False)
        return units


class Browser:
    """Queries over one code cache (and optionally its model) for the web app."""

    def __init__(
        self,
        cache_dir: str | Path,
        model_dir: str | Path | None = None,
        *,
        regex_time_budget: float = 5.0,
        regex_workers: int = 2,
    ) -> None:
        self.cache = BrowserCache.open(cache_dir)
        self.regex_time_budget = regex_time_budget
        self.loaded: Loaded | None = None
        self.model_lock = threading.Lock()
        self._model_error: str | None = None
        self._regex_slots = threading.BoundedSemaphore(regex_workers)
        self._match_cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._matches_lock = threading.Lock()
        self._text_lock = threading.Lock()
        self._text_ready = False
        self._plot_lock = threading.Lock()
        self._plot: str | None = None
        self._overview: dict[str, Any] | None = None
        if model_dir is not None:
            loaded = load_codebook_model(model_dir)
            check_model_fits(self.cache, loaded)
            self.cache.set_model(loaded)
            self.loaded = loaded

    @property
    def steering(self) -> bool:
        """Whether a model was given, so that steering is offered."""
        return self.loaded is not None

    # -- shared pieces ---------------------------------------------------------------------

    def _ensure_text(self) -> None:
        """Read the token table and documents once, whichever request needs them first."""
        if self._text_ready:
            return
        with self._text_lock:
            if not self._text_ready:
                cache = self.cache
                cache.doc_first_token()
                _ = cache.docs, cache.starts, cache.ends, cache.doc_ids
                self._text_ready = True

    def warm(self) -> None:
        """Read what the first requests need (token table, overview, plot) ahead of them."""
        self._ensure_text()
        self.overview()
        self.frequency_svg()

    def ref(self, text: str) -> CodeRef:
        """The code named by ``text``: 400 when it names no code, 404 when the cache lacks it."""
        try:
            ref = CodeRef.parse(text)
        except CodebookLensError as err:
            raise QueryError(400, str(err)) from None
        try:
            self.cache.check(ref)
        except CodebookLensError as err:
            raise QueryError(404, f"no code {ref} in this cache: {err}") from None
        return ref

    def codebook(self, key: str | None) -> list[str] | None:
        """``[key]`` for a codebook of the cache, None for all; 400 for an unknown one."""
        if key is None or key == "":
            return None
        if key not in self.cache.codebooks:
            raise QueryError(
                400, f"no codebook {key!r}; present: {', '.join(self.cache.codebooks)}"
            )
        return [key]

    # -- overview --------------------------------------------------------------------------

    def overview(self) -> dict[str, Any]:
        """Model, corpus, token count and every codebook with its dead-code fraction."""
        if self._overview is None:
            cache = self.cache
            manifest = cache.manifest
            rows = []
            for key, info in cache.codebooks.items():
                counts = cache.counts(key)
                rows.append(
                    {
                        **info.to_dict(),
                        "codes": int(counts.size),
                        "active_codes": int((counts > 0).sum()),
                        "dead_fraction": cache.dead_fraction(key),
                    }
                )
            self._overview = {
                "model": manifest["model"],
                "model_kind": manifest.get("model_kind"),
                "tokenizer": manifest.get("tokenizer"),
                "corpus": manifest["corpus"],
                "num_tokens": cache.num_tokens,
                "num_docs": cache.num_docs,
                "seq_len": manifest.get("seq_len"),
                "created": manifest.get("created"),
                "codebooks": rows,
            }
        return {**self._overview, "steering": self.steering}

    def frequency_svg(self) -> str:
        """The frequency-by-rank plot of every codebook, rendered once."""
        with self._plot_lock:  # matplotlib is not thread-safe, and one render is enough
            if self._plot is None:
                counts = {
                    k: frequency_by_rank(self.cache, k).tolist() for k in self.cache.codebooks
                }
                self._plot = frequency_plot(counts)
            return self._plot

    # -- one code --------------------------------------------------------------------------

    def contexts(
        self, ref: CodeRef, offset: int, limit: int, window: int, order: str
    ) -> dict[str, Any]:
        """One page of the code's contexts, as :meth:`CodeCache.top_contexts` gives them."""
        self._ensure_text()
        total, page = self.cache.top_contexts(ref, limit, offset, window, order)
        return {
            "code": str(ref),
            "total": total,
            "offset": offset,
            "limit": limit,
            "window": window,
            "order": order,
            "contexts": [c.to_dict() for c in page],
        }

    def code(
        self,
        ref: CodeRef,
        *,
        offset: int = 0,
        limit: int = 20,
        window: int = 12,
        order: str = "rank",
        top: int = 10,
        similar: int = 10,
    ) -> dict[str, Any]:
        """Everything the code page shows: frequency, contexts, logit effect, similar codes."""
        cache = self.cache
        info = cache.codebooks[ref.codebook]
        counts = cache.counts(ref.codebook)
        count = int(counts[ref.group, ref.code])
        effect = logit_effect(cache, ref, top)
        near = self.similar(ref, similar)
        return {
            "code": str(ref),
            "codebook": ref.codebook,
            "group": ref.group,
            "id": ref.code,
            "site": info.site,
            "layer": info.layer,
            "groups": info.groups,
            "k": info.k,
            "num_codes": info.num_codes,
            "count": count,
            "frequency": count / max(1, cache.num_tokens),
            "num_tokens": cache.num_tokens,
            "contexts": self.contexts(ref, offset, limit, window, order),
            "effect": {"promoted": effect["promoted"], "suppressed": effect["suppressed"]},
            "similar": [
                {"code": str(r), "cosine": v, "count": int(counts[r.group, r.code])}
                for r, v in near
            ],
        }

    def similar(self, ref: CodeRef, top: int = 10) -> list[tuple[CodeRef, float]]:
        """As :func:`codebook_lens.analysis.search.similar_codes`, from vectors normalised once."""
        units = self.cache.unit_vectors(ref.codebook)[ref.group]
        sims = units @ units[ref.code]
        sims[ref.code] = -float("inf")
        best = sims.topk(min(top, sims.numel() - 1))
        return [
            (CodeRef(ref.codebook, int(i), ref.group), float(v))
            for i, v in zip(best.indices.tolist(), best.values.tolist(), strict=True)
        ]

    # -- search ----------------------------------------------------------------------------

    def _matches(self, pattern: str, deadline: float) -> np.ndarray:
        """The tokens matching ``pattern`` (see :func:`codebook_lens.analysis.search.matching_tokens`),
        kept for the latest patterns so that re-sorting or re-filtering a search is quick."""
        with self._matches_lock:
            if pattern in self._match_cache:
                self._match_cache.move_to_end(pattern)
                return self._match_cache[pattern]
        mask = matching_tokens(self.cache, pattern, deadline=deadline)
        keep = max(1, MATCH_CACHE_BYTES // max(1, mask.nbytes))
        with self._matches_lock:
            self._match_cache[pattern] = mask
            while len(self._match_cache) > keep:
                self._match_cache.popitem(last=False)
        return mask

    def regex(
        self,
        pattern: str,
        *,
        min_precision: float = 0.0,
        min_recall: float = 0.0,
        min_count: int = 1,
        sort: str = "precision",
        limit: int = 50,
        codebook: str | None = None,
    ) -> dict[str, Any]:
        """Codes ranked by precision/recall on the pattern's matches, within the time budget."""
        codebooks = self.codebook(codebook)
        self._ensure_text()
        with self._regex_slots:
            t0 = time.perf_counter()
            deadline = t0 + self.regex_time_budget
            positives = self._matches(pattern, deadline)
            scores = score_codes(
                self.cache,
                positives,
                codebooks,
                min_precision,
                min_recall,
                min_count,
                limit,
                sort,
                deadline=deadline,
                pattern=pattern,
            )
            seconds = time.perf_counter() - t0
        n = self.cache.num_tokens
        return RegexResult(pattern, int(positives.sum()), n, scores, seconds).to_dict()

    def _model(self) -> Loaded:
        """The model for topic search: the one given, else the one the cache was built from."""
        if self.loaded is not None:
            return self.loaded
        with self.model_lock:
            if self._model_error is None:
                try:
                    return self.cache.model()
                except CodebookLensError as err:  # missing, damaged or not the cache's own
                    self._model_error = (
                        "topic search needs the model this cache was built from "
                        f"({self.cache.manifest['model']}), which could not be loaded "
                        f"({err}); start the server with --model MODEL_DIR"
                    )
        raise QueryError(409, self._model_error)

    def topic(
        self,
        text: str,
        *,
        min_fraction: float = 0.5,
        max_frequency: float = 0.01,
        limit: int = 50,
    ) -> dict[str, Any]:
        """Codes that cover ``text`` (runs the model on it)."""
        self._model()
        with self.model_lock:
            hits = topic_codes(
                self.cache,
                text,
                min_fraction=min_fraction,
                max_frequency=max_frequency,
                limit=limit,
                codebooks=list(self.cache.codebooks),
            )
        return {"text": text, "codes": [h.to_dict() for h in hits]}

    # -- steering --------------------------------------------------------------------------

    def steer(
        self,
        prompt: str,
        force: Sequence[str],
        disable: Sequence[str] = (),
        *,
        mode: str = "replace_last",
        samples: int = 2,
        max_new_tokens: int = 24,
        temperature: float = 1.0,
        seed: int = 0,
        from_position: int | None = None,
        strength: float = 1.0,
    ) -> dict[str, Any]:
        """Continuations of ``prompt`` without and with the intervention, same seeds."""
        loaded = self.loaded
        if loaded is None:
            raise QueryError(404, "steering needs the server started with --model MODEL_DIR")
        if not force and not disable:
            raise QueryError(400, "give at least one code to force on or to disable")
        positions = None if from_position is None else slice(from_position, None)
        intervention = Intervention(list(force), list(disable), mode, positions, strength)
        check_intervention(loaded.model, intervention)
        options = {
            "samples": samples,
            "max_new_tokens": max_new_tokens,
            "temperature": temperature,
            "seed": seed,
        }
        with self.model_lock:
            baseline = generate(loaded, prompt, **options)[0]
            steered = generate(loaded, prompt, intervention=intervention, **options)[0]
        return {
            "prompt": prompt,
            **intervention.describe(),
            **options,
            "baseline": baseline,
            "steered": steered,
        }
