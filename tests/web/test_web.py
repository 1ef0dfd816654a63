"""The code browser's API and pages through FastAPI's TestClient, on a tiny cache: answers
equal the cache and search functions, paging, clear 4xx errors, bounded sizes, no file
access from request strings, topic search without a model, steering with one."""

from __future__ import annotations

import json
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import pytest
from fastapi.testclient import TestClient

from codebook_lens.analysis.search import (
    SearchError,
    logit_effect,
    regex_codes,
    similar_codes,
    topic_codes,
)
from codebook_lens.cache.store import CacheError, CodeCache, check_model_fits
from codebook_lens.core.loading import load_codebook_model
from codebook_lens.core.refs import CodeRef
from codebook_lens.steering.intervene import Intervention
from codebook_lens.steering.sampling import generate
from codebook_lens.web import create_app


@pytest.fixture(scope="module")
def cache(tiny_code_cache):
    return CodeCache.open(tiny_code_cache[1])


@pytest.fixture(scope="module")
def app(tiny_code_cache):
    return create_app(tiny_code_cache[1])


@pytest.fixture(scope="module")
def client(app):
    with TestClient(app) as c:
        yield c


@pytest.fixture(scope="module")
def model_client(tiny_code_cache):
    model_dir, cache_dir = tiny_code_cache
    with TestClient(create_app(cache_dir, model_dir)) as c:
        yield c


def busiest(cache: CodeCache, key: str = "layer0_mlp", group: int = 0) -> CodeRef:
    return CodeRef(key, int(cache.counts(key)[group].argmax()), group)


def without_seconds(data: dict) -> dict:
    return {k: v for k, v in data.items() if k != "seconds"}


def test_startup_reads_no_arrays(tiny_code_cache):
    app = create_app(tiny_code_cache[1])
    cache = app.state.browser.cache
    assert cache._arrays == {} and cache._columns == {} and cache._docs is None


def test_overview_matches_the_cache(client, cache):
    data = client.get("/api/overview").json()
    summary = cache.summary()
    assert data["num_tokens"] == cache.num_tokens and data["num_docs"] == cache.num_docs
    assert data["corpus"] == "web-test" and data["model"] == summary["model"]
    assert data["steering"] is False
    rows = {row["key"]: row for row in data["codebooks"]}
    assert list(rows) == list(cache.codebooks)
    for key, row in rows.items():
        assert row["dead_fraction"] == pytest.approx(summary["codebooks"][key]["dead_fraction"])
        assert row["active_codes"] == int((cache.counts(key) > 0).sum())
    page = client.get("/")
    assert page.status_code == 200 and "<svg" in page.text
    assert f"{cache.num_tokens:,}" in page.text
    browser = client.app.state.browser
    assert browser.frequency_svg() is browser.frequency_svg()  # rendered once


def test_code_json_equals_the_cache(client, cache):
    ref = busiest(cache)
    data = client.get(f"/api/codes/{ref}", params={"per_page": 5}).json()
    total, page = cache.top_contexts(ref, limit=5)
    assert data["code"] == str(ref) and data["count"] == total
    assert data["frequency"] == pytest.approx(total / cache.num_tokens)
    assert data["contexts"]["total"] == total
    assert data["contexts"]["contexts"] == [c.to_dict() for c in page]
    effect = logit_effect(cache, ref, 10)
    assert data["effect"]["promoted"] == effect["promoted"]
    assert data["effect"]["suppressed"] == effect["suppressed"]
    expected = similar_codes(cache, ref)
    assert [s["code"] for s in data["similar"]] == [str(r) for r, _ in expected]
    assert [s["cosine"] for s in data["similar"]] == pytest.approx([v for _, v in expected])
    # per-head codes: the group sits in the path
    head = busiest(cache, "layer1_attn_heads", 2)
    got = client.get(f"/api/codes/{head}/contexts", params={"limit": 3, "window": 2}).json()
    assert got["contexts"] == [c.to_dict() for c in cache.top_contexts(head, 3, 0, 2)[1]]


@pytest.mark.parametrize("order", ["rank", "corpus"])
def test_contexts_are_paged(client, cache, order):
    ref = busiest(cache)
    total = cache.occurrences(ref).size
    assert total > 7
    seen = []
    for offset in range(0, total, 4):
        data = client.get(
            f"/api/codes/{ref}/contexts", params={"offset": offset, "limit": 4, "order": order}
        ).json()
        assert data["total"] == total
        expected = cache.top_contexts(ref, 4, offset, 12, order)[1]
        assert data["contexts"] == [c.to_dict() for c in expected]
        seen += [c["position"] for c in data["contexts"]]
    assert sorted(seen) == cache.occurrences(ref).tolist()
    past = client.get(f"/api/codes/{ref}/contexts", params={"offset": total + 5}).json()
    assert past["contexts"] == []
    page2 = client.get(f"/api/codes/{ref}", params={"page": 2, "per_page": 3, "order": order})
    assert page2.json()["contexts"]["contexts"] == [
        c.to_dict() for c in cache.top_contexts(ref, 3, 3, 12, order)[1]
    ]


def test_code_page_highlights_the_firing_tokens(client, cache):
    ref = busiest(cache)
    html = client.get(f"/code/{ref}", params={"per_page": 3}).text
    _, page = cache.top_contexts(ref, limit=3)
    import html as htmllib

    for c in page:
        assert (
            f'<mark class="fire" title="token {c.position}">{htmllib.escape(c.token)}</mark>'
            in html
        )
    assert "page 1 of" in html and 'rel="next"' in html
    assert (
        client.get("/go", params={"code": str(ref)}, follow_redirects=False).headers["location"]
        == f"/code/{ref}"
    )


@pytest.mark.parametrize(
    "params",
    [
        {"pattern": r"\d{4}"},
        {"pattern": r"\b(January|May|June)\b", "sort": "recall", "limit": 5},
        {"pattern": "[aeiou]", "min_precision": 0.3, "min_recall": 0.05, "sort": "f1"},
        {"pattern": "e", "codebook": "layer1_attn_heads", "sort": "count", "min_count": 10},
    ],
)
def test_regex_results_equal_the_search_module(client, cache, params):
    data = client.get("/api/search/regex", params=params).json()
    kwargs = {k: v for k, v in params.items() if k not in ("pattern", "codebook")}
    kwargs.setdefault("limit", 50)
    if "codebook" in params:
        kwargs["codebooks"] = [params["codebook"]]
    expected = regex_codes(cache, params["pattern"], **kwargs).to_dict()
    assert without_seconds(data) == without_seconds(expected)
    assert data["codes"], "a pattern that finds no code tests nothing"
    page = client.get("/search/regex", params=params)
    assert page.status_code == 200
    for code in data["codes"]:
        assert f'href="/code/{code["code"]}"' in page.text


def test_bad_patterns_get_a_clear_400(client, tiny_code_cache):
    for pattern, message in [("(unclosed", "invalid pattern"), (r"(a)\1", "backreferences")]:
        r = client.get("/api/search/regex", params={"pattern": pattern})
        assert r.status_code == 400 and message in r.json()["detail"]
        page = client.get("/search/regex", params={"pattern": pattern})
        assert page.status_code == 400 and message in page.text and 'id="regex-form"' in page.text
    assert client.get("/api/search/regex", params={"pattern": ""}).status_code == 422
    long = client.get("/api/search/regex", params={"pattern": "a" * 1001})
    assert long.status_code == 422 and "1000" in long.json()["detail"]
    unknown = client.get("/api/search/regex", params={"pattern": "a", "codebook": "layer7_mlp"})
    assert unknown.status_code == 400 and "no codebook" in unknown.json()["detail"]
    # a search past its time budget stops with a message, not a hang or a 500
    with TestClient(create_app(tiny_code_cache[1], regex_time_budget=1e-9)) as slow:
        r = slow.get("/api/search/regex", params={"pattern": "."})
        assert r.status_code == 400 and "time budget" in r.json()["detail"]


def test_search_time_budget(cache):
    full = regex_codes(cache, "e").to_dict()
    assert without_seconds(regex_codes(cache, "e", time_budget=60).to_dict()) == without_seconds(
        full
    )
    with pytest.raises(SearchError, match="time budget"):
        regex_codes(cache, "e", time_budget=0)


def test_pages_escape_what_they_echo(client):
    r = client.get("/search/regex", params={"pattern": "<script>alert(1)</script>"})
    assert "<script>alert" not in r.text and "&lt;script&gt;alert(1)&lt;/script&gt;" in r.text
    r = client.get("/search/topic", params={"text": "</textarea><b>bold</b>"})
    assert "</textarea><b>" not in r.text
    assert "default-src 'self'" in r.headers["content-security-policy"]


def test_a_model_must_fit_the_cache(cache):
    empty = SimpleNamespace(model=SimpleNamespace(codebooks={}))
    with pytest.raises(CacheError, match="has no codebook"):
        check_model_fits(cache, empty)


def test_unknown_and_malformed_codes(client):
    r = client.get("/api/codes/layer0_mlp:99")
    assert r.status_code == 404 and "code 99 does not exist" in r.json()["detail"]
    assert client.get("/api/codes/layer9_mlp:1").status_code == 404
    assert client.get("/api/codes/layer1_attn_heads/9:1/contexts").status_code == 404
    r = client.get("/api/codes/not-a-code")
    assert r.status_code == 400 and "CODEBOOK:CODE" in r.json()["detail"]
    page = client.get("/code/layer0_mlp:99")
    assert page.status_code == 404 and "does not exist" in page.text


@pytest.mark.parametrize(
    "path",
    [
        "/api/codes/%2e%2e%2f%2e%2e%2fmanifest.json",
        "/api/codes/..%2F..%2F..%2Fetc%2Fpasswd",
        "/api/codes/layer0_mlp:1%2F..%2F..%2Fmanifest.json",
        "/api/codes/layer0_mlp%2F..%2Fcounts:1/contexts",
        "/api/codes/%2Fetc%2Fpasswd:1",
        "/code/..%2F..%2Fmanifest.json",
        "/code/layer0_mlp%00:1",
        "/static/..%2F..%2Fcache.py",
        "/static/%2e%2e/app.py",
    ],
)
def test_path_traversal_looking_codes_are_4xx(client, path):
    r = client.get(path)
    assert 400 <= r.status_code < 500
    assert "codebook-lens-cache" not in r.text and "import" not in r.text


@pytest.mark.parametrize(
    "query",
    [
        "limit=100000",
        "limit=0",
        "offset=-1",
        "offset=10000000000000",
        "window=1000",
        "order=random",
        "limit=abc",
    ],
)
def test_out_of_bounds_parameters_are_422(client, cache, query):
    r = client.get(f"/api/codes/{busiest(cache)}/contexts?{query}")
    assert r.status_code == 422
    assert r.json()["detail"].startswith("query ")


def test_page_sizes_are_bounded(client, cache):
    ref = busiest(cache)
    assert client.get(f"/api/codes/{ref}", params={"per_page": 101}).status_code == 422
    assert client.get(f"/code/{ref}", params={"per_page": 1000}).status_code == 422
    assert "per_page" in client.get(f"/code/{ref}", params={"per_page": 1000}).text
    r = client.get("/api/search/regex", params={"pattern": "e", "limit": 201})
    assert r.status_code == 422


def test_topic_search_equals_the_search_module(client, cache):
    text = "In March 1950, the old man paints a red apple."
    body = {"text": text, "min_fraction": 0.2, "max_frequency": 1.0, "limit": 20}
    data = client.post("/api/search/topic", json=body).json()
    expected = topic_codes(cache, text, min_fraction=0.2, max_frequency=1.0, limit=20)
    assert data["codes"] == [h.to_dict() for h in expected] and data["codes"]
    page = client.get("/search/topic", params={**body, "limit": 20})
    assert page.status_code == 200 and data["codes"][0]["code"] in page.text
    assert client.post("/api/search/topic", json={"text": ""}).status_code == 422
    assert client.post("/api/search/topic", json={"text": "a" * 4001}).status_code == 422
    assert client.post("/api/search/topic", json={"text": "a", "extra": 1}).status_code == 422
    bad = client.post("/api/search/topic", json={"text": "a", "min_fraction": 0})
    assert bad.status_code == 422 and "min_fraction" in bad.json()["detail"]


def test_topic_search_without_a_model_says_so(tiny_code_cache, tmp_path):
    moved = tmp_path / "cache"
    shutil.copytree(tiny_code_cache[1], moved)
    manifest = json.loads((moved / "manifest.json").read_text())
    manifest["model"] = str(tmp_path / "gone")
    (moved / "manifest.json").write_text(json.dumps(manifest))
    with TestClient(create_app(moved)) as c:
        r = c.post("/api/search/topic", json={"text": "In May 1999"})
        assert r.status_code == 409 and "could not be loaded" in r.json()["detail"]
        assert "--model" in r.json()["detail"]
        page = c.get("/search/topic", params={"text": "In May 1999"})
        assert page.status_code == 409 and "could not be loaded" in page.text
        assert c.get("/api/overview").status_code == 200  # the rest still works


def test_steering_needs_a_model(client):
    r = client.post("/api/steer", json={"prompt": "In May", "force": ["layer0_mlp:1"]})
    assert r.status_code == 404 and "--model" in r.json()["detail"]
    page = client.get("/steer")
    assert page.status_code == 404 and "--model" in page.text


def test_steer_equals_generate(model_client, tiny_code_cache):
    body = {
        "prompt": "In May 1999",
        "force": ["layer0_mlp:3", "layer1_attn_heads/2:1"],
        "mode": "append",
        "samples": 2,
        "max_new_tokens": 5,
        "seed": 7,
    }
    data = model_client.post("/api/steer", json=body).json()
    loaded = load_codebook_model(tiny_code_cache[0])
    options = {"samples": 2, "max_new_tokens": 5, "temperature": 1.0, "seed": 7}
    assert data["baseline"] == generate(loaded, body["prompt"], **options)[0]
    intervention = Intervention(body["force"], mode="append")
    assert (
        data["steered"] == generate(loaded, body["prompt"], intervention=intervention, **options)[0]
    )
    assert data["force"] == body["force"] and data["mode"] == "append"
    assert data["strength"] == 1.0
    strong = model_client.post("/api/steer", json={**body, "strength": 3.0}).json()
    scaled = Intervention(body["force"], mode="append", strength=3.0)
    assert strong["strength"] == 3.0
    assert strong["steered"] == generate(loaded, body["prompt"], intervention=scaled, **options)[0]
    assert model_client.get("/api/overview").json()["steering"] is True
    page = model_client.get(
        "/steer",
        params={
            "prompt": "In May 1999",
            "codes": "layer0_mlp:3, layer1_attn_heads/2:1",
            "mode": "append",
            "samples": 2,
            "max_new_tokens": 5,
            "seed": 7,
            "strength": 3.0,
        },
    )
    assert page.status_code == 200 and page.text.count('class="sample"') == 4
    assert "strength 3.0" in page.text
    import html as htmllib

    assert htmllib.escape(strong["steered"][0]) in page.text


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        ({"prompt": "x"}, 400, "at least one code"),
        ({"prompt": "x", "force": ["layer0_mlp:99"]}, 400, "does not exist"),
        ({"prompt": "x", "force": ["nonsense"]}, 400, "CODEBOOK:CODE"),
        ({"prompt": "x", "force": ["layer0_mlp:1", "layer0_mlp:2", "layer0_mlp:3"]}, 400, "k=2"),
        ({"prompt": "x", "force": ["layer0_mlp:1"], "disable": ["layer0_mlp:1"]}, 400, "both"),
        ({"prompt": "x " * 40, "force": ["layer0_mlp:1"], "max_new_tokens": 64}, 400, "positions"),
        ({"prompt": "x", "force": ["layer0_mlp:1"], "samples": 9}, 422, "samples"),
        ({"prompt": "x", "force": ["layer0_mlp:1"], "max_new_tokens": 65}, 422, "max_new_tokens"),
        ({"prompt": "x", "force": ["layer0_mlp:1"], "mode": "sideways"}, 422, "mode"),
        ({"prompt": "x", "force": ["layer0_mlp:1"] * 17}, 422, "force"),
        ({"prompt": "x", "force": ["layer0_mlp:1"], "strength": 101}, 422, "strength"),
    ],
)
def test_steer_rejects_bad_requests(model_client, body, status, message):
    r = model_client.post("/api/steer", json=body)
    assert r.status_code == status and message in r.json()["detail"]


def test_model_calls_are_serialised(model_client):
    """Topic searches and steering from several threads never run the model at once."""
    base = model_client.app.state.browser.loaded.model.model
    inside, most = 0, 0
    guard = threading.Lock()
    real = base.forward

    def counting_forward(*args, **kwargs):
        nonlocal inside, most
        with guard:
            inside += 1
            most = max(most, inside)
        try:
            return real(*args, **kwargs)
        finally:
            with guard:
                inside -= 1

    topic = {"text": "In May 1999 the cat", "min_fraction": 0.2, "max_frequency": 1.0}
    steer = {"prompt": "In May", "force": ["layer0_mlp:3"], "max_new_tokens": 3}

    def call(i: int):
        if i % 2:
            return model_client.post("/api/search/topic", json=topic)
        return model_client.post("/api/steer", json=steer)

    base.forward = counting_forward
    try:
        with ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(call, range(8)))
    finally:
        del base.forward
    assert {r.status_code for r in answers} == {200}
    assert len({json.dumps(r.json()) for r in answers[1::2]}) == 1
    assert len({json.dumps(r.json()) for r in answers[0::2]}) == 1
    assert most == 1


def test_openapi_schema_lists_the_api_and_no_cdn_docs(client):
    schema = client.get("/openapi.json").json()
    for path in (
        "/api/overview",
        "/api/codes/{code}",
        "/api/codes/{code}/contexts",
        "/api/search/regex",
        "/api/search/topic",
        "/api/steer",
    ):
        assert path in schema["paths"]
    limit = next(
        p
        for p in schema["paths"]["/api/codes/{code}/contexts"]["get"]["parameters"]
        if p["name"] == "limit"
    )
    assert limit["schema"]["maximum"] == 100
    assert client.get("/docs").status_code == 404


def test_cli_serve_reports_a_missing_cache(tmp_path, capsys):
    from codebook_lens.cli.main import build_parser, main

    args = build_parser().parse_args(["serve", str(tmp_path)])
    assert args.host == "127.0.0.1" and args.model is None
    assert main(["serve", str(tmp_path / "nothing")]) == 2
    assert "not a code cache" in capsys.readouterr().err
