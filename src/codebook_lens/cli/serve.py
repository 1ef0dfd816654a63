"""``codebook serve``: the code browser over a code cache."""

from __future__ import annotations

import argparse
import sys

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


def _serve(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from codebook_lens.web import create_app
    except ImportError as err:
        print(
            f"codebook serve: the code browser needs fastapi, uvicorn and jinja2 ({err})",
            file=sys.stderr,
        )
        return 2
    if args.port < 0 or args.port > 65535:
        print(f"codebook serve: --port must be in 0..65535, got {args.port}", file=sys.stderr)
        return 2
    if args.regex_budget <= 0:
        print(
            f"codebook serve: --regex-budget must be positive, got {args.regex_budget}",
            file=sys.stderr,
        )
        return 2
    app = create_app(args.cache_dir, args.model, regex_time_budget=args.regex_budget, warm=True)
    if args.host not in LOCAL_HOSTS:
        print(
            f"codebook serve: listening on {args.host}, reachable from other machines; "
            "the browser has no authentication",
            file=sys.stderr,
        )
    host = f"[{args.host}]" if ":" in args.host else args.host
    print(f"code browser for {args.cache_dir} at http://{host}:{args.port}/", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("serve", help="browse, search and steer the codes of a cache in a browser")
    p.add_argument("cache_dir", metavar="CACHE_DIR", help="a code cache (codebook cache --out)")
    p.add_argument(
        "--model",
        metavar="MODEL_DIR",
        default=None,
        help="a saved codebook model with the cache's codebooks: enables steering and is "
        "used for topic search (default: the model the cache was built from, for topic search)",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument(
        "--regex-budget",
        type=float,
        default=5.0,
        metavar="SECONDS",
        help="time one regex search may take (default 5)",
    )
    p.add_argument(
        "--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"]
    )
    p.set_defaults(func=_serve)
