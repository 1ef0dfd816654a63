"""The HTML pages: overview, code, regex search, topic search and steering."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote, urlencode

from fastapi import APIRouter, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse
from fastapi.templating import Jinja2Templates

from codebook_lens.core.errors import CodebookLensError
from codebook_lens.web.params import (
    MAX_NEW_TOKENS,
    MAX_PROMPT_CHARS,
    MAX_RESULTS,
    MAX_SAMPLES,
    MAX_SEED,
    MAX_STEER_CODES,
    MAX_STRENGTH,
    MAX_TEXT_CHARS,
    CodebookQuery,
    CodePath,
    CodeQuery,
    Fraction,
    MaxFrequency,
    MinCount,
    MinFraction,
    Mode,
    OptionalPattern,
    OptionalText,
    OrderQuery,
    Page,
    PerPage,
    Results,
    Sort,
    Window,
    check_unicode,
    split_codes,
)
from codebook_lens.web.service import Browser, QueryError

HERE = Path(__file__).resolve().parent


def code_url(code: str) -> str:
    """The code page of ``code`` (a canonical code string)."""
    return "/code/" + quote(code, safe="/:")


def visible(token: str) -> str:
    """A token's text with its whitespace made visible."""
    return token.replace(" ", "␣").replace("\n", "⏎").replace("\t", "⇥") or "∅"


def make_templates() -> Jinja2Templates:
    templates = Jinja2Templates(directory=str(HERE / "templates"))
    env = templates.env
    env.filters["code_url"] = code_url
    env.filters["visible"] = visible
    env.filters["pct"] = lambda x, digits=2: f"{100 * x:.{digits}f}%"
    env.filters["num"] = lambda x: f"{x:,}"
    env.filters["fixed"] = lambda x, digits=3: f"{x:.{digits}f}"
    env.globals["zip"] = zip
    return templates


def link(request: Request, **changes: Any) -> str:
    """This page's path and query with some parameters changed (None drops one)."""
    params = dict(request.query_params)
    for key, value in changes.items():
        if value is None:
            params.pop(key, None)
        else:
            params[key] = str(value)
    return request.url.path + ("?" + urlencode(params) if params else "")


def page_router(browser: Browser, templates: Jinja2Templates) -> APIRouter:
    router = APIRouter(tags=["pages"], default_response_class=HTMLResponse)

    def render(request: Request, name: str, status: int = 200, **context: Any) -> HTMLResponse:
        context = {"steering": browser.steering, "link": lambda **c: link(request, **c), **context}
        return templates.TemplateResponse(request, name, context, status_code=status)

    @router.get("/", response_class=HTMLResponse)
    def overview(request: Request) -> HTMLResponse:
        """Model, corpus and codebooks, with the frequency-by-rank plot."""
        return render(
            request,
            "overview.html",
            overview=browser.overview(),
            plot=browser.frequency_svg(),
        )

    @router.get("/go", response_class=RedirectResponse, status_code=303)
    def go(code: CodeQuery) -> RedirectResponse:
        """The code page of the code typed in the header's box."""
        return RedirectResponse(code_url(str(browser.ref(code))), status_code=303)

    @router.get("/code/{code:path}", response_class=HTMLResponse)
    def code(
        request: Request,
        code: CodePath,
        page: Page = 1,
        per_page: PerPage = 20,
        window: Window = 12,
        order: OrderQuery = "rank",
    ) -> HTMLResponse:
        """One code: frequency, top contexts (paged), logit effect, similar codes."""
        ref = browser.ref(code)
        data = browser.code(
            ref, offset=(page - 1) * per_page, limit=per_page, window=window, order=order
        )
        pages = max(1, math.ceil(data["count"] / per_page))
        return render(
            request,
            "code.html",
            data=data,
            page=page,
            pages=pages,
            per_page=per_page,
            order=order,
        )

    @router.get("/search/regex", response_class=HTMLResponse)
    def regex(
        request: Request,
        pattern: OptionalPattern = None,
        min_precision: Fraction = 0.0,
        min_recall: Fraction = 0.0,
        min_count: MinCount = 1,
        sort: Sort = "precision",
        limit: Results = 50,
        codebook: CodebookQuery = None,
    ) -> HTMLResponse:
        """A form for an RE2 pattern; the codes that best classify its matches."""
        form = {
            "pattern": pattern or "",
            "min_precision": min_precision,
            "min_recall": min_recall,
            "min_count": min_count,
            "sort": sort,
            "limit": limit,
            "codebook": codebook or "",
        }
        result, error, status = None, None, 200
        if pattern:
            try:
                result = browser.regex(
                    pattern,
                    min_precision=min_precision,
                    min_recall=min_recall,
                    min_count=min_count,
                    sort=sort,
                    limit=limit,
                    codebook=codebook,
                )
            except QueryError as err:
                error, status = err.message, err.status
            except CodebookLensError as err:
                error, status = str(err), 400
        return render(
            request,
            "regex.html",
            status,
            form=form,
            result=result,
            error=error,
            codebooks=list(browser.cache.codebooks),
            max_results=MAX_RESULTS,
        )

    @router.get("/search/topic", response_class=HTMLResponse)
    def topic(
        request: Request,
        text: OptionalText = None,
        min_fraction: MinFraction = 0.5,
        max_frequency: MaxFrequency = 0.01,
        limit: Results = 50,
    ) -> HTMLResponse:
        """A box for text; the codes that cover it (runs the model)."""
        form = {
            "text": text or "",
            "min_fraction": min_fraction,
            "max_frequency": max_frequency,
            "limit": limit,
        }
        result, error, status = None, None, 200
        if text and text.strip():
            try:
                check_unicode(text, "text")
                result = browser.topic(
                    text, min_fraction=min_fraction, max_frequency=max_frequency, limit=limit
                )
            except QueryError as err:
                error, status = err.message, err.status
            except CodebookLensError as err:
                error, status = str(err), 400
        return render(
            request,
            "topic.html",
            status,
            form=form,
            result=result,
            error=error,
            max_text=MAX_TEXT_CHARS,
            max_results=MAX_RESULTS,
        )

    @router.get("/steer", response_class=HTMLResponse)
    def steer(
        request: Request,
        prompt: Annotated[str | None, Query(max_length=MAX_PROMPT_CHARS)] = None,
        codes: Annotated[
            str | None, Query(max_length=2000, description="codes to force on")
        ] = None,
        disable: Annotated[
            str | None, Query(max_length=2000, description="codes to disable")
        ] = None,
        mode: Mode = "replace_last",
        samples: Annotated[int, Query(ge=1, le=MAX_SAMPLES)] = 2,
        max_new_tokens: Annotated[int, Query(ge=1, le=MAX_NEW_TOKENS)] = 24,
        temperature: Annotated[float, Query(ge=0.0, le=2.0, allow_inf_nan=False)] = 1.0,
        seed: Annotated[int, Query(ge=0, le=MAX_SEED)] = 0,
        from_position: Annotated[
            str | None,
            Query(pattern=r"^\d{0,9}$", description="intervene from this position on; empty: all"),
        ] = None,
        strength: Annotated[
            float, Query(ge=-MAX_STRENGTH, le=MAX_STRENGTH, allow_inf_nan=False)
        ] = 1.0,
    ) -> HTMLResponse:
        """Baseline and steered continuations side by side (needs --model)."""
        form = {
            "prompt": prompt or "",
            "codes": codes or "",
            "disable": disable or "",
            "mode": mode,
            "samples": samples,
            "max_new_tokens": max_new_tokens,
            "temperature": temperature,
            "seed": seed,
            "from_position": from_position or "",
            "strength": strength,
        }
        result, error, status = None, None, 200
        if not browser.steering:
            error, status = "Steering needs the server started with --model MODEL_DIR.", 404
        elif prompt is not None:
            force, off = split_codes(codes), split_codes(disable)
            try:
                check_unicode(prompt, "prompt")
                if max(len(force), len(off)) > MAX_STEER_CODES:
                    raise CodebookLensError(
                        f"name at most {MAX_STEER_CODES} codes to force or disable"
                    )
                result = browser.steer(
                    prompt,
                    force,
                    off,
                    mode=mode,
                    samples=samples,
                    max_new_tokens=max_new_tokens,
                    temperature=temperature,
                    seed=seed,
                    from_position=int(from_position) if from_position else None,
                    strength=strength,
                )
            except QueryError as err:
                error, status = err.message, err.status
            except CodebookLensError as err:
                error, status = str(err), 400
        return render(
            request,
            "steer.html",
            status,
            form=form,
            result=result,
            error=error,
            max_samples=MAX_SAMPLES,
            max_new_tokens=MAX_NEW_TOKENS,
            max_strength=MAX_STRENGTH,
        )

    return router
