"""The code browser: a FastAPI app over one code cache, with HTML pages and a JSON API.

``create_app(cache_dir, model_dir=None)`` opens the cache (memory-mapped; nothing is
read up front) and, with ``model_dir``, loads a model for topic search and steering.
Errors are answered with a clear message and a 4xx status: a JSON ``{"detail": ...}``
under ``/api``, an HTML page elsewhere. Request strings never name files: codes are
parsed into (codebook, group, code) and looked up among the cache's codebooks.
"""

from __future__ import annotations

import logging
import threading
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from starlette.exceptions import HTTPException

from codebook_lens import __version__
from codebook_lens.web.api import api_router
from codebook_lens.web.pages import make_templates, page_router
from codebook_lens.web.service import Browser, QueryError

HERE = Path(__file__).resolve().parent
log = logging.getLogger(__name__)
# Pages load only from this server; the inline SVG plot needs inline styles.
CSP = (
    "default-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
    "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)


def _warm(browser: Browser) -> None:
    try:
        browser.warm()
    except Exception:  # a failed warm-up only means the first request does the work
        log.exception("warming the code browser failed")


def validation_message(exc: RequestValidationError) -> str:
    """One line per invalid parameter, e.g. ``query limit: Input should be ... 100``."""
    parts = []
    for err in exc.errors():
        loc = [str(p) for p in err.get("loc", ())]
        where = f"{loc[0]} {'.'.join(loc[1:])}".strip() if loc else "request"
        parts.append(f"{where}: {err.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request"


def _install_error_handlers(app: FastAPI, templates: Jinja2Templates, browser: Browser) -> None:
    def respond(
        request: Request, status: int, message: str, headers: dict | None = None
    ) -> Response:
        if request.url.path.startswith("/api/"):
            return JSONResponse({"detail": message}, status_code=status, headers=headers)
        context = {"status": status, "message": message, "steering": browser.steering}
        return templates.TemplateResponse(
            request, "error.html", context, status_code=status, headers=headers
        )

    @app.exception_handler(QueryError)
    async def query_error(request: Request, exc: QueryError) -> Response:
        return respond(request, exc.status, exc.message)

    @app.exception_handler(ValueError)  # CacheError and SearchError are ValueErrors
    async def value_error(request: Request, exc: ValueError) -> Response:
        return respond(request, 400, str(exc))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> Response:
        return respond(request, 422, validation_message(exc))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> Response:
        message = exc.detail if isinstance(exc.detail, str) else "request failed"
        if exc.status_code == 404 and message == "Not Found":
            message = f"no page at {request.url.path}"
        return respond(request, exc.status_code, message, getattr(exc, "headers", None))


def create_app(
    cache_dir: str | Path,
    model_dir: str | Path | None = None,
    *,
    regex_time_budget: float = 5.0,
    warm: bool = False,
) -> FastAPI:
    """The code browser over the cache in ``cache_dir``.

    model_dir: a saved codebook model for topic search and steering (without it, topic
        search loads the model the cache was built from, when it can, and steering is off).
    regex_time_budget: seconds one regex search may take before it stops with a 400.
    warm: after start-up, read the token table and render the overview in the background.
    """
    browser = Browser(cache_dir, model_dir, regex_time_budget=regex_time_budget)
    templates = make_templates()

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        if warm:
            threading.Thread(target=_warm, args=(browser,), name="warm", daemon=True).start()
        yield

    app = FastAPI(
        title="codebook-lens code browser",
        description="Browse, search and steer the codes of a code cache.",
        version=__version__,
        docs_url=None,  # the interactive docs would load scripts from a CDN
        redoc_url=None,
        openapi_url="/openapi.json",
        lifespan=lifespan,
    )
    app.state.browser = browser

    @app.middleware("http")
    async def security_headers(request: Request, call_next) -> Response:
        response = await call_next(request)
        response.headers.setdefault("Content-Security-Policy", CSP)
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("Referrer-Policy", "same-origin")
        return response

    app.mount("/static", StaticFiles(directory=str(HERE / "static")), name="static")
    app.include_router(api_router(browser))
    app.include_router(page_router(browser, templates))
    _install_error_handlers(app, templates, browser)
    return app
