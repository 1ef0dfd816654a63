"""The TokFSM experiment end to end: ``codebook fsm`` and ``codebook demo``.

Trains a GPT-NeoX on random walks of a finite state machine (the base model), then a
codebook model initialised from it (codebooks on every attention head and MLP,
k = 1), both with the project's training loop; then measures both models and runs
every analysis of :mod:`codebook_lens.experiments.tokfsm.analysis` and
:mod:`codebook_lens.experiments.tokfsm.classify`. The run directory holds:

- ``fsm.json``: the state machine;
- ``base/`` and ``codebook/``: each stage's training output (``metrics.jsonl``,
  ``checkpoints/``, ``model/``); a rerun with the same settings loads them instead
  of training again, and resumes an interrupted stage from its last checkpoint;
- ``metrics.json``: the key figures, flat (see :data:`METRIC_KEYS`);
- ``analysis.json``: per-state and per-codebook details;
- ``report.html``: plots and tables, self-contained.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import time
from pathlib import Path

import torch

from codebook_lens.core.files import check_output_dir
from codebook_lens.core.model import CodebookModel
from codebook_lens.data.fsm import FSM, FSMData
from codebook_lens.experiments.tokfsm import analysis as A
from codebook_lens.experiments.tokfsm import classify as C
from codebook_lens.experiments.tokfsm.config import (
    PRESETS,
    FSMExperimentConfig,
    load_fsm_config,
    stage_config,
)
from codebook_lens.experiments.tokfsm.report import fsm_report
from codebook_lens.experiments.tokfsm.task import (
    lm_metrics,
    neox_config,
    parity_rope_theta,
    state_metrics,
)
from codebook_lens.training.config import to_dict, train_settings
from codebook_lens.training.loop import TrainData, train

# the config (codebook_lens.experiments.tokfsm.config) stays importable from here
__all__ = [
    "PRESETS",
    "FSMExperimentConfig",
    "build_base",
    "load_fsm_config",
    "model_metrics",
    "run",
    "site_sets",
    "stage_config",
    "valid_transition_mass",
    "walk_valid_mass",
]


# ----------------------------------------------------------------------------------------
# the run


def _stage(
    cfg: FSMExperimentConfig,
    name: str,
    out: Path,
    base,
    data: TrainData,
    log,
) -> tuple[CodebookModel, float]:
    """Train stage ``name`` (or load it when a finished run with the same settings is
    there; resume it from its last checkpoint when an unfinished one is)."""
    tcfg = stage_config(cfg, name, out)
    stage_dir = out / name
    fingerprint = _fingerprint(
        {"train": to_dict(tcfg), "task": to_dict(cfg.task), "net": to_dict(cfg.net)}
    )
    stamp = stage_dir / "stage.json"
    if stamp.exists() and _fingerprint(json.loads(stamp.read_text())) != fingerprint:
        log(f"{name}: settings changed since the last run in {stage_dir}; training afresh")
        shutil.rmtree(stage_dir)
    model_dir = stage_dir / "model"
    done = stage_dir / "done.json"
    # a frozen base is not saved with the codebooks: they are loaded onto an untouched copy
    frozen = tcfg.optim.freeze_base
    pristine = copy.deepcopy(base) if frozen else None
    if done.exists() and (model_dir / "codebook_config.json").exists():
        log(f"{name}: loading the trained model from {model_dir}")
        seconds = json.loads(done.read_text())["seconds"]
        return CodebookModel.from_pretrained(model_dir, base_model=pristine).eval(), seconds
    stage_dir.mkdir(parents=True, exist_ok=True)
    stamp.write_text(json.dumps(fingerprint, indent=2))
    t0 = time.perf_counter()
    # how to load the saved stage: TokFSM digits, the machine beside it, and (for a
    # frozen base) the base stage's weights, as paths relative to the model directory
    source = {
        "codec": {"kind": "digits", "base": cfg.task.base},
        "task": {"fsm": os.path.relpath(out / "fsm.json", model_dir)},
    }
    if frozen:
        source["base"] = os.path.relpath(out / "base" / "model" / "base", model_dir)
    train(tcfg, resume=True, base=base, data=data, desc=f"{name} model", source=source)
    seconds = time.perf_counter() - t0
    done.write_text(json.dumps({"seconds": seconds}))
    return CodebookModel.from_pretrained(model_dir, base_model=pristine).eval(), seconds


def _fingerprint(stage: dict) -> dict:
    """A stage's settings without where it lives: a moved or copied run reuses its models.

    The training settings are written out in full (every option, codebook options
    included), so that a stamp of a run that recorded only the options it set, or that
    predates an option left at its default, means the same settings."""
    return {**stage, "train": train_settings(stage.get("train", {}))}


def build_base(cfg: FSMExperimentConfig, fsm: FSM, seed: int):
    """A freshly initialised GPT-NeoX of ``cfg.net`` for ``fsm``."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    net = cfg.net
    theta = net.rope_theta
    if net.parity_rotary:
        theta = parity_rope_theta(net.hidden // net.heads, net.rotary_fraction)
    config = neox_config(
        fsm,
        net.layers,
        net.hidden,
        net.heads,
        net.mlp,
        cfg.task.seq_len,
        net.rotary_fraction,
        theta,
    )
    return AutoModelForCausalLM.from_config(config)


@torch.no_grad()
def model_metrics(model, fsm: FSM, data: FSMData, cfg: FSMExperimentConfig) -> dict:
    """LM loss and next-token accuracy on held-out walks; state accuracies from samples."""
    batches = data.first(cfg.analysis.eval_batches, 64)
    parts = [lm_metrics(model, b) for b in batches]
    out = {k: sum(p[k] for p in parts) / len(parts) for k in parts[0]}
    out.update(
        state_metrics(
            model, fsm, cfg.analysis.sample_sequences, cfg.task.seq_len, seed=cfg.analysis.seed
        )
    )
    out["valid_transition_mass"] = valid_transition_mass(model, fsm, cfg.task.seq_len)
    out["valid_mass_after_jump"] = valid_transition_mass(
        model, fsm, cfg.task.seq_len, after_jump=True
    )
    return out


@torch.no_grad()
def valid_transition_mass(
    model,
    fsm: FSM,
    seq_len: int,
    per_length: int = 32,
    seed: int = 99,
    after_jump: bool = False,
) -> float:
    """Mean probability the model gives to valid next states after true walks
    (teacher-forced, prefixes of every length up to ``seq_len``): how well it knows the
    machine when its context is right, as opposed to sampling from its own output.

    ``after_jump=True``: the walk's last state is a uniformly random state instead of a
    successor (the kind of context a model makes for itself when it samples one invalid
    transition); the mass is then on that state's successors. A model that follows the
    machine from whatever state it reads scores as high as without the jump; one that
    cannot recover from a slip scores lower, and its samples go on failing after one.
    """
    gen = torch.Generator().manual_seed(seed)
    adj = fsm.adjacency().float()
    total, count = 0.0, 0
    max_states = (seq_len - 1) // fsm.digits - 1
    start = 2 if after_jump else 1
    for length in range(start, max_states + 1, max(1, max_states // 8)):
        jumps = None
        if after_jump:
            jumps = torch.zeros(per_length, length, dtype=torch.bool)
            jumps[:, -1] = True
        walks = fsm.walks(per_length, length, gen, jumps)
        total += float(walk_valid_mass(model, fsm, walks, adj).sum())
        count += per_length
    return total / count


@torch.no_grad()
def walk_valid_mass(
    model, fsm: FSM, walks: torch.Tensor, adj: torch.Tensor | None = None
) -> torch.Tensor:
    """Per walk (rows of states), the probability the model, reading BOS and the walk,
    gives to the successors of the walk's last state (teacher-forced)."""
    adj = fsm.adjacency().float() if adj is None else adj
    prefixes = torch.cat(
        [torch.full((walks.shape[0], 1), fsm.bos), fsm.encode_states(walks)], dim=1
    )
    p = A.next_state_distribution(model, fsm, prefixes)
    return (p * adj[walks[:, -1]]).sum(1)


def site_sets(model: CodebookModel) -> dict[str, list[str]]:
    """Intervention site sets: each MLP layer alone, all attention, all MLP, all."""
    keys = list(model.codebooks)
    mlp = [k for k in keys if model.placement[k][0] == "mlp"]
    attn = [k for k in keys if model.placement[k][0] in ("attn_heads", "attn")]
    sets = {k: [k] for k in mlp}
    if attn:
        sets["attn"] = attn
    if mlp:
        sets["mlp"] = mlp
    sets["all"] = keys
    return sets


def run(cfg: FSMExperimentConfig, out: str | Path, log=print) -> dict:
    """Run the experiment into ``out``; returns the flat metrics (also in metrics.json)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own bars say what is going on
    out = check_output_dir(out, "run directory")
    out.mkdir(parents=True, exist_ok=True)
    t = cfg.task
    fsm = FSM.random(t.num_states, t.out_degree, t.base, t.seed)
    fsm.save(out / "fsm.json")
    data = TrainData(FSMData(fsm, t.seq_len, jump_rate=t.jump_rate), FSMData(fsm, t.seq_len))
    (out / "config.json").write_text(json.dumps(to_dict(cfg), indent=2))

    seconds: dict[str, float] = {}
    base_model, seconds["base"] = _stage(
        cfg, "base", out, build_base(cfg, fsm, cfg.base.seed), data, log
    )
    base = base_model.model
    if cfg.codebook.from_base:
        start = copy.deepcopy(base)
    else:
        start = build_base(cfg, fsm, cfg.codebook.seed)
    cb_model, seconds["codebook"] = _stage(cfg, "codebook", out, start, data, log)

    t0 = time.perf_counter()
    log("measuring both models (held-out loss, sampled state accuracy)")
    metrics: dict = {}
    for name, model in (("base", base), ("codebook", cb_model)):
        for key, value in model_metrics(model, fsm, data.eval, cfg).items():
            metrics[f"{name}.{key}"] = value

    a = cfg.analysis
    tokens = FSMData(fsm, t.seq_len, stream=1).batch(a.seed, 0, a.sequences)
    num_codes = {k: cb.num_codes for k, cb in cb_model.codebooks.items()}
    log("analysing codes: purity, state classification, interventions, frequencies")
    codes = A.collect_codes(cb_model, tokens)
    pur_inputs = A.purity_all_inputs(cb_model, fsm)
    pur = A.purity(fsm, tokens, codes, num_codes, a.purity_threshold)
    for prefix, table, field in (
        ("purity", pur_inputs, "bigram"),
        ("purity_trigram", pur_inputs, "trigram"),
        ("purity_walks", pur, "purity"),
    ):
        for key, values in table.items():
            site, layer = cb_model.placement[key]
            metrics[f"{prefix}.{site}.{layer}"] = values[field]
    acts = C.neuron_activations(base, tokens)
    classification = C.state_classification(fsm, tokens, codes, num_codes, acts)
    outputs = {k: v for k, v in acts.items() if not k.endswith("_hidden")}
    del acts  # state plus digit: the output neurons only (hidden units triple its cost)
    tri_classification = C.state_classification(
        fsm, tokens, codes, num_codes, outputs, trigram=True
    )
    del outputs
    shared = ("code_precision", "code_recall", "neuron_precision", "neuron_precision_full_recall")
    for key in (*shared, "neuron_precision_hidden"):
        metrics[key] = classification[key]
    for key in shared:
        metrics[f"trigram_{key}"] = tri_classification[key]
    interventions, state_only = A.intervention_jsd_variants(
        cb_model, fsm, site_sets(cb_model), a.pairs, a.prefix_states, a.seed, (True, False)
    )
    for name, value in interventions["jsd"].items():
        metrics[f"jsd.{name}"] = value
    for name, value in interventions["target_mass"].items():
        metrics[f"target_mass.{name}"] = value
    for name, value in state_only["jsd"].items():
        metrics[f"jsd_state_only.{name}"] = value
    freqs = A.code_frequencies(codes, num_codes)
    freq_summary = {key: A.frequency_summary(c) for key, c in freqs.items()}
    for key, summary in freq_summary.items():
        metrics[f"frequency.{key}.dead_fraction"] = summary["dead_fraction"]
    seconds["analysis"] = time.perf_counter() - t0
    for name, value in seconds.items():
        metrics[f"seconds.{name}"] = value

    details = {
        "purity": {"all_inputs": pur_inputs, "walks": pur},
        "state_classification": classification,
        "trigram_classification": tri_classification,
        "interventions": interventions,
        "interventions_state_only": state_only,
        "frequency": freq_summary,
        "frequency_counts": {k: c[c > 0].tolist() for k, c in freqs.items()},
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    (out / "analysis.json").write_text(json.dumps(details))

    fsm_report(out, cfg, metrics, details)
    return metrics
