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


def _fsm(args: argparse.Namespace) -> int:
    from .config import ConfigError
    from .tokfsm import load_fsm_config, run

    try:
        cfg = load_fsm_config(args.preset, args.overrides)
    except (ConfigError, ValueError) as err:
        print(f"codebook fsm: {err}", file=sys.stderr)
        return 2
    out = args.out or f"runs/tokfsm-{args.preset}"
    metrics = run(cfg, out)
    _print_fsm_summary(metrics, out)
    return 0


def _demo(args: argparse.Namespace) -> int:
    from .tokfsm import load_fsm_config, run

    cfg = load_fsm_config("demo", args.overrides)
    print(
        "codebook demo: the TokFSM experiment on a short budget. It trains a 4-layer GPT-NeoX "
        "on walks of a 100-state machine, then a copy with a codebook on every attention head "
        "and MLP (k = 1), and measures what the codes learned.",
        flush=True,
    )
    metrics = run(cfg, args.out)
    _print_fsm_summary(metrics, args.out)
    return 0


def _print_fsm_summary(m: dict, out: str) -> None:
    from pathlib import Path

    def pct(key: str) -> str:
        return f"{100 * m[key]:6.2f}%"

    rows = [
        ("", "base", "codebook"),
        ("LM loss", f"{m['base.lm_loss']:.3f}", f"{m['codebook.lm_loss']:.3f}"),
        (
            "next-token accuracy",
            pct("base.next_token_accuracy"),
            pct("codebook.next_token_accuracy"),
        ),
        ("state accuracy", pct("base.state_accuracy"), pct("codebook.state_accuracy")),
        (
            "valid mass (forced)",
            pct("base.valid_transition_mass"),
            pct("codebook.valid_transition_mass"),
        ),
    ]
    print()
    for a, b, c in rows:
        print(f"  {a:<22}{b:>10}{c:>12}")
    purity = [v for k, v in m.items() if k.startswith("purity.mlp.")]
    if purity:
        print(f"  {'MLP code purity':<22}{'':>10}{100 * sum(purity) / len(purity):11.1f}%")
    print(
        f"  {'state precision':<22}{'neuron ' + pct('neuron_precision').strip():>10}"
        f"{'code ' + pct('code_precision').strip():>12}"
    )
    if "jsd.all" in m:
        print(f"  {'JSD after swap (all)':<22}{'':>10}{m['jsd.all']:12.3f}  (none = 1)")
    minutes = sum(v for k, v in m.items() if k.startswith("seconds.")) / 60
    print(f"\n  {minutes:.1f} min; report: {Path(out, 'report.html').resolve()}")


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
    p = sub.add_parser(
        "fsm", help="the TokFSM experiment: train base and codebook models, analyse, report"
    )
    p.add_argument(
        "--preset", default="cpu", help="cpu (default, about an hour here), demo, paper (GPU)"
    )
    p.add_argument("--out", default=None, help="run directory (default runs/tokfsm-PRESET)")
    p.add_argument(
        "overrides", nargs="*", metavar="key=value", help="e.g. base.steps=500 codebook.k=4"
    )
    p.set_defaults(func=_fsm)
    p = sub.add_parser("demo", help="the main job: TokFSM end to end on a short budget")
    p.add_argument("--out", default="runs/demo", help="run directory (default runs/demo)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help=argparse.SUPPRESS)
    p.set_defaults(func=_demo)
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
