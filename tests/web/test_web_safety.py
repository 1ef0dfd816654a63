"""Attacks on the code browser, each written as the attack: a bug in a handler must read
as a 500 (logged, with the security headers), not as the user's mistake; a 100 MB body
must be refused before it is read; a page on another site must not reach a loopback
server through DNS rebinding; a damaged cache must give a 4xx page or JSON, with the
security headers, not a plain-text 500."""

from __future__ import annotations

import logging
import shutil

import pytest
from fastapi.testclient import TestClient

from codebook_lens.core.errors import CodebookLensError
from codebook_lens.web import create_app
from codebook_lens.web.app import MAX_BODY_BYTES


@pytest.fixture
def app(tiny_code_cache):
    return create_app(tiny_code_cache[1])


def secured(response) -> bool:
    headers = response.headers
    return (
        "default-src 'self'" in headers.get("content-security-policy", "")
        and headers.get("x-content-type-options") == "nosniff"
    )


@pytest.mark.parametrize("bug", [ValueError("a bug, not the user's mistake"), KeyError("x")])
def test_a_bug_in_a_handler_is_a_logged_500_with_the_security_headers(app, caplog, bug):
    def broken(*args, **kwargs):
        raise bug

    app.state.browser.overview = broken
    with TestClient(app, raise_server_exceptions=False) as client:
        with caplog.at_level(logging.ERROR, logger="codebook_lens.web.app"):
            api = client.get("/api/overview")
        page = client.get("/")
    assert api.status_code == 500 and secured(api)
    assert api.json() == {"detail": "internal error; the server log has details"}
    assert page.status_code == 500 and secured(page) and "Error 500" in page.text
    assert "a bug" not in page.text  # no internals shown
    assert any(r.exc_info and r.exc_info[0] is type(bug) for r in caplog.records)

    # the same place raising a user's mistake is a 400 that says what is wrong
    def refuse(*args, **kwargs):
        raise CodebookLensError("the corpus of this cache is gone")

    app.state.browser.overview = refuse
    with TestClient(app, raise_server_exceptions=False) as client:
        api = client.get("/api/overview")
    assert api.status_code == 400 and secured(api)
    assert api.json() == {"detail": "the corpus of this cache is gone"}


def test_a_huge_body_is_refused_before_it_is_read(app):
    huge = b'{"text": "' + b"a" * (MAX_BODY_BYTES + 1) + b'"}'
    with TestClient(app) as client:
        declared = client.post(
            "/api/search/topic", content=huge, headers={"content-type": "application/json"}
        )

        def chunks():  # no Content-Length: the body arrives in pieces
            for i in range(0, len(huge), 65536):
                yield huge[i : i + 65536]

        streamed = client.post(
            "/api/search/topic", content=chunks(), headers={"content-type": "application/json"}
        )
        small = client.post("/api/search/topic", json={"text": "a" * 4001})
    for response in (declared, streamed):
        assert response.status_code == 413 and secured(response)
        assert "larger than" in response.json()["detail"]
    assert small.status_code == 422  # a body under the limit is read and validated


def test_a_loopback_server_answers_only_loopback_host_names(tiny_code_cache):
    app = create_app(tiny_code_cache[1], bind_host="127.0.0.1")
    with TestClient(app, base_url="http://127.0.0.1:8000") as client:
        assert client.get("/api/health").status_code == 200
        for host in ("localhost:8000", "[::1]:8000", "LOCALHOST"):
            assert client.get("/api/health", headers={"host": host}).status_code == 200
        for host in ("evil.example", "evil.example:8000", "127.0.0.1.evil.example", ""):
            rebound = client.get("/api/health", headers={"host": host})
            assert rebound.status_code == 400 and secured(rebound), host
            assert "answers requests for" in rebound.json()["detail"]
        page = client.get("/", headers={"host": "evil.example"})
        assert page.status_code == 400 and "Error 400" in page.text
    # bound to every address, the operator chose to be reached by any name
    anywhere = create_app(tiny_code_cache[1], bind_host="0.0.0.0")
    with TestClient(anywhere) as client:
        assert client.get("/api/health", headers={"host": "box.lan"}).status_code == 200


def test_a_damaged_cache_gives_4xx_pages_with_the_security_headers(tiny_code_cache, tmp_path):
    cache_dir = tmp_path / "cache"
    shutil.copytree(tiny_code_cache[1], cache_dir)
    effects = cache_dir / "effects" / "layer0_mlp.npz"
    effects.write_bytes(effects.read_bytes()[:200])
    (cache_dir / "codebooks.safetensors").write_bytes(b"\x00" * 9)
    with TestClient(create_app(cache_dir), raise_server_exceptions=False) as client:
        api = client.get("/api/codes/layer0_mlp:1")
        page = client.get("/code/layer0_mlp:1")
    assert api.status_code == 400 and secured(api)
    assert "cannot be read" in api.json()["detail"]
    assert page.status_code == 400 and secured(page) and "cannot be read" in page.text
