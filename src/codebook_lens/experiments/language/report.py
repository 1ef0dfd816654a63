"""The language run's self-contained HTML report (inline SVG plots, no network)."""

from __future__ import annotations

import html
import json
from pathlib import Path

from codebook_lens.core.cpu import describe_cpu
from codebook_lens.experiments.language.measures import needed_topic_rate
from codebook_lens.experiments.language.metrics import METRIC_KEYS
from codebook_lens.plots import (
    REPORT_STYLE,
    bar_plot,
    frequency_plot,
    html_table,
    precision_recall_plot,
    pyplot,
    svg,
    training_curves,
)
from codebook_lens.steering.sampling import topic_pattern
from codebook_lens.training.config import to_dict


def regex_scatter(rows: list[dict]) -> str:
    """Paper Figure 3: per regex, its code's precision against the best neuron's at the
    code's recall (above the diagonal: the code is the better classifier)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.2, 4.8))
    pts = [r for r in rows if r["code"] is not None and r["neuron"] is not None]
    xs = [r["neuron"]["precision"] for r in pts]
    ys = [r["code"]["precision"] for r in pts]
    ax.scatter(xs, ys, s=18, color="#4878a8")
    for r, x, y in zip(pts, xs, ys, strict=True):
        ax.annotate(r["name"], (x, y), fontsize=6, xytext=(3, 2), textcoords="offset points")
    ax.plot([0, 1], [0, 1], color="#a33", lw=1)
    ax.set_xlabel("best neuron's precision at the code's recall")
    ax.set_ylabel("code's precision")
    ax.set_xlim(0, 1.02)
    ax.set_ylim(0, 1.02)
    ax.set_title("codes against neurons, one point per regex")
    ax.grid(alpha=0.3)
    return svg(fig)


def calibration_plot(steering: list[dict], max_cost: float) -> str:
    """``select: calibrated``: per topic, the share on topic of the held-out steered
    samples against their measured fluency cost, for each prefix of the measured path
    that was sampled (with ``steer.objective: both``, a solid line for the ``log_prob``
    path and a dashed one for the ``rate`` path; larger marker: the prefix kept)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for r in steering:
        points = r.get("calibration") or []
        color = None
        for objective in dict.fromkeys(p.get("objective", "log_prob") for p in points):
            mine = [p for p in points if p.get("objective", "log_prob") == objective]
            (line,) = ax.plot(
                [p["cost"] for p in mine],
                [p["share"] for p in mine],
                marker="o",
                ms=3,
                lw=1,
                ls="--" if objective == "rate" else "-",
                color=color,
                label=r["name"] if color is None else None,
            )
            color = line.get_color()
        kept = r.get("calibration_kept")
        if kept is not None:
            ax.plot([points[kept]["cost"]], [points[kept]["share"]], "o", ms=8, color=color)
    ax.axvline(max_cost, color="#a33", lw=1, ls="--")
    ax.axhline(0.6, color="#888", lw=1, ls=":")
    ax.set_xlabel("fluency cost on the held-out samples (nats per token)")
    ax.set_ylabel("held-out samples on topic")
    ax.set_ylim(0, 1.02)
    ax.set_title("prefixes of each topic's measured path, sampled from held-out seeds")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return svg(fig)


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _rate(x: float | None) -> str:
    return "" if x is None else f"{100 * x:.2f}%"


def _quality_table(m: dict) -> str:
    rows = []
    for name, label in (
        ("base", "base"),
        ("control", "base trained on (control, same budget as the codebook model)"),
        ("codebook", "codebook model"),
        ("codebook_off", "codebook model, codebooks off"),
        ("ablated", "base, codebook sites mean-ablated"),
    ):
        if f"{name}.loss" in m:
            kl = m.get(f"{name}.kl")
            rows.append(
                [label, m[f"{name}.loss"], _pct(m[f"{name}.accuracy"]), "" if kl is None else kl]
            )
    table = html_table(rows, ["model", "held-out loss", "next-token accuracy", "KL from base"])
    extra = (
        f"<p>Gap recovered against mean ablation: <b>{_pct(m['gap_recovered'])}</b>; "
        f"loss increase over the base: <b>{m['loss_increase']:+.3f}</b> nats"
    )
    if "loss_increase_vs_control" in m:
        extra += f" ({m['loss_increase_vs_control']:+.3f} over the control)"
    return table + extra + ".</p>"


def _regex_table(rows: list[dict]) -> str:
    body = []
    for r in rows:
        code, neuron = r["code"], r["neuron"]
        body.append(
            [
                r["name"],
                r["matching_tokens"],
                "-" if code is None else code["code"],
                "-" if code is None else f"{code['precision']:.3f} / {code['recall']:.3f}",
                "-" if neuron is None else f"{neuron['site']}[{neuron['neuron']}]",
                "-" if neuron is None else f"{neuron['precision']:.3f}",
                "-" if r["lead"] is None else f"{100 * r['lead']:+.1f}",
            ]
        )
    return html_table(
        body,
        [
            "regex",
            "matching tokens",
            "code",
            "code precision / recall",
            "best neuron",
            "neuron precision",
            "lead (points)",
        ],
    )


def marked(text: str, words) -> str:
    """``text`` as HTML, every topic word of ``words`` in ``<mark>``."""
    pattern = topic_pattern(words)
    parts, at = [], 0
    for m in pattern.finditer(text):
        parts += [html.escape(text[at : m.start()]), f"<mark>{html.escape(m.group(0))}</mark>"]
        at = m.end()
    return "".join(parts) + html.escape(text[at:])


def _samples(result: dict, count: int = 3) -> str:
    rows = []
    for s in result["samples"][:count]:
        for b, t in list(zip(s["baseline"], s["steered"], strict=True))[:1]:
            rows.append(
                "<tr><td>"
                + html.escape(s["prompt"])
                + "</td><td style='text-align:left'>"
                + marked(b, result["words"])
                + "</td><td style='text-align:left'>"
                + marked(t, result["words"])
                + "</td></tr>"
            )
    return (
        "<table><tr><th>prompt</th><th>unsteered</th><th>steered</th></tr>"
        + "".join(rows)
        + "</table>"
    )


def _sites(cfg) -> str:
    names = {"attn_heads": "the attention heads", "mlp": "the MLPs", "attn": "the attention"}
    sites = " and ".join(names.get(x, x) for x in cfg.codebook.sites)
    layers = cfg.codebook.layers
    return f"{sites} of " + ("every layer" if layers is None else f"layers {layers}")


def lm_report(run_dir: Path, cfg, metrics: dict, details: dict) -> Path:
    """Write ``run_dir/report.html`` for a language run."""
    m = metrics
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>codebook-lens: language "
        f"run ({html.escape(cfg.preset)})</title><style>{REPORT_STYLE}</style></head><body>",
        f"<h1>Codebook features on natural language ({html.escape(cfg.preset)} preset)</h1>",
        "<p class='note'>A GPT-NeoX trained here on the offline corpus (the base), a codebook "
        f"model with codebooks on {html.escape(_sites(cfg))}, and the paper's "
        "natural-language measurements. Figures and their commands are in "
        "docs/results/language.md.</p>",
        "<h2>Language-model quality</h2>",
        _quality_table(m),
    ]
    ablated = details["quality"]["ablated_alone"]
    parts.append(
        "<p>Held-out loss with one site mean-ablated at a time (base): "
        + ", ".join(f"{html.escape(k)} {v:.3f}" for k, v in ablated.items())
        + ".</p>"
    )
    stages = [
        s for s in ("base", "codebook", "control") if (run_dir / s / "metrics.jsonl").exists()
    ]
    parts.append(f"<figure>{training_curves(run_dir, stages)}</figure>")

    parts.append("<h2>Code frequency by rank (paper Figure 4)</h2>")
    fits = details["frequency"]["fits"]
    parts.append(
        html_table(
            [
                [k, f["codes"], f["exponent"], f["r2"], _pct(m[f"frequency.{k}.dead_fraction"])]
                for k, f in fits.items()
            ],
            ["codebook", "codes that fire", "power-law exponent", "R^2 (log-log)", "dead"],
        )
    )
    parts.append(f"<figure>{frequency_plot(details['frequency']['counts'])}</figure>")

    parts.append("<h2>Codes against neurons (paper Figure 3)</h2>")
    parts.append(
        f"<p>Codes more precise than the best neuron at the code's recall on "
        f"<b>{_pct(m['regex.codes_win_share'])}</b> of {m['regex.regexes']} regexes; median "
        f"lead <b>{m['regex.median_lead_points']:+.1f}</b> points. A regex's code is the most "
        f"precise code firing at least {cfg.measure.min_count} times with recall at least "
        f"{cfg.measure.min_recall:g}; neurons are every layer's attention and MLP outputs and "
        "MLP hidden units of the same network with its codebooks off, either sign.</p>"
    )
    parts.append(_regex_table(details["regexes"]))
    parts.append(f"<figure>{regex_scatter(details['regexes'])}</figure>")
    curves = [
        {
            "pattern": name,
            "matching_tokens": r["matching_tokens"],
            "curve": details["regex_curves"][name],
        }
        for r in details["regexes"]
        if (name := r["name"]) in details["regex_curves"]
    ]
    for i in range(0, len(curves), 4):
        parts.append(f"<figure>{precision_recall_plot(curves[i : i + 4])}</figure>")

    parts.append("<h2>Topic steering (paper Table 3)</h2>")
    steering = details["steering"]
    parts.append(
        f"<p>Codes forced at strength {cfg.steer.strength:g} at every position "
        f"({html.escape(cfg.steer.mode)}; selected by {html.escape(cfg.steer.select)}); "
        f"{m['steer.topics_steered']} of {m['steer.topics']} topics reach a steered share "
        "of at least 60% with an unsteered share of at most 20% and a fluency cost of at most "
        "1 nat.</p>"
    )
    parts.append(
        html_table(
            [
                [
                    r["name"],
                    len(r["codes"]),
                    _pct(r["baseline_share"]),
                    _pct(r["steered_share"]),
                    "" if r.get("primed_share") is None else _pct(r["primed_share"]),
                    r["baseline_loss"],
                    r["steered_loss"],
                    r["fluency_cost"],
                    _rate(r.get("topic_rate")),
                    _rate(r.get("forced_topic_rate")),
                ]
                for r in steering
            ],
            [
                "topic",
                "codes",
                "unsteered on topic",
                "steered on topic",
                "unsteered, primed with the topic's passage",
                "loss of unsteered samples",
                "loss of steered samples",
                "fluency cost",
                "topic rate per token, unsteered",
                "topic rate per token, codes forced",
            ],
        )
    )
    needed = needed_topic_rate(cfg.steer.max_new_tokens)
    parts.append(
        "<p>Topic rate: the mean probability that the next word is a topic word (each token a "
        "topic word starts with, weighted by how often it starts one in the cached text), at "
        "every position of the unsteered samples, as the model is and with the topic's codes "
        f"forced (the first step of steering). For 60% of {cfg.steer.max_new_tokens}-token "
        f"samples to mention the topic, tokens drawn independently would need {_rate(needed)} "
        "per token.</p>"
    )
    weighted = [r for r in steering if r.get("topic_tokens")]
    if weighted:
        parts.append(
            html_table(
                [
                    [
                        r["name"],
                        ", ".join(
                            f"{t!r} {w:.2f}"
                            for t, w in sorted(r["topic_tokens"].items(), key=lambda kv: -kv[1])
                        ),
                    ]
                    for r in weighted
                ],
                ["topic", "tokens a topic word starts with, and their weights in the topic rate"],
            )
        )
    names = [r["name"] for r in steering]
    parts.append(
        "<figure>"
        + bar_plot(
            names,
            {
                "unsteered": [r["baseline_share"] for r in steering],
                "steered": [r["steered_share"] for r in steering],
            },
            "samples on topic",
            "share",
            ref=0.6,
        )
        + "</figure>"
    )
    if any(r.get("calibration") for r in steering):
        parts.append(
            "<p>Codes chosen by calibration: each topic's measured path (codes added in "
            "order of topic gain per predicted fluency cost"
            + (", one path per objective" if cfg.steer.objective == "both" else "")
            + ", up to a predicted cost of "
            f"{cfg.steer.explore_cost:g} nats) was sampled at up to "
            f"{cfg.steer.calibration_points} of its prefixes, "
            f"{cfg.steer.calibration_samples} samples per prompt from seeds the measurement "
            "does not use; the prefix with the largest share on topic whose cost was at most "
            f"{cfg.steer.max_cost:g} nats is forced above.</p>"
        )
        parts.append(f"<figure>{calibration_plot(steering, cfg.steer.max_cost)}</figure>")
    parts.append(
        "<p>Samples of the first prompts, unsteered and steered from the same seed; the "
        "topic's words are marked.</p>"
    )
    for r in steering:
        parts.append(f"<h3>{html.escape(r['name'])}</h3>" + _samples(r))

    parts.append("<h2>Timings</h2>")
    parts.append(f"<p>Machine: {html.escape(describe_cpu())}.</p>")
    if "budget.scale" in m:
        parts.append(
            f"<p>Budget: {cfg.budget_minutes:g} minutes. A base training step took "
            f"{m['budget.step_seconds']:.2f} s on this machine; the run at full size was "
            f"predicted to take {m['budget.predicted_minutes']:.0f} min, so the base ran "
            f"{_pct(m['budget.scale'])} of its steps and the codebook stage "
            f"{_pct(m['budget.codebook_scale'])} of its own.</p>"
        )
    parts.append(
        html_table(
            [[k.split(".", 1)[1], v / 60] for k, v in m.items() if k.startswith("seconds.")],
            ["stage", "minutes"],
        )
    )
    parts.append("<h2>Metric keys</h2>")
    parts.append(html_table([[k, v] for k, v in METRIC_KEYS.items()], ["key", "meaning"]))
    parts.append(
        "<h2>Settings</h2><pre>" + html.escape(json.dumps(to_dict(cfg), indent=2)) + "</pre>"
    )
    parts.append("</body></html>")
    path = run_dir / "report.html"
    path.write_text("".join(parts))
    return path
