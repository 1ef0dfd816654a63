"""Generic plots and HTML pieces for reports and the web browser (matplotlib, SVG inline).

Every plot returns an ``<svg>`` string that a self-contained HTML page can embed.
"""

from __future__ import annotations

import html
import io
import json
from pathlib import Path

REPORT_STYLE = """
body { font-family: system-ui, sans-serif; max-width: 980px; margin: 2em auto; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 2em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 1em 0; }
td, th { border: 1px solid #ccc; padding: 4px 10px; text-align: right; }
th:first-child, td:first-child { text-align: left; }
.ours { background: #eef6ff; font-weight: 600; }
.note { color: #555; font-size: 0.92em; }
figure { margin: 1em 0; } svg { max-width: 100%; height: auto; }
"""


def svg(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight")
    plt.close(fig)
    text = buf.getvalue()
    return text[text.index("<svg") :]


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def training_curves(run_dir: Path, stages: list[str]) -> str:
    plt = pyplot()
    fig, axes = plt.subplots(1, len(stages), figsize=(5 * len(stages), 3.4), squeeze=False)
    for ax, stage in zip(axes[0], stages, strict=True):
        records = read_jsonl(run_dir / stage / "metrics.jsonl")
        train = [r for r in records if "lm_loss" in r]
        evals = [r for r in records if "eval" in r]
        if train:
            ax.plot(
                [r["step"] for r in train], [r["lm_loss"] for r in train], label="train LM loss"
            )
        if evals:
            ax.plot(
                [r["step"] for r in evals],
                [r["eval"]["codebook.lm_loss"] for r in evals],
                "o-",
                label="held-out LM loss",
            )
        if stage != "base" and evals:
            ax.plot(
                [r["step"] for r in evals],
                [r["eval"]["base.lm_loss"] for r in evals],
                "s--",
                label="held-out, codebooks off",
            )
        ax.set_title(f"{stage} model")
        ax.set_xlabel("step")
        ax.set_ylabel("loss (nats)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return svg(fig)


def bar_plot(
    labels: list[str],
    values: list[float] | dict[str, list[float]],
    title: str,
    ylabel: str,
    ref=None,
) -> str:
    """Bars per label; ``values`` a list (one series) or ``{series name: values}``."""
    plt = pyplot()
    series = values if isinstance(values, dict) else {"": values}
    n = len(series)
    width = 0.8 / n
    colors = ["#4878a8", "#e08a3c", "#6a9f58", "#9467bd"]
    fig, ax = plt.subplots(figsize=(max(4.0, (0.5 + 0.3 * n) * len(labels) + 2), 3.6))
    for j, (name, vals) in enumerate(series.items()):
        xs = [i + (j - (n - 1) / 2) * width for i in range(len(vals))]
        ax.bar(xs, vals, width=width, color=colors[j % len(colors)], label=name or None)
        for x, v in zip(xs, vals, strict=True):
            ax.text(x, v, f"{v:.2f}", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=8)
    if ref is not None:
        ax.axhline(ref, color="#a33", lw=1, ls="--")
    if n > 1:
        ax.legend(fontsize=7)
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    ax.grid(axis="y", alpha=0.3)
    return svg(fig)


def frequency_plot(counts: dict[str, list[int]]) -> str:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for key, c in counts.items():
        if c:
            ax.loglog(range(1, len(c) + 1), c, label=key, lw=1.2)
    ax.set_xlabel("code rank")
    ax.set_ylabel("activations")
    ax.set_title("code frequency by rank")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, ncol=2)
    return svg(fig)


def precision_recall_plot(rows: list[dict]) -> str:
    """One panel per pattern: the best neuron's precision at each recall r against the
    most precise code of recall at least r (rows of benchmarks/regex_vs_neurons.py)."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(rows), figsize=(4.2 * len(rows), 3.6), squeeze=False)
    for ax, row in zip(axes[0], rows, strict=True):
        pts = [p for p in row["curve"] if p["code_precision"] is not None]
        ax.plot(
            [p["recall"] for p in row["curve"]],
            [p["neuron_precision"] for p in row["curve"]],
            "o-",
            label="best neuron",
        )
        ax.plot(
            [p["recall"] for p in pts],
            [p["code_precision"] for p in pts],
            "s-",
            label="best code (recall >= r)",
        )
        ax.set_title(f"{row['pattern']} ({row['matching_tokens']:,} matching tokens)")
        ax.set_xlabel("recall r")
        ax.set_ylabel("precision")
        ax.set_ylim(0, 1.02)
        ax.set_xlim(0, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(loc="lower left", fontsize=8)
    return svg(fig)


def html_table(rows: list[list], header: list[str], classes: list[str] | None = None) -> str:
    out = ["<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>"]
    for i, row in enumerate(rows):
        cls = f' class="{classes[i]}"' if classes and classes[i] else ""
        cells = "".join(
            f"<td>{html.escape(f'{c:.4g}' if isinstance(c, float) else str(c))}</td>" for c in row
        )
        out.append(f"<tr{cls}>{cells}</tr>")
    return "".join(out) + "</table>"
