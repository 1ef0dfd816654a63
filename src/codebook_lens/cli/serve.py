"""``codebook serve``: the code browser over a code cache."""

from __future__ import annotations

import argparse
import sys

from codebook_lens.cli.args import port, positive_float


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from codebook_lens.web.app import LOCAL_HOSTS, create_app

    app = create_app(
        args.cache_dir,
        args.model,
        regex_time_budget=args.regex_budget,
        warm=True,
        bind_host=args.host,
    )
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
        help="the saved codebook model the cache was built with (its code vectors are checked): "
        "enables steering and is used for topic search (default: the model the cache was built "
        "from, for topic search)",
    )
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to bind (default 127.0.0.1; on a loopback address only requests for "
        "localhost names are answered)",
    )
    p.add_argument("--port", type=port, default=8000, help="port (default 8000)")
    p.add_argument(
        "--regex-budget",
        type=positive_float,
        default=5.0,
        metavar="SECONDS",
        help="time one regex search may take (default 5)",
    )
    p.add_argument(
        "--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"]
    )
    p.set_defaults(func=_serve)
