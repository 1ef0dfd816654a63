"""The JSON API under ``/api``: the same answers as the pages, for programs."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from codebook_lens.web.params import (
    CodebookQuery,
    CodePath,
    Fraction,
    Limit,
    MinCount,
    Offset,
    OrderQuery,
    Page,
    Pattern,
    PerPage,
    Results,
    Similar,
    Sort,
    SteerRequest,
    Top,
    TopicRequest,
    Window,
)
from codebook_lens.web.service import Browser

Json = dict[str, Any]


def api_router(browser: Browser) -> APIRouter:
    router = APIRouter(prefix="/api", tags=["api"])

    # Plain ``def`` handlers: FastAPI runs them in its thread pool, so the CPU-bound
    # searches and model calls never block the event loop.

    @router.get("/health")
    def health() -> Json:
        """Whether the server answers."""
        return {"status": "ok"}

    @router.get("/overview")
    def overview() -> Json:
        """Model, corpus, token count, and every codebook with its dead-code fraction."""
        return browser.overview()

    @router.get("/codes/{code:path}/contexts")
    def contexts(
        code: CodePath,
        offset: Offset = 0,
        limit: Limit = 20,
        window: Window = 12,
        order: OrderQuery = "rank",
    ) -> Json:
        """One page of the code's contexts (the firing token with the text around it)."""
        return browser.contexts(browser.ref(code), offset, limit, window, order)

    @router.get("/codes/{code:path}")
    def code(
        code: CodePath,
        page: Page = 1,
        per_page: PerPage = 20,
        window: Window = 12,
        order: OrderQuery = "rank",
        top: Top = 10,
        similar: Similar = 10,
    ) -> Json:
        """A code's frequency, one page of contexts, direct logit effect and similar codes."""
        return browser.code(
            browser.ref(code),
            offset=(page - 1) * per_page,
            limit=per_page,
            window=window,
            order=order,
            top=top,
            similar=similar,
        )

    @router.get("/search/regex")
    def regex(
        pattern: Pattern,
        min_precision: Fraction = 0.0,
        min_recall: Fraction = 0.0,
        min_count: MinCount = 1,
        sort: Sort = "precision",
        limit: Results = 50,
        codebook: CodebookQuery = None,
    ) -> Json:
        """Codes ranked by precision and recall on the tokens where the RE2 pattern's
        matches end; a bad pattern, or one that runs past the time budget, is a 400."""
        return browser.regex(
            pattern,
            min_precision=min_precision,
            min_recall=min_recall,
            min_count=min_count,
            sort=sort,
            limit=limit,
            codebook=codebook,
        )

    @router.post("/search/topic")
    def topic(body: TopicRequest) -> Json:
        """Codes that fire on much of the text and rarely in the corpus (runs the model;
        409 when no model can be loaded)."""
        return browser.topic(
            body.text,
            min_fraction=body.min_fraction,
            max_frequency=body.max_frequency,
            limit=body.limit,
        )

    @router.post("/steer")
    def steer(body: SteerRequest) -> Json:
        """Continuations without and with codes forced on or disabled, side by side (404
        unless the server was started with --model)."""
        return browser.steer(
            body.prompt,
            body.force,
            body.disable,
            mode=body.mode,
            samples=body.samples,
            max_new_tokens=body.max_new_tokens,
            temperature=body.temperature,
            seed=body.seed,
            from_position=body.from_position,
            strength=body.strength,
        )

    return router
