"""The ``codebook`` command."""

from __future__ import annotations

import argparse
import json
import sys


def _selfcheck(args: argparse.Namespace) -> int:
    from .selfcheck import run

    return 0 if run() else 1


def _train(args: argparse.Namespace) -> int:
    from .config import ConfigError, load_train_config
    from .train import TrainError, train

    try:
        cfg = load_train_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"codebook train: {err}", file=sys.stderr)
        return 2
    try:
        result = train(cfg, resume=args.resume)
    except TrainError as err:
        print(f"codebook train: {err}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="codebook",
        description="Codebook features: train, read, search and steer sparse discrete codes "
        "in transformer language models.",
    )
    from . import __version__

    parser.add_argument("--version", action="version", version=f"codebook-lens {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    p = sub.add_parser("selfcheck", help="check the installation on tiny models of every family")
    p.set_defaults(func=_selfcheck)
    p = sub.add_parser("train", help="finetune a causal LM with codebooks from a YAML config")
    p.add_argument("config", help="YAML config (see configs/)")
    p.add_argument(
        "overrides", nargs="*", metavar="key=value", help="override config keys, e.g. optim.lr=3e-4"
    )
    p.add_argument(
        "--resume", action="store_true", help="continue from the last checkpoint in output_dir"
    )
    p.set_defaults(func=_train)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, KeyError) as err:
        print(f"codebook: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
