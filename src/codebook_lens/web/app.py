"""The code browser: a FastAPI app over one code cache, with HTML pages and a JSON API.

``create_app(cache_dir, model_dir=None)`` opens the cache (memory-mapped; nothing is
read up front) and, with ``model_dir``, loads a model for topic search and steering.
Request strings never name files: codes are parsed into (codebook, group, code) and
looked up among the cache's codebooks.

Every answer, errors included, carries the security headers (CSP, nosniff, referrer
policy); errors are a JSON ``{"detail": ...}`` under ``/api`` and an HTML page
elsewhere. Statuses: 4xx for a user's mistake only (a
:class:`~codebook_lens.core.errors.CodebookLensError`, or a request that fails the
browser's own validation: 400, 404, 409, 413 for a body over :data:`MAX_BODY_BYTES`,
422 for out-of-range parameters); anything else is a bug, logged with its traceback
and answered 500 without details. Bound to a loopback address, the app answers only
requests whose ``Host`` names a loopback address (a page on another site cannot reach
it through DNS rebinding).
"""

from __future__ import annotations

import logging
import threading
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from codebook_lens import __version__
from codebook_lens.core.errors import CodebookLensError
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
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
# the largest request body read: a topic text or a steering request with every field at
# its maximum, each character escaped in JSON (\uXXXX\uXXXX), fits in well under this
MAX_BODY_BYTES = 256 << 10


class BodyLimit:
    """ASGI middleware: a request body over ``limit`` bytes is refused (413) as soon as
    its declared length or the bytes received so far exceed it, before it is read whole."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length", b"")
        too_large = HTTPException(
            413, f"the request body is larger than {self.limit:,} bytes; send less"
        )
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            if declared.isdigit() and int(declared) > self.limit:
                raise too_large
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise too_large
            return message

        await self.app(scope, limited, send)


def host_name(header: str) -> str:
    """The host of a ``Host`` header, without port or IPv6 brackets, lowercase."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:].split("]", 1)[0]
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


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


def _install_error_handlers(app: FastAPI, templates: Jinja2Templates, browser: Browser):
    """Answer errors as JSON under /api and as a page elsewhere; returns the responder."""

    def respond(
        request: Request, status: int, message: str, headers: dict | None = None
    ) -> Response:
        if request.url.path.startswith("/api/"):
            return JSONResponse({"detail": message}, status_code=status, headers=headers)
        context = {"status": status, "message": message, "steering": browser.steering}
        return templates.TemplateResponse(
            request, "error.html", context, status_code=status, headers=headers
        )

    @app.exception_handler(CodebookLensError)  # a QueryError carries its own status
    async def user_error(request: Request, exc: CodebookLensError) -> Response:
        return respond(request, exc.status if isinstance(exc, QueryError) else 400, str(exc))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> Response:
        return respond(request, 422, validation_message(exc))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        message = exc.detail if isinstance(exc.detail, str) else "request failed"
        if exc.status_code == 404 and message == "Not Found":
            message = f"no page at {request.url.path}"
        return respond(request, exc.status_code, message, getattr(exc, "headers", None))

    return respond


def create_app(
    cache_dir: str | Path,
    model_dir: str | Path | None = None,
    *,
    regex_time_budget: float = 5.0,
    warm: bool = False,
    bind_host: str | None = None,
) -> FastAPI:
    """The code browser over the cache in ``cache_dir``.

    model_dir: a saved codebook model for topic search and steering (without it, topic
        search loads the model the cache was built from, when it can, and steering is off).
    regex_time_budget: seconds one regex search may take before it stops with a 400.
    warm: after start-up, read the token table and render the overview in the background.
    bind_host: the address the server listens on; a loopback one (``127.0.0.1``,
        ``localhost``, ``::1``) turns on the Host check, so that only requests addressed
        to a loopback name are answered.
    """
    allowed_hosts = set(LOCAL_HOSTS) if bind_host in LOCAL_HOSTS else None
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
    respond = _install_error_handlers(app, templates, browser)
    app.add_middleware(BodyLimit, limit=MAX_BODY_BYTES)

    @app.middleware("http")
    async def guard(request: Request, call_next) -> Response:
        """The Host check, the 500 answer to any unexpected error, the security headers."""
        host = host_name(request.headers.get("host", ""))
        if allowed_hosts is not None and host not in allowed_hosts:
            response = respond(
                request,
                400,
                f"this server answers requests for {', '.join(LOCAL_HOSTS)} only, "
                f"not for host {host!r}",
            )
        else:
            try:
                response = await call_next(request)
            except Exception:
                log.exception("error answering %s %s", request.method, request.url.path)
                response = respond(request, 500, "internal error; the server log has details")
        response.headers.setdefault("Content-Security-Policy", CSP)
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("Referrer-Policy", "same-origin")
        return response

    app.mount("/static", StaticFiles(directory=str(HERE / "static")), name="static")
    app.include_router(api_router(browser))
    app.include_router(page_router(browser, templates))
    return app
