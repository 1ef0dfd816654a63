"""Fitting the language experiment to a time budget on the machine it runs on.

CPUs of one kind of machine differ by a factor of about three on this workload (a
2-core AMD EPYC with AVX-512 trained the cpu preset's base at 9,300 tokens/s, one with
AVX2 only at 3,400). A preset with ``budget_minutes`` set is sized for a fast machine;
before training, :func:`fit_budget` times the base network's training step, its
forward pass and the sampling of the prompts on this machine, predicts the whole run
with the cost model below, and when the prediction passes the budget scales the
training stages' steps (and their warm-up, freeze, eval and checkpoint cadences): the
base's by a factor ``s`` and the
codebook stage's (and the control's) by ``sqrt(s)``, the largest ``s`` that fits
(:func:`stage_scales`). The codebook stage shrinks less because it makes what the
experiment compares, the codebook model against its base: a shorter base is a weaker
base, but a shorter codebook stage leaves a wider gap to it. The measurements
(held-out batches, cache, regexes, steering samples) are not scaled: they are the
protocol.

Cost model. Training, in base training steps of the timed batch: a codebook-stage
step costs :data:`CODEBOOK_STEP` base steps of its batch (the codebooks and the
teacher's forward pass), a control step :data:`CONTROL_STEP`, the k-means
initialisation :data:`KMEANS_STEPS` (at 16,384 tokens and 2,048 codes, in proportion
to both). Measurements, in forward passes of one token (timed: a forward pass without
gradients of :data:`FORWARD_ROWS` sequences, divided by its tokens; about a third of a
training step's time per token, the unit the constants were fitted in): the quality
batches through :data:`QUALITY_PASSES` models (the ablation batches through two),
every cached token :data:`CACHE_PASSES` times (the cache and the regexes' two passes
over it, codes and neurons), and per topic :data:`TOPIC_FORWARDS` (first-order effects
over the cache, topic rates, scoring) plus, for a selection that measures them, every
candidate code over the measuring contexts once alone (shared by the paths) and, per
path, once more on a ``ranked`` search or :data:`GREEDY_PASSES` times on a ``greedy``
one (which measures its leading candidates again after each addition), and with
``steer.screen_per_group`` the wider pool once over the screening blocks;
steering's sampling costs :data:`SAMPLE_OVERHEAD` times its timed sampling (the samples are scored
too); the measurements together (forward passes and sampling) cost
:data:`MEASURE_OVERHEAD` times that (the scoring of every next-token distribution, the
forcing's hooks and the bookkeeping, which the timed passes leave out). The constants
were fitted to the cpu preset's stage times on the AVX-512 machine
(docs/results/language.md) and checked against the same run on an AVX2 machine;
:data:`CODEBOOK_STEP` and :data:`MEASURE_OVERHEAD` were refitted on 2026-12-04 to the
preset's runs at 4,096 and 8,192 tokens on the AVX2 machine, which they had
underpredicted (the codebook stage by 12-15%, the measurements by 32-52%).

The factor is written to ``budget.json`` in the run directory and reused by a rerun
with the same training settings (its measurements' settings may differ), so a rerun
finds its trained stages whatever it would time.
"""

from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from codebook_lens.experiments.language.config import ConfigError, LMExperimentConfig
from codebook_lens.steering.sampling import generate
from codebook_lens.training.config import to_dict

# a codebook-stage step, evals and checkpoints included (k-means apart), in base steps:
# 2.04 and 2.09 in the cpu preset's runs at 4,096 and 8,192 tokens (2026-12-04, AVX2; 1.8 before)
CODEBOOK_STEP = 2.1
CONTROL_STEP = 1.0
KMEANS_STEPS = 105.0
QUALITY_PASSES = 5
CACHE_PASSES = 6
TOPIC_FORWARDS = 330_000
SAMPLE_OVERHEAD = 1.5
# the measurements took 1.32 and 1.52 times the cost model's forward passes and sampling
# in the cpu preset's runs at 4,096 and 8,192 tokens (2026-12-04, AVX2): fitted to the
# larger, which the preset uses
MEASURE_OVERHEAD = 1.5
# measurements per candidate of a greedy path (steer.search: greedy): 3.7 and 2.7 on the
# two paths of a topic of the cpu preset's model (docs/results/language.md)
GREEDY_PASSES = 3.5
FORWARD_ROWS = 32  # the block whose forward pass is timed: 32 sequences
MIN_SCALE = 0.05  # below this share of its steps a stage trains too little to measure


@dataclass
class Budget:
    """What :func:`fit_budget` measured and decided."""

    minutes: float
    step_seconds: float  # one base training step here
    sample_seconds: float  # one prompt's share of sampling every prompt in one batch
    predicted_minutes: float  # the run at full size, predicted
    scale: float  # the factor applied to the base's steps (1: full size)
    forward_seconds: float | None = None  # a forward pass of FORWARD_ROWS sequences

    @property
    def codebook_scale(self) -> float:
        """The factor applied to the codebook (and control) stage's steps."""
        return stage_scales(self.scale)[1]

    def to_dict(self) -> dict:
        return self.__dict__.copy()


def stage_scales(scale: float) -> tuple[float, float]:
    """The factors of the base's steps and of the codebook stage's for a budget factor
    ``scale`` (see the module docstring)."""
    return scale, math.sqrt(scale)


def random_tokens(vocab: int, rows: int, seq_len: int) -> torch.Tensor:
    """``rows`` sequences of ``seq_len`` token ids drawn with a fixed seed."""
    return torch.randint(0, vocab, (rows, seq_len), generator=torch.Generator().manual_seed(0))


def seconds_per_call(fn: Callable[[], object], calls: int, warmup: int) -> float:
    """Mean seconds of ``calls`` calls of ``fn`` after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) / calls


def time_base_step(
    net: torch.nn.Module, vocab: int, batch: int, seq_len: int, steps: int = 4, warmup: int = 2
) -> float:
    """Seconds per training step (forward, backward, AdamW) of ``net`` on random tokens,
    after ``warmup`` untimed steps (the first steps run slower); the network is left as
    it was."""
    state = copy.deepcopy(net.state_dict())
    net.train()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-6)
    x = random_tokens(vocab, batch, seq_len)

    def step() -> None:
        net(x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    seconds = seconds_per_call(step, steps, warmup)
    net.load_state_dict(state)
    net.eval()
    return seconds


@torch.no_grad()
def time_forward(
    net: torch.nn.Module, vocab: int, rows: int, seq_len: int, passes: int = 4, warmup: int = 1
) -> float:
    """Seconds per forward pass without gradients of ``net`` on ``rows`` random
    sequences of ``seq_len`` tokens, after ``warmup`` untimed passes."""
    was_training = net.training
    net.eval()
    x = random_tokens(vocab, rows, seq_len)
    seconds = seconds_per_call(lambda: net(x), passes, warmup)
    net.train(was_training)
    return seconds


def time_sampling(net, codec, prompts: list[str], samples: int, max_new_tokens: int) -> float:
    """Seconds per prompt to draw ``samples`` continuations of ``max_new_tokens`` tokens
    of every one of ``prompts`` from ``net`` (a :class:`CodebookModel`; ``codec`` as
    :func:`~codebook_lens.steering.sampling.generate` takes it), which samples them in
    one batch: the time of that batch over the number of prompts."""
    t0 = time.perf_counter()
    generate(net, prompts, codec, samples=samples, max_new_tokens=max_new_tokens, seed=0)
    return (time.perf_counter() - t0) / max(len(prompts), 1)


def sampling_batches(cfg: LMExperimentConfig, prompts: int, topics: int) -> float:
    """The steering measurement's sampling, in units of one prompt's
    ``samples_per_prompt`` samples: the unsteered samples, and per topic the steered and
    the primed ones, plus the calibration's held-out ones (``select: calibrated``)."""
    s = cfg.steer
    batches = prompts * (1 + 2 * topics)
    if s.select == "calibrated":
        ratio = s.calibration_samples / s.samples_per_prompt
        paths = len(s.objectives())
        batches += prompts * ratio * (1 + topics * paths * s.calibration_points)
    return batches


def groups(cfg: LMExperimentConfig) -> int:
    """Codebook groups that steering draws candidates from: a head of every attention
    codebook, every other codebook whole."""
    layers = len(cfg.codebook.layers) if cfg.codebook.layers is not None else cfg.net.layers
    return sum(
        layers * (cfg.net.heads if site == "attn_heads" else 1) for site in cfg.codebook.sites
    )


def measure_forwards(cfg: LMExperimentConfig, prompts: int, topics: int) -> float:
    """The measurements' forward passes, in tokens (see the module docstring)."""
    m, s = cfg.measure, cfg.steer
    block = cfg.codebook.batch_size * cfg.data.seq_len
    quality = (QUALITY_PASSES * m.eval_batches + 2 * m.ablation_batches) * block
    samples = s.calibration_samples if s.select == "calibrated" else s.samples_per_prompt
    context = min(prompts * samples * (s.max_new_tokens + 4), s.measure_blocks * cfg.data.seq_len)
    selection = topics * TOPIC_FORWARDS
    if s.select in ("measured", "calibrated"):
        passes = len(s.objectives()) * (GREEDY_PASSES if s.search == "greedy" else 1)
        selection += topics * (1 + passes) * s.candidates_per_group * groups(cfg) * context
        if s.screen_per_group is not None:
            screen = min(context, s.screen_blocks * cfg.data.seq_len)
            selection += topics * s.screen_per_group * groups(cfg) * screen
    return quality + CACHE_PASSES * m.cache_tokens + selection


def timed_batch(cfg: LMExperimentConfig) -> int:
    """The batch size of the training step that is timed: the base stage's, or the
    codebook stage's for a pretrained base used as it is (``base.steps = 0``)."""
    return (cfg.base if cfg.base.steps else cfg.codebook).batch_size


def predicted_seconds(
    cfg: LMExperimentConfig,
    step: float,
    forward: float,
    sample: float,
    prompts: int,
    topics: int,
    scale=1.0,
) -> float:
    """The run's seconds after the tokenizer, by the cost model, with its training steps
    scaled for the budget factor ``scale`` (:func:`stage_scales`); ``step`` is one base
    training step, ``forward`` one forward pass of :data:`FORWARD_ROWS` sequences,
    ``sample`` one prompt's steering samples."""
    c = cfg.codebook
    batch = timed_batch(cfg)
    base_scale, codebook_scale = stage_scales(scale)
    stages = CODEBOOK_STEP * c.steps * c.batch_size / batch
    if c.control and c.from_base:
        stages += CONTROL_STEP * c.steps * c.batch_size / batch
    train = base_scale * cfg.base.steps + codebook_scale * stages
    kmeans = 0.0
    if c.kmeans_init:
        kmeans = (
            KMEANS_STEPS * c.kmeans_tokens / 16384 * max(c.num_codes(x) for x in c.sites) / 2048
        )
    token = forward / (FORWARD_ROWS * cfg.data.seq_len)
    forwards = token * measure_forwards(cfg, prompts, topics)
    steer = SAMPLE_OVERHEAD * sample * sampling_batches(cfg, prompts, topics)
    return step * (train + kmeans) + MEASURE_OVERHEAD * (forwards + steer)


def scaled(cfg: LMExperimentConfig, scale: float) -> LMExperimentConfig:
    """``cfg`` with its training stages' steps and cadences scaled for the budget
    factor ``scale`` (:func:`stage_scales`; at least one step each; the codebook stage
    keeps at least one step after its frozen ones)."""
    if scale >= 1.0:
        return cfg
    out = copy.deepcopy(cfg)
    base_factor, codebook_factor = stage_scales(scale)

    def shrink(value: int, factor: float, least: int = 1) -> int:
        return max(least, int(round(value * factor)))

    for stage, factor in ((out.base, base_factor), (out.codebook, codebook_factor)):
        if stage.steps == 0:
            continue
        stage.steps = shrink(stage.steps, factor)
        stage.warmup_steps = min(shrink(stage.warmup_steps, factor, 0), stage.steps)
        stage.eval_every = shrink(stage.eval_every, factor)
        stage.checkpoint_every = shrink(stage.checkpoint_every, factor)
    c = out.codebook
    if c.freeze_base_steps:
        c.freeze_base_steps = min(shrink(c.freeze_base_steps, codebook_factor), c.steps - 1)
        if c.freeze_base_steps < 1:  # too few steps to split: the network trains along
            c.freeze_base_steps = 0
    if c.revive_after_steps is not None:
        c.revive_after_steps = shrink(c.revive_after_steps, codebook_factor)
    return out


def fitting_scale(seconds: Callable[[float], float], available: float) -> float:
    """The largest budget factor, to a thousandth, whose predicted ``seconds(scale)``
    (increasing in ``scale``) is at most ``available`` (0 when none is)."""
    low, high = 0, 1000  # in thousandths
    while low < high:
        mid = (low + high + 1) // 2
        if seconds(mid / 1000) <= available:
            low = mid
        else:
            high = mid - 1
    return low / 1000


MEASUREMENT_SECTIONS = ("measure", "steer")


def training_settings(settings: dict) -> dict:
    """A config's settings (as :func:`~codebook_lens.training.config.to_dict` writes
    them) less the measurements' sections (:data:`MEASUREMENT_SECTIONS`): what decides the
    trained stages. A rerun that changes only the measurements (other topics, other
    regexes, other steering settings) keeps the factor its run was trained with, so it
    measures the models already trained rather than timing and training anew."""
    return {k: v for k, v in settings.items() if k not in MEASUREMENT_SECTIONS}


def fit_budget(
    cfg: LMExperimentConfig,
    out: Path,
    measure: Callable[[], tuple[float, float]],
    prompts: int,
    topics: int,
    spent_seconds: float,
    log: Callable[[str], None] = print,
) -> tuple[LMExperimentConfig, Budget | None]:
    """``cfg`` fitted to ``cfg.budget_minutes`` (see the module docstring), and what was
    measured; ``cfg`` as it is without a budget. ``measure()`` returns the seconds of one
    base training step, of one forward pass of :data:`FORWARD_ROWS` sequences and of one
    prompt's samples on this machine (:func:`time_base_step`, :func:`time_forward` and
    :func:`time_sampling`; not called when ``budget.json`` holds the factor of a run
    with the same training settings, :func:`training_settings`); ``spent_seconds`` is the
    time the run has spent already (tokenizer and data)."""
    if cfg.budget_minutes is None:
        return cfg, None
    stamp = out / "budget.json"
    unscaled = to_dict(cfg)
    if stamp.exists():
        saved = json.loads(stamp.read_text())
        if training_settings(saved.get("config", {})) == training_settings(unscaled):
            budget = Budget(**saved["budget"])  # runs before forward timing: None
            changed = (
                ""
                if saved.get("config") == unscaled
                else ("; only the measurements' settings changed, so the trained stages are kept")
            )
            log(
                f"budget: reusing the factor {budget.scale:.3f} measured for this run "
                f"(predicted {budget.predicted_minutes:.1f} min at full size){changed}"
            )
            return scaled(cfg, budget.scale), budget
    step, forward, sample = measure()
    full = predicted_seconds(cfg, step, forward, sample, prompts, topics)
    fixed = predicted_seconds(cfg, step, forward, sample, prompts, topics, scale=0.0)
    available = 60.0 * cfg.budget_minutes - spent_seconds
    scale = 1.0
    if full > available:
        scale = fitting_scale(
            lambda s: predicted_seconds(cfg, step, forward, sample, prompts, topics, s), available
        )
        if scale < MIN_SCALE:
            raise ConfigError(
                f"budget_minutes={cfg.budget_minutes:g} leaves too little time to train on "
                f"this machine: the run at full size is predicted to take "
                f"{(full + spent_seconds) / 60:.0f} min, its measurements alone "
                f"{(fixed + spent_seconds) / 60:.0f} min (budget_minutes=null: no budget)"
            )
    budget = Budget(cfg.budget_minutes, step, sample, (full + spent_seconds) / 60.0, scale, forward)
    stamp.write_text(json.dumps({"config": unscaled, "budget": budget.to_dict()}, indent=2))
    log(
        f"budget: a base step takes {step:.2f} s here, a forward pass of {FORWARD_ROWS} "
        f"sequences {forward:.2f} s, samples {sample:.2f} s per prompt; "
        f"the run at full size is predicted to take {budget.predicted_minutes:.0f} min"
        + (
            ""
            if scale >= 1.0
            else f", so the base runs {100 * scale:.1f}% of its steps and the codebook stage "
            f"{100 * budget.codebook_scale:.1f}% to fit "
            f"{cfg.budget_minutes:g} min (budget_minutes=null: full size)"
        )
    )
    return scaled(cfg, scale), budget
