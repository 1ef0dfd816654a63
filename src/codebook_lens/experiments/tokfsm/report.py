"""Self-contained HTML reports with inline SVG plots (matplotlib, no network)."""

from __future__ import annotations

import html
import json
from pathlib import Path

from codebook_lens.experiments.tokfsm.metrics import METRIC_KEYS
from codebook_lens.plots import (
    REPORT_STYLE as STYLE,
)
from codebook_lens.plots import (
    bar_plot,
    frequency_plot,
    training_curves,
)
from codebook_lens.plots import (
    html_table as _table,
)
from codebook_lens.plots import (
    pyplot as _plt,
)
from codebook_lens.plots import (
    svg as _svg,
)
from codebook_lens.training.config import to_dict

PAPER_TABLE1 = [
    # (setting, lm loss, next-token acc %, state acc %) from the paper's Table 1
    ("paper: no codebook", 1.179, 46.36, 96.77),
    ("paper: attn only, k=1, C=2k", 1.18, 46.33, 96.39),
    ("paper: attn+MLP, k=1, C=10k", 1.269, 45.27, 63.65),
    ("paper: attn+MLP, k=4, C=20k", 1.192, 46.20, 80.69),
]


def precision_plot(per_state: list[dict]) -> str:
    """Per state: the best code's precision against the best neuron's at the same recall
    (paper Figure 3 style; above the diagonal = the code is the better classifier)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(4.8, 4.4))
    codes = [p["code"]["precision"] for p in per_state]
    ax.scatter(
        [p["neuron"]["precision"] for p in per_state],
        codes,
        s=12,
        label="neurons: attention and MLP outputs",
    )
    if all("neuron_hidden" in p for p in per_state):
        ax.scatter(
            [p["neuron_hidden"]["precision"] for p in per_state],
            codes,
            s=12,
            marker="x",
            label="neurons incl. MLP hidden units",
        )
    ax.plot([0, 1], [0, 1], color="#a33", lw=1)
    ax.set_xlabel("best neuron's precision at the code's recall")
    ax.set_ylabel("best code's precision")
    ax.set_xlim(0, 1.02)
    ax.set_ylim(0, 1.02)
    ax.set_title("state classification, one point per state")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    return _svg(fig)


def fsm_report(run_dir: Path, cfg, metrics: dict, details: dict) -> Path:
    """Write ``run_dir/report.html`` for a TokFSM run."""
    m = metrics
    rows, classes = [], []
    for name in ("base", "codebook"):
        rows.append(
            [
                f"ours ({cfg.preset}): {'no codebook' if name == 'base' else 'attn+MLP codebooks'}",
                m[f"{name}.lm_loss"],
                100 * m[f"{name}.next_token_accuracy"],
                100 * m[f"{name}.state_accuracy"],
                100 * m[f"{name}.first_transition_accuracy"],
                100 * m[f"{name}.valid_transition_mass"],
                100 * m.get(f"{name}.valid_mass_after_jump", float("nan")),
            ]
        )
        classes.append("ours")
    for setting, loss, acc, state in PAPER_TABLE1:
        rows.append([setting, loss, acc, state, "-", "-", "-"])
        classes.append("")
    table = _table(
        rows,
        [
            "model",
            "LM loss",
            "next-token acc %",
            "state acc %",
            "first transition acc %",
            "valid mass, teacher-forced %",
            "valid mass after a jump %",
        ],
        classes,
    )
    pur_labels = [k[len("purity.") :] for k in m if k.startswith("purity.")]
    pur = {
        "bigram, all inputs": [m[f"purity.{x}"] for x in pur_labels],
        "trigram, all inputs": [m.get(f"purity_trigram.{x}", 0.0) for x in pur_labels],
        "in walks": [m.get(f"purity_walks.{x}", 0.0) for x in pur_labels],
    }
    jsd_labels = [k[4:] for k in m if k.startswith("jsd.")]
    jsd = {
        "state + next digit codes": [m[f"jsd.{x}"] for x in jsd_labels],
        "state codes only": [m.get(f"jsd_state_only.{x}", 1.0) for x in jsd_labels],
    }
    sc = details["state_classification"]
    cb = cfg.codebook
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>TokFSM codebook run ({html.escape(cfg.preset)})</title>",
        f"<style>{STYLE}</style></head><body>",
        f"<h1>TokFSM: codebook features on a finite state machine ({html.escape(cfg.preset)} preset)</h1>",
        f"<p class='note'>{cfg.task.num_states} states, {cfg.task.out_degree} successors each, "
        f"sequences of {cfg.task.seq_len} tokens; GPT-NeoX {cfg.net.layers} layers x "
        f"{cfg.net.hidden}, {cfg.net.heads} heads, MLP {cfg.net.mlp}. Codebooks on "
        f"{', '.join(cb.sites)} of every layer, k = {cb.k}, C = {cb.attn_num_codes} per head / "
        f"{cb.mlp_num_codes} per MLP. Training: base {cfg.base.steps} steps, codebook "
        f"{cb.steps} steps of {cb.batch_size} sequences. Wall clock: "
        + ", ".join(f"{k[8:]} {v / 60:.1f} min" for k, v in m.items() if k.startswith("seconds."))
        + ".</p>",
        "<h2>Models</h2>",
        table,
        "<p class='note'>State accuracy: the fraction of valid transitions in sequences sampled "
        "from BOS (temperature 1). Valid mass: the probability the model gives to valid next "
        "states after true walks. Paper rows are quoted for reference (their budgets "
        "differ).</p>",
        "<h2>Training curves</h2>",
        training_curves(run_dir, ["base", "codebook"]),
        "<h2>Code purity per layer</h2>",
        "<p class='note'>All inputs (paper Figure 5): the model reads every BOS + state "
        "(bigram) and every BOS + state + next digit (trigram) once; a code is pure when it "
        "fires on one of them. In walks: over the analysis walks, a code is pure when all "
        "its activations on state tokens share one state (at a last digit) or one state "
        "plus digit (at a first digit), across every context the walks give.</p>",
        bar_plot(pur_labels, pur, "fraction of active codes that are pure", "purity"),
        "<h2>States: codes vs neurons</h2>",
        f"<p>Best code per state: mean precision <b>{100 * sc['code_precision']:.1f}%</b> at mean "
        f"recall {100 * sc['code_recall']:.1f}%. Best single neuron of the base model at the "
        f"same recall (attention and MLP outputs of every layer): "
        f"<b>{100 * sc['neuron_precision']:.1f}%</b>; with the MLP hidden units as neurons "
        f"too: {100 * sc.get('neuron_precision_hidden', float('nan')):.1f}% (paper: codes "
        "97.1%, neurons 70.5%).</p>",
        _ceiling_note(sc),
        _trigram_note(details.get("trigram_classification")),
        precision_plot(sc["per_state"]),
        "<h2>Interventions</h2>",
        "<p class='note'>Codes on the source state's digits (state codes) and on the next "
        "state's first digit (state-plus-digit codes, paper Figure 2) are replaced by those "
        "of the target state; in the second series only the state codes. JSD between the "
        "model's next-state distribution and the target's true one, divided by the JSD "
        "without intervention (lower is better; 0 = the model now acts as in the target "
        "state).</p>",
        bar_plot(jsd_labels, jsd, "normalised JSD by site set", "JSD / JSD(none)", 1.0),
        "<h2>Code frequency by rank</h2>",
        frequency_plot(details["frequency_counts"]),
        _table(
            [
                [k, v["active_codes"], v["dead_fraction"], v["top10pct_share"]]
                for k, v in details["frequency"].items()
            ],
            ["codebook", "active codes", "dead fraction", "share of top 10% codes"],
        ),
        "<h2>All metrics</h2>",
        _table([[k, v] for k, v in m.items()], ["key", "value"]),
        "<h2>Metric keys</h2>",
        _table([[k, v] for k, v in METRIC_KEYS.items()], ["key", "meaning"]),
        "<h2>Config</h2><pre>" + html.escape(json.dumps(to_dict(cfg), indent=2)) + "</pre>",
        "</body></html>",
    ]
    path = run_dir / "report.html"
    path.write_text("\n".join(parts))
    return path


def _ceiling_note(sc: dict) -> str:
    """How far any code could lead: the output neurons at recall 1 (absent in older runs)."""
    full = sc.get("neuron_precision_full_recall")
    if full is None:
        return ""
    return (
        "<p class='note'>The best output neuron that catches every position of its state "
        f"(recall 1) is {100 * full:.1f}% precise, so even a perfect code per state leads "
        f"the neurons by at most {100 * (1 - full):.1f} points here.</p>"
    )


def _trigram_note(tc: dict | None) -> str:
    """The state-plus-digit classification line (absent in runs analysed before it)."""
    if not tc:
        return ""
    return (
        f"<p>State plus next digit (at first digits; {tc['states']} classes occur, more "
        "than a layer's outputs): best code "
        f"<b>{100 * tc['code_precision']:.1f}%</b> at recall {100 * tc['code_recall']:.1f}%, "
        f"best output neuron at that recall <b>{100 * tc['neuron_precision']:.1f}%</b>.</p>"
    )
