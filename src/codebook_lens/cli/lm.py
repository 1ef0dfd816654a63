"""``codebook lm`` (the natural-language experiment) and ``codebook demo lm`` (the same on
a budget of at most 15 minutes here)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from codebook_lens.core.cpu import describe_cpu
from codebook_lens.core.files import check_output_dir

PRESET_HELP = (
    "cpu (default, at most an hour on a 2-core CPU), demo (at most 15 minutes), paper "
    "(a larger model for a GPU), tiny (seconds: a smoke test, nothing meaningful)"
)


def _lm(args: argparse.Namespace) -> int:
    from codebook_lens.experiments.language.run import load_lm_config, run

    cfg = load_lm_config(args.preset, args.overrides)
    out = check_output_dir(args.out or f"runs/lm-{args.preset}", "--out directory")
    metrics = run(cfg, out)
    print_lm_summary(metrics, out)
    return 0


def demo_lm(out: str | Path, overrides: list[str]) -> int:
    """``codebook demo lm``: the ``demo`` preset, its table and a few steered samples."""
    from codebook_lens.experiments.language.run import load_lm_config, run

    cfg = load_lm_config("demo", overrides)
    out = check_output_dir(out, "--out directory")
    print(
        "codebook demo lm: codebook features on natural language, on a short budget. It trains "
        "a BPE tokenizer and a small GPT-NeoX on the offline English corpus, then a copy with "
        "a codebook on every attention head, and measures its quality, its codes against "
        "neurons on regexes, and topic steering at the paper's strength. On a slow machine "
        "its training is scaled down to fit its time budget.",
        flush=True,
    )
    metrics = run(cfg, out)
    print_lm_summary(metrics, out)
    print_samples(Path(out))
    return 0


def print_lm_summary(m: dict, out: str | Path) -> None:
    """The key figures of a language run as a short table."""

    def pct(x: float) -> str:
        return f"{100 * x:.1f}%"

    print()
    print(f"  {'':<34}{'loss':>8}{'accuracy':>10}")
    for name, label in (
        ("base", "base"),
        ("control", "base, same budget (control)"),
        ("codebook", "codebook model"),
        ("ablated", "base, codebook sites mean-ablated"),
    ):
        if f"{name}.loss" in m:
            print(f"  {label:<34}{m[f'{name}.loss']:>8.3f}{pct(m[f'{name}.accuracy']):>10}")
    print(
        f"  gap recovered {pct(m['gap_recovered'])}, KL from base {m['codebook.kl']:.3f} nats, "
        f"loss {m['loss_increase']:+.3f} over the base"
    )
    print(
        f"  regexes: codes beat the best neuron on {pct(m['regex.codes_win_share'])} of "
        f"{m['regex.regexes']}, median lead {m['regex.median_lead_points']:+.1f} points"
    )
    topics = sorted({k.split(".")[1] for k in m if k.endswith(".steered_share")})
    print(f"\n  {'topic':<14}{'unsteered':>10}{'steered':>10}{'fluency cost':>14}{'primed':>8}")
    for t in topics:
        primed = m.get(f"steer.{t}.primed_share")
        print(
            f"  {t:<14}{pct(m[f'steer.{t}.baseline_share']):>10}"
            f"{pct(m[f'steer.{t}.steered_share']):>10}{m[f'steer.{t}.fluency_cost']:>+14.2f}"
            f"{'' if primed is None else pct(primed):>8}"
        )
    print(f"  {m['steer.topics_steered']} of {m['steer.topics']} topics steered (>= 60% on topic,")
    print("  <= 20% unsteered, fluency cost <= 1 nat)")
    minutes = sum(v for k, v in m.items() if k.startswith("seconds.")) / 60
    print(
        f"\n  {minutes:.1f} min on {describe_cpu()}; report: {Path(out, 'report.html').resolve()}"
    )
    if m.get("budget.scale", 1.0) < 1.0:
        print(
            f"  training scaled to fit the time budget: the base ran {pct(m['budget.scale'])} "
            f"of its steps, the codebook stage {pct(m['budget.codebook_scale'])} "
            f"(a base step took {m['budget.step_seconds']:.2f} s on this machine; the full "
            f"size was predicted to take {m['budget.predicted_minutes']:.0f} min)"
        )


def print_samples(out: Path, topics: int = 3) -> None:
    """For the ``topics`` topics steered furthest: the first steered sample that mentions
    the topic beside the unsteered sample of the same prompt and seed, cut around the
    topic word, topic words in brackets."""
    from codebook_lens.experiments.language.measures import excerpt, first_on_topic

    details = json.loads((out / "analysis.json").read_text())
    ranked = sorted(details["steering"], key=lambda r: -r["steered_share"])
    print()
    for r in ranked[:topics]:
        pair = first_on_topic(r["samples"], r["words"])
        if pair is None:
            continue
        prompt, plain, steered = pair
        print(
            f"  {r['name']} ({r['steered_share']:.0%} of steered samples on topic); the "
            f"first on topic, from prompt {prompt!r}:"
        )
        for label, text in (("unsteered", plain), ("steered", steered)):
            print(f"    {label:<10} {excerpt(text, r['words'], 96)}")


def add_parser(sub) -> None:
    p = sub.add_parser(
        "lm",
        help="the natural-language experiment: tokenizer, base and codebook models, "
        "measurements, report",
    )
    p.add_argument("--preset", default="cpu", help=PRESET_HELP)
    p.add_argument("--out", default=None, help="run directory (default runs/lm-PRESET)")
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="e.g. base.steps=500 codebook.mlp_k=8 steer.codes_per_codebook=2",
    )
    p.set_defaults(func=_lm)
