"""Load on the code browser: concurrent clients on loopback against a real server.

Starts ``codebook serve CACHE_DIR`` on a free port of 127.0.0.1, opens one page of each
kind once (the cold requests, reported apart), then runs ``--clients`` threads that
share a bounded number of requests (and a time limit):

    code       the code page (HTML) of a random live code
    contexts   /api/codes/CODE/contexts?limit=20 of a random live code
    regex      /api/search/regex for a few realistic patterns

and prints p50/p95/p99 latency per kind, the 4xx and 5xx counts and the throughput.
Targets on a 1M-token cache: p95 < 100 ms for code pages, < 1 s for regex search.

    python benchmarks/load_web.py runs/cache-smollm2-1m
    python benchmarks/load_web.py runs/cache-small --build-from MODEL_DIR --max-tokens 100000

Exits 1 when any answer was a server error.
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import quote

import numpy as np
from cache_queries import FSM_PATTERNS, TEXT_PATTERNS

from codebook_lens.cache.store import CodeCache
from codebook_lens.core.refs import CodeRef

KINDS = ("code", "contexts", "regex")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def live_codes(cache: CodeCache, count: int, rng: np.random.Generator) -> list[str]:
    """``count`` random codes that fire at least once, from every codebook."""
    pool = []
    for key in cache.codebooks:
        groups, codes = np.nonzero(cache.counts(key))
        pool += [str(CodeRef(key, int(c), int(g))) for g, c in zip(groups, codes, strict=True)]
    if not pool:
        raise SystemExit(f"{cache.path} has no live code")
    return [pool[i] for i in rng.integers(len(pool), size=count)]


def build(cache_dir: Path, model_dir: str, max_tokens: int, corpus: str) -> None:
    from codebook_lens.cache.build import build_cache, corpus_documents
    from codebook_lens.core.loading import load_codebook_model

    loaded = load_codebook_model(model_dir)
    texts = corpus_documents(corpus, loaded, "train", max_tokens, 128)
    build_cache(loaded, texts, cache_dir, corpus_name=corpus, max_tokens=max_tokens)


class Server:
    """``codebook serve`` in a subprocess, stopped on exit."""

    def __init__(self, cache_dir: Path, port: int, regex_budget: float) -> None:
        self.url = f"http://127.0.0.1:{port}"
        self.command = [
            sys.executable,
            "-m",
            "codebook_lens.cli.main",
            "serve",
            str(cache_dir),
            "--port",
            str(port),
            "--regex-budget",
            str(regex_budget),
            "--log-level",
            "warning",
        ]
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> Server:
        import httpx

        t0 = time.perf_counter()
        self.proc = subprocess.Popen(self.command)
        while True:
            if self.proc.poll() is not None:
                raise SystemExit(f"the server exited with {self.proc.returncode}")
            try:
                if httpx.get(self.url + "/api/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.perf_counter() - t0 > 120:
                raise SystemExit("the server did not answer within 120 s")
            time.sleep(0.1)
        self.startup_s = time.perf_counter() - t0
        return self

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def plan_requests(
    total: int, codes: list[str], patterns: list[str], regex_share: float, rng
) -> list[tuple[str, str]]:
    out = []
    for i in range(total):
        u = rng.random()
        code = quote(codes[i % len(codes)], safe="/:")
        if u < regex_share:
            pattern = patterns[int(rng.integers(len(patterns)))]
            out.append(("regex", f"/api/search/regex?pattern={quote(pattern)}&limit=20"))
        elif u < regex_share + (1 - regex_share) * 0.6:
            out.append(("code", f"/code/{code}"))
        else:
            out.append(("contexts", f"/api/codes/{code}/contexts?limit=20"))
    return out


def run_load(
    url: str, requests: list[tuple[str, str]], clients: int, max_seconds: float
) -> tuple[dict, float]:
    import httpx

    lock = threading.Lock()
    queue = list(reversed(requests))
    results: dict[str, dict] = {
        k: {"latencies": [], "4xx": 0, "5xx": 0, "failed": 0} for k in KINDS
    }
    deadline = time.perf_counter() + max_seconds

    def worker() -> None:
        with httpx.Client(base_url=url, timeout=60) as client:
            while time.perf_counter() < deadline:
                with lock:
                    if not queue:
                        return
                    kind, path = queue.pop()
                t0 = time.perf_counter()
                try:
                    status = client.get(path).status_code
                except httpx.HTTPError:
                    status = None
                elapsed = time.perf_counter() - t0
                with lock:
                    r = results[kind]
                    if status is None:
                        r["failed"] += 1
                        continue
                    r["latencies"].append(elapsed)
                    if 400 <= status < 500:
                        r["4xx"] += 1
                    elif status >= 500:
                        r["5xx"] += 1

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results, time.perf_counter() - t0


def summarize(results: dict) -> dict:
    out = {}
    for kind, r in results.items():
        lat = np.asarray(r["latencies"]) * 1000
        out[kind] = {
            "requests": int(lat.size),
            **{
                f"p{q}_ms": float(np.percentile(lat, q)) if lat.size else None for q in (50, 95, 99)
            },
            "max_ms": float(lat.max()) if lat.size else None,
            "4xx": r["4xx"],
            "5xx": r["5xx"],
            "failed": r["failed"],
        }
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cache_dir", help="a code cache (built first with --build-from)")
    parser.add_argument("--build-from", metavar="MODEL_DIR", help="build the cache if missing")
    parser.add_argument("--max-tokens", type=int, default=1_000_000, help="with --build-from")
    parser.add_argument("--corpus", default="offline", help="with --build-from")
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--requests", type=int, default=2000, help="requests in all")
    parser.add_argument("--regex-share", type=float, default=0.1, help="share of regex searches")
    parser.add_argument("--max-seconds", type=float, default=300, help="stop the load after this")
    parser.add_argument("--regex-budget", type=float, default=5.0, help="the server's, seconds")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", metavar="FILE", help="also write the results here")
    args = parser.parse_args()
    if not 1 <= args.clients <= 256 or not 1 <= args.requests <= 1_000_000:
        parser.error("--clients must be in 1..256 and --requests in 1..1000000")
    if not 0 <= args.regex_share <= 1:
        parser.error("--regex-share must be in [0, 1]")

    cache_dir = Path(args.cache_dir)
    if not cache_dir.exists():
        if not args.build_from:
            parser.error(f"{cache_dir} does not exist; give --build-from MODEL_DIR to build it")
        build(cache_dir, args.build_from, args.max_tokens, args.corpus)
    cache = CodeCache.open(cache_dir)
    rng = np.random.default_rng(args.seed)
    codes = live_codes(cache, 500, rng)
    patterns = FSM_PATTERNS if cache.manifest.get("model_kind") == "tokfsm" else TEXT_PATTERNS
    requests = plan_requests(args.requests, codes, patterns, args.regex_share, rng)

    with Server(cache_dir, free_port(), args.regex_budget) as server:
        import httpx

        cold = {}
        with httpx.Client(base_url=server.url, timeout=120) as client:
            for kind, path in [("overview", "/"), *[(k, p) for k, p in requests if k in KINDS]]:
                if kind in cold:
                    continue
                t0 = time.perf_counter()
                client.get(path)
                cold[kind] = (time.perf_counter() - t0) * 1000
                if len(cold) == len(KINDS) + 1:
                    break
        results, seconds = run_load(server.url, requests, args.clients, args.max_seconds)
        startup = server.startup_s

    summary = summarize(results)
    done = sum(s["requests"] for s in summary.values())
    server_errors = sum(s["5xx"] for s in summary.values())
    print(
        f"{cache.num_tokens:,} tokens; server up in {startup:.1f} s; {args.clients} clients, "
        f"{done} requests in {seconds:.1f} s ({done / max(seconds, 1e-9):.0f}/s)"
    )
    print("cold (first request, ms): " + ", ".join(f"{k} {v:.0f}" for k, v in cold.items()))
    print(f"  {'kind':<10}{'n':>7}{'p50 ms':>10}{'p95 ms':>10}{'p99 ms':>10}{'4xx':>6}{'5xx':>6}")
    for kind, s in summary.items():
        if not s["requests"]:
            continue
        print(
            f"  {kind:<10}{s['requests']:>7}{s['p50_ms']:>10.1f}{s['p95_ms']:>10.1f}"
            f"{s['p99_ms']:>10.1f}{s['4xx']:>6}{s['5xx']:>6}"
        )
    print(f"server errors (5xx): {server_errors}")
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "cache": str(cache_dir),
                    "tokens": cache.num_tokens,
                    "clients": args.clients,
                    "startup_s": startup,
                    "seconds": seconds,
                    "cold_ms": cold,
                    "kinds": summary,
                    "server_errors": server_errors,
                },
                indent=2,
            )
        )
    return 1 if server_errors else 0


if __name__ == "__main__":
    sys.exit(main())
