"""The natural-language experiment end to end: ``codebook lm`` and ``codebook demo lm``.

Trains a BPE tokenizer on the corpus, a small GPT-NeoX on it from scratch (the base),
then a codebook model (codebooks on the attention heads and the MLP of every layer,
initialised from the base or trained from scratch with the codebooks in place) and,
as a control, the base trained on for the codebook stage's steps without codebooks.
Then it measures what the paper measures on natural language: LM quality against the
base and against mean ablation, code frequencies by rank, codes against neurons on
the regexes of a file, and topic steering on the topics of a file. The run directory:

- ``tokenizer/``: the trained tokenizer (also saved beside each model);
- ``base/``, ``codebook/``, ``control/``: each stage's training output
  (``metrics.jsonl``, ``checkpoints/``, ``model/``); a rerun with the same settings
  loads them, and resumes an interrupted stage from its last checkpoint;
- ``cache/``: the codebook model's code cache over training documents;
- ``metrics.json``: the key figures, flat (see :data:`METRIC_KEYS`);
- ``analysis.json``: per-regex, per-topic and per-codebook details, samples included;
- ``report.html``: plots and tables, self-contained.
"""

from __future__ import annotations

import copy
import json
import os
import random
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from codebook_lens.cache.build import build_cache
from codebook_lens.cache.store import CodeCache
from codebook_lens.core import sites as S
from codebook_lens.core.files import check_output_dir
from codebook_lens.core.loading import load_codebook_model
from codebook_lens.core.model import CodebookModel, CodebookModelConfig
from codebook_lens.data.cooccurrence import cooccurrence_embeddings
from codebook_lens.data.documents import Blocks, iter_documents, tokenize_documents
from codebook_lens.data.tokenizer import load_tokenizer, save_tokenizer, train_tokenizer
from codebook_lens.experiments.language import evaluate as E
from codebook_lens.experiments.language.budget import (
    FORWARD_ROWS,
    fit_budget,
    time_base_step,
    time_forward,
    time_sampling,
    timed_batch,
)
from codebook_lens.experiments.language.config import (
    REGEX_FILE,
    TOPIC_FILE,
    ConfigError,
    LMExperimentConfig,
    load_lm_config,
    stage_config,
)
from codebook_lens.experiments.language.files import data_file, load_regexes, load_topics
from codebook_lens.experiments.language.measures import lead_summary
from codebook_lens.experiments.language.metrics import METRIC_KEYS
from codebook_lens.experiments.language.report import lm_report
from codebook_lens.experiments.language.steer import (
    sample_unsteered,
    steer_topic,
    steering_summary,
)
from codebook_lens.training.config import to_dict, train_settings
from codebook_lens.training.loop import TrainData, load_base, resolve_model_path, train

__all__ = ["METRIC_KEYS", "build_base", "load_lm_config", "run"]

Log = Callable[[str], None]

# ----------------------------------------------------------------------------------------
# tokenizer, data, networks


def _stamped(directory: Path, settings: dict, log: Log, what: str) -> bool:
    """Whether ``directory`` holds a finished stage of these ``settings`` (as
    :func:`_fingerprint` writes them); a stage of other settings is removed (and a fresh
    one is started)."""
    stamp = directory / "stage.json"
    if stamp.exists() and _canonical(json.loads(stamp.read_text())) != settings:
        log(f"{what}: settings changed since the last run in {directory}; starting afresh")
        shutil.rmtree(directory)
    return (directory / "done.json").exists()


def tokenizer_stage(cfg: LMExperimentConfig, out: Path, log: Log):
    """The run's tokenizer: trained on the training split, or a pretrained network's own."""
    from transformers import AutoTokenizer

    if cfg.net.source != "scratch":
        return AutoTokenizer.from_pretrained(resolve_model_path(cfg.net.source))
    directory = out / "tokenizer"
    settings = {"tokenizer": to_dict(cfg.tokenizer), "corpus": cfg.data.corpus}
    if _stamped(directory, settings, log, "tokenizer"):
        return load_tokenizer(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "stage.json").write_text(json.dumps(settings, indent=2))
    log(f"training a BPE tokenizer of {cfg.tokenizer.vocab_size} tokens")
    tok = train_tokenizer(
        iter_documents(cfg.data.corpus, "train"),
        cfg.tokenizer.vocab_size,
        max_chars=cfg.tokenizer.max_chars,
    )
    save_tokenizer(tok, directory)
    (directory / "done.json").write_text("{}")
    return tok


def token_data(cfg: LMExperimentConfig, tokenizer) -> TrainData:
    """The corpus as blocks of ``data.seq_len`` tokens: training and held-out splits."""
    corpus, seq = cfg.data.corpus, cfg.data.seq_len
    train_tokens = tokenize_documents(
        iter_documents(corpus, "train"), tokenizer, cfg.data.max_train_tokens, "tokenizing train"
    )
    eval_tokens = tokenize_documents(iter_documents(corpus, "eval"), tokenizer, None, "eval")
    return TrainData(Blocks(train_tokens, seq, "training split"), Blocks(eval_tokens, seq, "eval"))


def base_embeddings(cfg: LMExperimentConfig, data: TrainData, vocab_size: int, log: Log):
    """The co-occurrence token embeddings (from the training split, see
    :mod:`codebook_lens.data.cooccurrence`) that a network from scratch starts from under
    ``net.embeddings: cooccurrence`` or ``net.output_embeddings: cooccurrence``; ``None``
    when neither asks for them (random, learned)."""
    net = cfg.net
    if "cooccurrence" not in (net.embeddings, net.output_embeddings):  # from scratch only
        return None
    log(
        f"embeddings: co-occurrence within {net.embedding_window} tokens over the training "
        f"split, PPMI reduced to {net.hidden} dimensions"
    )
    return cooccurrence_embeddings(
        data.train.blocks, vocab_size, net.hidden, window=net.embedding_window, seed=cfg.base.seed
    )


def build_base(cfg: LMExperimentConfig, tokenizer, seed: int, embeddings=None):
    """A fresh GPT-NeoX of ``cfg.net`` for ``tokenizer`` (``source: scratch``), its input
    token embeddings (``net.embeddings: cooccurrence``) and its untied output ones
    (``net.output_embeddings: cooccurrence``) set to ``embeddings`` when given (see
    :func:`base_embeddings`), or the first ``net.layers`` layers of a pretrained network
    (SmolLM2 or a model directory)."""
    from transformers import AutoModelForCausalLM, GPTNeoXConfig

    torch.manual_seed(seed)
    net = cfg.net
    if net.source != "scratch":
        base, _ = load_base(net.source)
        layers = S.decoder_layers(base)
        if net.layers > len(layers):
            raise ConfigError(
                f"net.layers={net.layers} but {net.source} has {len(layers)} decoder layers"
            )
        owner, _, attr = S.family_of(base)[1].layers.rpartition(".")
        setattr(base.get_submodule(owner), attr, layers[: net.layers])
        base.config.num_hidden_layers = net.layers
        if getattr(base.config, "layer_types", None):
            base.config.layer_types = base.config.layer_types[: net.layers]
        return base
    eos = tokenizer.eos_token_id
    config = GPTNeoXConfig(
        vocab_size=len(tokenizer),
        hidden_size=net.hidden,
        num_hidden_layers=net.layers,
        num_attention_heads=net.heads,
        intermediate_size=net.mlp,
        max_position_embeddings=cfg.data.seq_len,
        use_parallel_residual=False,
        tie_word_embeddings=net.tie_embeddings,
        bos_token_id=eos,
        eos_token_id=eos,
        pad_token_id=eos,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": net.rope_theta,
            "partial_rotary_factor": net.rotary_fraction,
        },
    )
    model = AutoModelForCausalLM.from_config(config)
    if embeddings is None:
        return model
    targets = []
    if net.embeddings == "cooccurrence":
        targets.append(model.get_input_embeddings().weight)  # the output too when tied
    if net.output_embeddings == "cooccurrence":
        targets.append(model.get_output_embeddings().weight)
    for weight in targets:
        if tuple(embeddings.shape) != tuple(weight.shape):
            raise ConfigError(
                f"embeddings of shape {tuple(embeddings.shape)} for a network whose token "
                f"embeddings are {tuple(weight.shape)}"
            )
        with torch.no_grad():
            weight.copy_(embeddings)
    return model


# ----------------------------------------------------------------------------------------
# training stages


def _canonical(settings: dict) -> dict:
    """Stage settings with their training config written out in full (see
    :func:`codebook_lens.training.config.train_settings`)."""
    if isinstance(settings.get("train"), dict):
        return {**settings, "train": train_settings(settings["train"])}
    return settings


def _fingerprint(cfg: LMExperimentConfig, name: str, out: Path) -> dict:
    """A stage's settings without where it lives (a moved run reuses its models)."""
    return {
        "train": train_settings(to_dict(stage_config(cfg, name, out))),
        "tokenizer": to_dict(cfg.tokenizer),
        "data": to_dict(cfg.data),
        "net": to_dict(cfg.net),
        "from_base": cfg.codebook.from_base if name == "codebook" else None,
        "base_steps": cfg.base.steps if name != "base" else None,
    }


def keep_base(cfg: LMExperimentConfig, out: Path, start, tokenizer, log: Log) -> CodebookModel:
    """The base stage of a pretrained network used as it is (``base.steps = 0``): the
    network is saved where a trained base would be, for the stages that load it."""
    stage_dir = out / "base"
    model_dir = stage_dir / "model"
    settings = {"net": to_dict(cfg.net), "steps": 0}
    if not _stamped(stage_dir, settings, log, "base"):
        stage_dir.mkdir(parents=True, exist_ok=True)
        (stage_dir / "stage.json").write_text(json.dumps(settings, indent=2))
        log(f"base: {cfg.net.source} as it is (base.steps = 0)")
        kept = CodebookModel(start, CodebookModelConfig([]))
        kept.save_pretrained(model_dir, include_base=True, source={"codec": {"kind": "tokenizer"}})
        tokenizer.save_pretrained(str(model_dir / "base"))
        kept.remove_hooks()
        (stage_dir / "done.json").write_text(json.dumps({"seconds": 0.0}))
    return CodebookModel.from_pretrained(model_dir).eval()


def train_stage(
    cfg: LMExperimentConfig, name: str, out: Path, start, data: TrainData, tokenizer, log: Log
) -> tuple[CodebookModel, float]:
    """Train stage ``name`` from the network ``start`` (or load it when a finished stage
    of the same settings is there; resume it from its last checkpoint when an unfinished
    one is). Returns the trained model and the stage's training seconds."""
    if name == "base" and cfg.base.steps == 0:
        return keep_base(cfg, out, start, tokenizer, log), 0.0
    tcfg = stage_config(cfg, name, out)
    stage_dir = out / name
    model_dir = stage_dir / "model"
    frozen = tcfg.optim.freeze_base
    pristine = copy.deepcopy(start) if frozen else None
    finished = _stamped(stage_dir, _fingerprint(cfg, name, out), log, name)
    if finished and (model_dir / "codebook_config.json").exists():
        log(f"{name}: loading the trained model from {model_dir}")
        seconds = json.loads((stage_dir / "done.json").read_text())["seconds"]
        return CodebookModel.from_pretrained(model_dir, base_model=pristine).eval(), seconds
    stage_dir.mkdir(parents=True, exist_ok=True)
    (stage_dir / "stage.json").write_text(json.dumps(_fingerprint(cfg, name, out), indent=2))
    source: dict = {"codec": {"kind": "tokenizer"}}
    if frozen:  # the codebooks load onto the base stage's weights (and tokenizer)
        source["base"] = os.path.relpath(out / "base" / "model" / "base", model_dir)
    t0 = time.perf_counter()
    train(tcfg, resume=True, base=start, tokenizer=tokenizer, data=data, desc=name, source=source)
    seconds = time.perf_counter() - t0
    (stage_dir / "done.json").write_text(json.dumps({"seconds": seconds}))
    return CodebookModel.from_pretrained(model_dir, base_model=pristine).eval(), seconds


# ----------------------------------------------------------------------------------------
# the run


def cache_documents(cfg: LMExperimentConfig) -> Iterator[str]:
    """Training documents in a seeded order (every source of the corpus mixed in)."""
    docs = list(iter_documents(cfg.data.corpus, "train"))
    random.Random(cfg.measure.seed).shuffle(docs)
    return iter(docs)


def check_sample_lengths(cfg: LMExperimentConfig, tokenizer, prompts) -> None:
    """Refuse, before any training, steering samples that a network from scratch (of
    ``data.seq_len`` positions) could not hold: the longest prompt plus
    ``steer.max_new_tokens`` new tokens. (A topic's passage before the prompts, for the
    primed share, is cut to its last words that fit: :func:`~.steer.primed_passage`.)"""
    if cfg.net.source != "scratch":
        return  # a pretrained network's positions are checked when it samples
    longest = max(max(len(tokenizer(p, add_special_tokens=False).input_ids), 1) for p in prompts)
    need = longest + cfg.steer.max_new_tokens
    if need > cfg.data.seq_len:
        raise ConfigError(
            f"steer.max_new_tokens={cfg.steer.max_new_tokens} after the longest prompt of "
            f"{longest} tokens needs {need} positions; the network has data.seq_len="
            f"{cfg.data.seq_len}: lower steer.max_new_tokens to at most {cfg.data.seq_len - longest}"
        )


def run(cfg: LMExperimentConfig, out: str | Path, log: Log = print) -> dict:
    """Run the experiment into ``out``; returns the flat metrics (also in metrics.json)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own bars say what is going on
    out = check_output_dir(out, "run directory")
    out.mkdir(parents=True, exist_ok=True)
    regexes = load_regexes(data_file(cfg.measure.regex_file, REGEX_FILE))
    prompts, topics = load_topics(data_file(cfg.steer.topic_file, TOPIC_FILE))
    (out / "config.json").write_text(json.dumps(to_dict(cfg), indent=2))

    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    tokenizer = tokenizer_stage(cfg, out, log)
    check_sample_lengths(cfg, tokenizer, prompts)
    data = token_data(cfg, tokenizer)
    embeddings = base_embeddings(cfg, data, len(tokenizer), log)
    seconds["tokenizer"] = time.perf_counter() - t0

    def measure() -> tuple[float, float, float]:
        log(f"budget: timing training and sampling to fit {cfg.budget_minutes:g} minutes")
        net = build_base(cfg, tokenizer, cfg.base.seed, embeddings)
        step = time_base_step(net, len(tokenizer), timed_batch(cfg), cfg.data.seq_len)
        forward = time_forward(net, len(tokenizer), FORWARD_ROWS, cfg.data.seq_len)
        wrapped = CodebookModel(net, CodebookModelConfig([])).eval()
        try:
            s = cfg.steer
            sample = time_sampling(
                wrapped, tokenizer, prompts, s.samples_per_prompt, s.max_new_tokens
            )
        finally:
            wrapped.remove_hooks()
        return step, forward, sample

    requested = cfg
    cfg, budget = fit_budget(
        cfg, out, measure, len(prompts), len(topics), seconds["tokenizer"], log
    )
    if budget is not None:
        (out / "config.json").write_text(
            json.dumps(
                {**to_dict(cfg), "requested": to_dict(requested), "budget": budget.to_dict()},
                indent=2,
            )
        )

    base_cbm, seconds["base"] = train_stage(
        cfg,
        "base",
        out,
        build_base(cfg, tokenizer, cfg.base.seed, embeddings),
        data,
        tokenizer,
        log,
    )
    base = base_cbm.model
    c = cfg.codebook
    start = copy.deepcopy(base) if c.from_base else build_base(cfg, tokenizer, c.seed, embeddings)
    _, seconds["codebook"] = train_stage(cfg, "codebook", out, start, data, tokenizer, log)
    control = None
    if c.control and c.from_base:
        control_cbm, seconds["control"] = train_stage(
            cfg, "control", out, copy.deepcopy(base), data, tokenizer, log
        )
        control = control_cbm.model

    t0 = time.perf_counter()
    log("measuring LM quality (held-out loss, KL, mean ablation)")
    loaded = load_codebook_model(out / "codebook" / "model")
    model = loaded.model
    b = c.batch_size
    eval_batches = data.eval.first(cfg.measure.eval_batches, b)
    ablation_batches = data.train.first(cfg.measure.ablation_batches, b)
    metrics, quality_details = E.quality(base, model, eval_batches, ablation_batches, control)
    seconds["quality"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    log(f"caching the codes of {cfg.measure.cache_tokens:,} tokens of training text")
    cache_dir = out / "cache"
    # the cache belongs to one codebook model: a retrained codebook stage rebuilds it
    cache_settings = {
        "codebook": _fingerprint(cfg, "codebook", out),
        "cache_tokens": cfg.measure.cache_tokens,
        "corpus": cfg.data.corpus,
        "seq_len": cfg.data.seq_len,
    }
    stamp = cache_dir / "stage.json"
    if cache_dir.exists() and (
        not stamp.exists() or json.loads(stamp.read_text()) != cache_settings
    ):
        log(f"cache: built for other settings or another model in {cache_dir}; rebuilding")
        shutil.rmtree(cache_dir)
    if not (cache_dir / "manifest.json").exists():
        build_cache(
            loaded,
            cache_documents(cfg),
            cache_dir,
            corpus_name=f"{cfg.data.corpus} (train, shuffled)",
            max_tokens=cfg.measure.cache_tokens,
            seq_len=cfg.data.seq_len,
            batch_size=b,
            overwrite=True,
        )
        stamp.write_text(json.dumps(cache_settings))
    cache = CodeCache.open(cache_dir)
    cache.set_model(loaded)
    freq, freq_details = E.frequencies(cache)
    metrics.update(freq)
    seconds["cache"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    log(f"codes against neurons on {len(regexes)} regexes")
    rows, curves = E.regex_comparisons(cache, regexes, cfg.measure)
    for key, value in lead_summary(rows).items():
        metrics[f"regex.{key}"] = value
    for row in rows:
        if row.lead is not None:
            metrics[f"regex_lead.{row.name}"] = row.lead
    seconds["regex"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    log(f"steering {len(topics)} topics at strength {cfg.steer.strength:g}")
    results = []
    unsteered = sample_unsteered(model, loaded.codec, prompts, cfg.steer)
    held_out = None
    if cfg.steer.select == "calibrated":
        held_out = sample_unsteered(model, loaded.codec, prompts, cfg.steer, held_out=True)
    for topic in topics:  # a line per topic as it is done
        results.append(
            steer_topic(model, loaded.codec, cache, prompts, topic, cfg.steer, unsteered, held_out)
        )
        r = results[-1]
        tried = ""
        if r.calibration:
            tried = "; held out: " + ", ".join(
                f"{p['codes']} codes"
                + (f" ({p['objective']})" if cfg.steer.objective == "both" else "")
                + f" {100 * p['share']:.0f}% at {p['cost']:+.2f}"
                for p in r.calibration
            )
        log(
            f"  {r.name}: {100 * r.baseline_share:.0f}% -> {100 * r.steered_share:.0f}% on "
            f"topic, fluency cost {r.fluency_cost:+.2f} nats ({len(r.codes)} codes)"
            + ("" if r.primed_share is None else f"; primed {100 * r.primed_share:.0f}%")
            + tried
        )
        metrics[f"steer.{r.name}.baseline_share"] = r.baseline_share
        metrics[f"steer.{r.name}.steered_share"] = r.steered_share
        metrics[f"steer.{r.name}.fluency_cost"] = r.fluency_cost
        if r.primed_share is not None:
            metrics[f"steer.{r.name}.primed_share"] = r.primed_share
        if r.topic_rate is not None:
            metrics[f"steer.{r.name}.topic_rate"] = r.topic_rate
            metrics[f"steer.{r.name}.forced_topic_rate"] = r.forced_topic_rate
        if cfg.steer.select == "calibrated":
            metrics[f"steer.{r.name}.calibration_points"] = len(r.calibration)
            if r.calibration_kept is not None:
                chosen = r.calibration[r.calibration_kept]
                metrics[f"steer.{r.name}.calibration_share"] = chosen["share"]
                metrics[f"steer.{r.name}.calibration_cost"] = chosen["cost"]
    for key, value in steering_summary(results).items():
        metrics[f"steer.{key}"] = value
    if budget is not None:
        keys = (
            "scale",
            "codebook_scale",
            "step_seconds",
            "forward_seconds",
            "sample_seconds",
            "predicted_minutes",
        )
        for key in keys:
            metrics[f"budget.{key}"] = getattr(budget, key)
    seconds["steer"] = time.perf_counter() - t0
    for name, value in seconds.items():
        metrics[f"seconds.{name}"] = value

    details = {
        "quality": quality_details,
        "frequency": freq_details,
        "regexes": [r.to_dict() for r in rows],
        "regex_curves": curves,
        "steering": [r.to_dict() for r in results],
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    (out / "analysis.json").write_text(json.dumps(details))
    lm_report(out, cfg, metrics, details)
    return metrics
