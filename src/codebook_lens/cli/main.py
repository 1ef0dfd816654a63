"""The ``codebook`` command.

One error style for every command: a user's mistake (a
:class:`~codebook_lens.core.errors.CodebookLensError`, which every error class of the
project subclasses) is printed as one line, ``codebook: error: MESSAGE``, with exit
status 2; a bad flag value is refused by argparse, also with status 2; anything else is
a bug and shows its traceback. Command modules are imported lazily, so that
``codebook --help`` does not load PyTorch.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from codebook_lens.cli.args import (
    error,
    finite_float,
    nonneg_float,
    nonneg_int,
    open_fraction,
    positive_int,
    print_json,
)
from codebook_lens.core.cpu import describe_cpu
from codebook_lens.core.errors import CodebookLensError
from codebook_lens.core.files import check_output_dir, check_output_file


def _selfcheck(args: argparse.Namespace) -> int:
    from codebook_lens.core.selfcheck import run

    return 0 if run() else 1


def _train(args: argparse.Namespace) -> int:
    from codebook_lens.training.config import load_train_config
    from codebook_lens.training.loop import train

    cfg = load_train_config(args.config, args.overrides)
    print_json(train(cfg, resume=args.resume))
    return 0


def _fsm(args: argparse.Namespace) -> int:
    from codebook_lens.experiments.tokfsm.run import load_fsm_config, run

    started = time.perf_counter()
    cfg = load_fsm_config(args.preset, args.overrides)
    out = check_output_dir(args.out or f"runs/tokfsm-{args.preset}", "--out directory")
    metrics = run(cfg, out)
    _print_fsm_summary(metrics, out, time.perf_counter() - started)
    return 0


def _demo(args: argparse.Namespace) -> int:
    if args.overrides[:1] == ["lm"]:  # codebook demo lm: the natural-language experiment
        from codebook_lens.cli.lm import demo_lm

        return demo_lm(args.out or "runs/demo-lm", args.overrides[1:])
    from codebook_lens.experiments.tokfsm.run import load_fsm_config, run

    started = time.perf_counter()
    args.out = args.out or "runs/demo"
    cfg = load_fsm_config("demo", args.overrides)
    check_output_dir(args.out, "--out directory")
    print(
        "codebook demo: the TokFSM experiment on a short budget. It trains a 4-layer GPT-NeoX "
        "on walks of a 100-state machine, then a copy with a codebook on every attention head "
        "and MLP (k = 1), and measures what the codes learned.",
        flush=True,
    )
    metrics = run(cfg, args.out)
    _print_fsm_summary(metrics, args.out, time.perf_counter() - started)
    return 0


def _print_fsm_summary(m: dict, out: str | Path, elapsed: float) -> None:
    """The figures of a TokFSM run, then where its time went and the CPU it ran on
    (``elapsed``: seconds since the command started, imports and report included)."""

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
        (
            "valid mass after jump",
            pct("base.valid_mass_after_jump"),
            pct("codebook.valid_mass_after_jump"),
        ),
    ]
    print()
    for a, b, c in rows:
        print(f"  {a:<22}{b:>10}{c:>12}")
    purity = {k[len("purity.mlp.") :]: v for k, v in m.items() if k.startswith("purity.mlp.")}
    if purity:
        layer = max(purity, key=purity.get)
        label = f"bigram purity, MLP {layer}"
        print(f"  {label:<22}{'':>10}{100 * purity[layer]:11.1f}%  (best MLP layer)")
    print(
        f"  {'state precision':<22}{'neuron ' + pct('neuron_precision').strip():>10}"
        f"{'code ' + pct('code_precision').strip():>12}"
    )
    if "trigram_code_precision" in m:
        print(
            f"  {'state+digit precision':<22}"
            f"{'neuron ' + pct('trigram_neuron_precision').strip():>10}"
            f"{'code ' + pct('trigram_code_precision').strip():>12}"
        )
    for sites in ("mlp", "all"):
        if f"jsd.{sites}" in m:
            label = f"JSD after swap ({sites})"
            print(f"  {label:<22}{'':>10}{m[f'jsd.{sites}']:12.3f}  (none = 1)")
    stages = [("base", "base"), ("codebook", "codebook"), ("analysis", "measuring")]
    times = ", ".join(
        f"{label} {m[f'seconds.{key}'] / 60:.1f}" for key, label in stages if f"seconds.{key}" in m
    )
    print(f"\n  {'time (min)':<22}{times}; end to end {elapsed / 60:.1f}")
    print(f"  {'CPU':<22}{describe_cpu()}")
    print(f"  {'report':<22}{Path(out, 'report.html').resolve()}")


def _intervention_from(args: argparse.Namespace, codes: list):
    from codebook_lens.steering.intervene import Intervention

    start = args.from_position
    return Intervention(
        force=codes,
        disable=args.disable or [],
        mode=args.mode,
        positions=None if start is None else slice(start, None),
        strength=args.strength,
    )


def _steer(args: argparse.Namespace) -> int:
    from codebook_lens.core.loading import load_codebook_model
    from codebook_lens.steering.intervene import check_intervention
    from codebook_lens.steering.sampling import check_lengths, generate

    if not args.code and not args.disable:
        raise CodebookLensError("steer needs at least one --code or --disable")
    intervention = _intervention_from(args, args.code or [])
    loaded = load_codebook_model(args.model_dir)
    check_intervention(loaded.model, intervention)
    check_lengths(loaded.model, loaded.codec, [args.prompt], args.max_new_tokens)
    options = dict(
        samples=args.samples,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        seed=args.seed,
    )
    baseline = generate(loaded, args.prompt, **options)[0]
    steered = generate(loaded, args.prompt, intervention=intervention, **options)[0]
    if args.json:
        report = {"prompt": args.prompt, **intervention.describe(), **options}
        print_json({**report, "baseline": baseline, "steered": steered})
        return 0
    described = intervention.describe()
    print(f"prompt: {args.prompt!r}")
    print(
        f"force: {', '.join(described['force']) or 'none'}; "
        f"disable: {', '.join(described['disable']) or 'none'}; "
        f"mode: {described['mode']}; positions: {described['positions']}"
    )
    for i, (before, after) in enumerate(zip(baseline, steered, strict=True), 1):
        print(f"\n[{i}] baseline: {before!r}")
        print(f"{'':>{len(str(i)) + 2}} steered:  {after!r}")
    return 0


def _check_cache_options(args: argparse.Namespace) -> None:
    """steer-eval's --cache options, before any work."""
    topic = args.select == "topic"
    if topic and not args.topic_text:
        raise CodebookLensError("steer-eval --cache needs --topic-text with --select topic")
    if not topic and args.min_fraction is not None:
        raise CodebookLensError("steer-eval --min-fraction applies to --select topic only")


def _codes_from_cache(args: argparse.Namespace, cache, words: list[str]) -> tuple[list, list]:
    """steer-eval --cache: the topic's codes and what made each one chosen."""
    from codebook_lens.analysis.search import effect_codes, per_codebook, topic_codes

    topic = args.select == "topic"
    limits = {
        name: value
        for name, value in (
            ("min_fraction", args.min_fraction),
            ("max_frequency", args.max_frequency),
        )
        if value is not None
    }
    if topic:
        hits = list(topic_codes(cache, args.topic_text, **limits, limit=None))
    else:
        hits = list(effect_codes(cache, words, **limits, limit=None))
    if args.per_codebook is not None:
        hits = per_codebook(hits, args.per_codebook)
    else:
        hits = hits[: args.max_codes]
    if not hits:
        hint = "lower --min-fraction or raise --max-frequency" if topic else "raise --max-frequency"
        raise CodebookLensError(f"no code in {args.cache} fits the topic; {hint}")
    selected = []
    for hit in hits:
        row = {"code": str(hit.ref), "frequency": hit.frequency}
        row.update({"coverage": hit.coverage} if topic else {"score": hit.score})
        selected.append(row)
    return [hit.ref for hit in hits], selected


def _steer_eval(args: argparse.Namespace) -> int:
    from codebook_lens.cache.store import CodeCache
    from codebook_lens.core.loading import load_codebook_model
    from codebook_lens.steering.intervene import check_intervention
    from codebook_lens.steering.sampling import check_lengths, steering_eval

    words = [w.strip() for w in args.words.split(",") if w.strip()]
    if not words:
        raise CodebookLensError(f"steer-eval --words names no word: {args.words!r}")
    prompts = list(args.prompt or [])
    if args.prompts_file:
        path = Path(args.prompts_file)
        if not path.is_file():
            raise CodebookLensError(f"no prompts file at {path}")
        prompts += [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not prompts:
        raise CodebookLensError("steer-eval needs prompts: give --prompt or --prompts-file")
    if args.out:
        check_output_file(args.out, "--out file")
    cache = None
    if args.cache:
        _check_cache_options(args)
        cache = CodeCache.open(args.cache)
    loaded = load_codebook_model(args.model_dir)
    check_lengths(loaded.model, loaded.codec, prompts, args.max_new_tokens)
    selected = []
    if cache is not None:
        cache.set_model(loaded)  # refuses a model other than the cache's own
        codes, selected = _codes_from_cache(args, cache, words)
    else:
        codes = args.code
    intervention = _intervention_from(args, codes)
    check_intervention(loaded.model, intervention)
    result = steering_eval(
        loaded,
        None,
        list(intervention.force),
        prompts,
        args.samples,
        words,
        args.mode,
        disable=list(intervention.disable),
        positions=intervention.positions,
        strength=intervention.strength,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        seed=args.seed,
        progress=not args.json,
    )
    out = str(result.save(args.out)) if args.out else None
    summary = {**result.summary(), "selected": selected, "out": out}
    if args.json:
        print_json(summary)
        return 0
    for hit in selected:
        why = (
            f"coverage {hit['coverage']:.2f}"
            if "coverage" in hit
            else f"logit score {hit['score']:.2f}"
        )
        print(f"  selected {hit['code']}: {why}, frequency {hit['frequency']:.4f}")
    total = summary["samples"]
    print(f"codes: {', '.join(summary['force'])} ({summary['mode']}, {summary['positions']})")
    print(f"topic words: {', '.join(words)}")
    print(
        f"  baseline {summary['baseline_mentions']:>5}/{total} = {summary['baseline_fraction']:.1%}"
    )
    print(
        f"  steered  {summary['steered_mentions']:>5}/{total} = {summary['steered_fraction']:.1%}"
    )
    if out:
        print(f"samples: {out}")
    return 0


def _add_intervention_options(p: argparse.ArgumentParser, samples: int) -> None:
    from codebook_lens.steering.intervene import MODES

    p.add_argument("--disable", action="append", metavar="CODE", help="disable a code (repeatable)")
    p.add_argument("--mode", choices=MODES, default="replace_last", help="how forced codes enter")
    p.add_argument(
        "--strength",
        type=finite_float,
        default=1.0,
        metavar="S",
        help="factor of each forced code in the sum (default 1: the code as it is)",
    )
    p.add_argument(
        "--from-position",
        type=nonneg_int,
        default=None,
        metavar="N",
        help="intervene from token position N on (default: every position, prompt included)",
    )
    p.add_argument("--max-new-tokens", type=positive_int, default=32, metavar="N")
    p.add_argument(
        "--samples", type=positive_int, default=samples, metavar="N", help="samples per prompt"
    )
    p.add_argument("--temperature", type=nonneg_float, default=1.0, help="0 decodes greedily")
    p.add_argument("--seed", type=nonneg_int, default=0)
    p.add_argument("--json", action="store_true", help="print JSON")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="codebook",
        description="Codebook features: train, read, search and steer sparse discrete codes "
        "in transformer language models.",
    )
    from codebook_lens import __version__

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
    p = sub.add_parser(
        "demo",
        help="the main job: TokFSM end to end on a short budget ('codebook demo lm': natural "
        "language, at most 15 minutes)",
    )
    p.add_argument("--out", default=None, help="run directory (default runs/demo, or runs/demo-lm)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help=argparse.SUPPRESS)
    p.set_defaults(func=_demo)
    p = sub.add_parser("steer", help="generate with and without codes forced on, side by side")
    p.add_argument("model_dir", metavar="MODEL_DIR", help="a saved codebook model")
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument(
        "--code", action="append", metavar="CODE", help="force a code on, e.g. layer12_mlp:345"
    )
    _add_intervention_options(p, samples=3)
    p.set_defaults(func=_steer)
    p = sub.add_parser(
        "steer-eval", help="fraction of samples on a topic, without and with topic codes forced on"
    )
    p.add_argument("model_dir", metavar="MODEL_DIR", help="a saved codebook model")
    p.add_argument("--words", required=True, help="topic words, comma-separated (whole words)")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--code", action="append", metavar="CODE", help="force a code on")
    which.add_argument("--cache", metavar="CACHE_DIR", help="pick topic codes from a code cache")
    p.add_argument(
        "--select",
        choices=["topic", "effect"],
        default="topic",
        help="with --cache: codes that fire on --topic-text (topic, the paper's way) or codes "
        "whose direct logit effect promotes the --words (effect)",
    )
    p.add_argument("--topic-text", help="with --cache --select topic: text about the topic")
    p.add_argument(
        "--max-codes", type=positive_int, default=3, metavar="N", help="with --cache (default 3)"
    )
    p.add_argument(
        "--per-codebook",
        type=positive_int,
        default=None,
        metavar="N",
        help="with --cache, instead of --max-codes: the best N codes of every codebook",
    )
    p.add_argument("--min-fraction", type=open_fraction, default=None, help="with --select topic")
    p.add_argument("--max-frequency", type=open_fraction, default=None, help="with --cache")
    p.add_argument("--prompt", action="append", metavar="TEXT", help="a prompt (repeatable)")
    p.add_argument("--prompts-file", metavar="FILE", help="prompts, one per line")
    p.add_argument("--out", metavar="FILE.json", help="save every sample here")
    _add_intervention_options(p, samples=10)
    p.set_defaults(func=_steer_eval)
    from codebook_lens.cli.cache import add_parser as add_cache_parser
    from codebook_lens.cli.lm import add_parser as add_lm_parser
    from codebook_lens.cli.query import add_parsers as add_query_parsers
    from codebook_lens.cli.serve import add_parser as add_serve_parser

    add_lm_parser(sub)
    add_cache_parser(sub)
    add_query_parsers(sub)
    add_serve_parser(sub)
    return parser


def parse(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """The arguments; ``key=value`` overrides may also follow the flags
    (``codebook train CFG --resume key=value``), where argparse alone stops at them."""
    args, extra = parser.parse_known_args(argv)
    if extra:
        if isinstance(getattr(args, "overrides", None), list) and all(
            "=" in item and not item.startswith("-") for item in extra
        ):
            args.overrides = [*args.overrides, *extra]
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parse(parser, argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except CodebookLensError as err:
        error(str(err))
        return 2


if __name__ == "__main__":
    sys.exit(main())
