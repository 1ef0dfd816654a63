"""End to end in a real browser: Playwright drives Debian's headless Chromium against the
code browser served by uvicorn on a free port of 127.0.0.1."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
if not CHROMIUM.exists():
    pytest.skip(
        f"the browser tests need Debian's chromium at {CHROMIUM} (make test installs it)",
        allow_module_level=True,
    )
pytest.importorskip("uvicorn")
sync_api = pytest.importorskip("playwright.sync_api")

from codebook_lens.cache.store import CodeCache  # noqa: E402
from codebook_lens.core.refs import CodeRef  # noqa: E402
from codebook_lens.web import create_app  # noqa: E402

# Chromium as root in a container, with nothing reaching out to the network on its own.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-quic",
    "--no-first-run",
]


class LiveServer:
    """uvicorn serving an app in a thread, on a port the OS picked on 127.0.0.1."""

    def __init__(self, app) -> None:
        import uvicorn

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True
        )

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()


@pytest.fixture(scope="module")
def server(tiny_code_cache):
    model_dir, cache_dir = tiny_code_cache
    with LiveServer(create_app(cache_dir, model_dir)) as live:
        yield live


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as pw:
        chromium = pw.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS
        )
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser, server):
    context = browser.new_context(base_url=server.url)
    page = context.new_page()
    page.set_default_timeout(15_000)
    outside, errors = [], []
    page.on(
        "request",
        lambda r: outside.append(r.url) if not r.url.startswith(server.url) else None,
    )
    # console errors: scripts that fail, or anything the content security policy blocks
    page.on(
        "console",
        lambda m: (
            errors.append(m.text)
            if m.type == "error" and not m.text.startswith("Failed to load resource")
            else None
        ),
    )
    page.on("pageerror", lambda err: errors.append(str(err)))
    yield page
    context.close()
    assert outside == [], f"the pages asked for something off the server: {outside}"
    assert errors == [], f"the pages logged {len(errors)} errors, first: {errors[:2]}"


def test_regex_search_to_a_code_page(page, server, tiny_code_cache):
    cache = CodeCache.open(tiny_code_cache[1])
    page.goto("/")
    assert page.locator("h1").inner_text() == "Code cache"
    assert page.locator("#num-tokens").inner_text() == f"{cache.num_tokens:,}"
    assert page.locator("#codebooks tbody tr").count() == len(cache.codebooks)
    assert page.locator("figure.plot svg").count() == 1

    page.get_by_role("link", name="Regex search").click()
    page.wait_for_url("**/search/regex")
    page.fill("#pattern", r"\d{4}")
    page.select_option("select[name=sort]", "recall")
    page.click("#search")
    page.wait_for_selector("#results")
    assert "sort=recall" in page.url
    assert "matching tokens" in page.locator("#summary").inner_text()

    first = page.locator("#results a.code-link").first
    code = first.inner_text()
    first.click()
    page.wait_for_url(f"**/code/{code}")
    assert page.locator("#code-name").inner_text() == code

    ref = CodeRef.parse(code)
    total, contexts = cache.top_contexts(ref, limit=20)
    assert f"{total:,}" in page.locator("#frequency").inner_text()
    marks = page.locator("#contexts mark.fire")
    assert marks.count() == len(contexts) > 0
    for i, ctx in enumerate(contexts):
        assert marks.nth(i).text_content() == ctx.token
    row = page.locator("#contexts tbody tr td.ctx").first
    assert row.text_content() == contexts[0].left + contexts[0].token + contexts[0].right
    background = marks.first.evaluate("el => getComputedStyle(el).backgroundColor")
    assert background not in ("rgba(0, 0, 0, 0)", "transparent")

    if page.locator("#similar a").count():
        other = page.locator("#similar a").first.inner_text()
        page.locator("#similar a").first.click()
        page.wait_for_url(f"**/code/{other}")
        assert page.locator("#code-name").inner_text() == other


def test_paging_and_the_code_box(page, tiny_code_cache):
    cache = CodeCache.open(tiny_code_cache[1])
    ref = CodeRef("layer0_mlp", int(cache.counts("layer0_mlp")[0].argmax()))
    page.goto("/")
    page.fill("nav input[name=code]", str(ref))
    page.press("nav input[name=code]", "Enter")
    page.wait_for_url(f"**/code/{ref}")
    page.goto(f"/code/{ref}?per_page=5")
    page.click("a[rel=next]")
    page.wait_for_url("**page=2**")
    _, second = cache.top_contexts(ref, limit=5, offset=5)
    marks = page.locator("#contexts mark.fire")
    assert [marks.nth(i).text_content() for i in range(marks.count())] == [c.token for c in second]


def test_errors_are_shown_on_the_page(page):
    page.goto("/search/regex")
    page.fill("#pattern", "(unclosed")
    page.click("#search")
    page.wait_for_selector("#error")
    assert "invalid pattern" in page.locator("#error").inner_text()
    response = page.goto("/code/layer0_mlp:999")
    assert response.status == 404
    assert "does not exist" in page.locator("#error").inner_text()


def test_steering_side_by_side(page):
    page.goto("/steer?codes=layer0_mlp:3")
    page.fill("textarea[name=prompt]", "In May 1999")
    page.fill("input[name=max_new_tokens]", "4")
    page.click("#steer-form button[type=submit]")
    page.wait_for_selector("#samples")
    assert page.locator("#samples tbody tr").count() == 2
